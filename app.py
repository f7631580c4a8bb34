"""ReCARE Studio app entry (also the Hugging Face Spaces entry).

    python app.py                                  # the bundled mini world, offline, on CPU
    python app.py --model CompVis/stable-diffusion-v1-4 --share
    RECARE_MODEL=/path/to/diffusers-folder python app.py

Environment: RECARE_MODEL (model picked at start), RECARE_WORKSPACE (where session folders go,
default a temp dir), RECARE_DEVICE (auto, cpu, cuda, mps), RECARE_HOME (training and evaluation
runs go to $RECARE_HOME/runs, default ~/.cache/recare/runs; --runs-dir overrides); OMP_WAIT_POLICY
defaults to PASSIVE (`recare.runtime.set_process_defaults`).
"""

from __future__ import annotations

import argparse
import os

from recare.runtime import set_process_defaults

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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)  # first: --help answers without loading gradio and torch

    import ui

    demo = ui.create_app(model=args.model, device=args.device, runs_dir=args.runs_dir)
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **ui.launch_kwargs())


if __name__ == "__main__":  # `python app.py`, also how Spaces starts it
    set_process_defaults()  # before main() imports ui and so torch: OpenMP reads OMP_WAIT_POLICY once
    main()
