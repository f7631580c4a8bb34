"""ReCARE Studio app entry (also the Hugging Face Spaces entry).

    python app.py                                  # the bundled mini world, offline, on CPU
    python app.py --model CompVis/stable-diffusion-v1-4 --share
    RECARE_MODEL=/path/to/diffusers-folder python app.py

Environment: RECARE_MODEL (model picked at start), RECARE_WORKSPACE (where session folders go,
default a temp dir), RECARE_DEVICE (auto, cpu, cuda, mps), RECARE_HOME (training and evaluation
runs go to $RECARE_HOME/runs, default ~/.cache/recare/runs; --runs-dir overrides); OMP_WAIT_POLICY
defaults to PASSIVE (`recare.runtime.set_process_defaults`).

Public mode: with --share, --public, RECARE_PUBLIC=1, or on a Hugging Face Space (SPACE_ID is
set there), visitors may load only the mini world, hub ids and open_clip encoders; local paths
are refused unless listed with --allow-model DIR or RECARE_ALLOWED_MODELS (folders separated by
the path separator, ':' on Linux). The --model given at start is always allowed. Resource limits:
RECARE_MAX_... (see recare/limits.py and README).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from recare.runtime import set_process_defaults

DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"  # the reviewer demo (README: Reviewer demo)

# `ui` (gradio, torch) is imported in main(): a job worker that the app spawns re-imports this
# file as __mp_main__, and must not pay seconds of imports it never uses.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ReCARE Studio: concept unlearning that keeps CARE concepts.")
    parser.add_argument("--model", default=os.environ.get("RECARE_MODEL", "mini-world"),
                        help="mini-world (default, bundled), a hub id, or a local diffusers folder [env RECARE_MODEL]")
    parser.add_argument("--device", default=os.environ.get("RECARE_DEVICE", "auto"), help="auto, cpu, cuda or mps")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME"), help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--runs-dir", default=None,
                        help="where training/evaluation runs live (default $RECARE_HOME/runs or ~/.cache/recare/runs)")
    parser.add_argument("--public", action="store_true",
                        help="public deployment: refuse local model paths (also on with --share, RECARE_PUBLIC=1, "
                             "or on a Hugging Face Space)")
    parser.add_argument("--allow-model", action="append", default=[], metavar="DIR",
                        help="in public mode, a folder whose models visitors may load (repeatable) "
                             "[env RECARE_ALLOWED_MODELS, separated by os.pathsep]")
    parser.add_argument("--demo", default=os.environ.get("RECARE_DEMO", str(DEMO_DIR)), metavar="DIR",
                        help="the reviewer demo's bundled results (python -m recare demo pack); '' for none "
                             "(default: the repository's assets/demo when it has one) [env RECARE_DEMO]")
    return parser.parse_args(argv)


def public_mode(args: argparse.Namespace, environ=os.environ) -> bool:
    """Whether this is a public deployment: --public, --share, RECARE_PUBLIC=1, or a Space (SPACE_ID set)."""
    flag = environ.get("RECARE_PUBLIC", "").strip().lower() in ("1", "true", "yes", "on")
    return bool(args.public or args.share or flag or environ.get("SPACE_ID"))


def model_policy(args: argparse.Namespace, environ=os.environ):
    """The app's `recare.models.ModelPolicy`: local use, or public with the allowed model folders.

    The folders are --allow-model DIR (repeatable), RECARE_ALLOWED_MODELS, and the --model folder
    itself when the operator started the app with a local one.
    """
    from recare.models import LOCAL_USE, ModelPolicy

    if not public_mode(args, environ):
        return LOCAL_USE
    allowed = [*args.allow_model, *environ.get("RECARE_ALLOWED_MODELS", "").split(os.pathsep)]
    if Path(args.model).expanduser().is_dir():
        allowed.append(args.model)
    return ModelPolicy.public([d for d in allowed if d.strip()])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)  # first: --help answers without loading gradio and torch

    import ui

    demo = ui.create_app(model=args.model, device=args.device, runs_dir=args.runs_dir, policy=model_policy(args),
                         demo_dir=args.demo or None)
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                **ui.launch_kwargs(runs_dir=args.runs_dir))


if __name__ == "__main__":  # `python app.py`, also how Spaces starts it
    set_process_defaults()  # before main() imports ui and so torch: OpenMP reads OMP_WAIT_POLICY once
    main()
