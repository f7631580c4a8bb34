"""ReCARE Studio app entry (also the Hugging Face Spaces entry).

    python app.py                                  # the bundled mini world, offline, on CPU
    python app.py --model CompVis/stable-diffusion-v1-4 --share
    RECARE_MODEL=/path/to/diffusers-folder python app.py

Environment: RECARE_MODEL (model picked at start), RECARE_WORKSPACE (where session folders go,
default a temp dir), RECARE_DEVICE (auto, cpu, cuda, mps).
"""

from __future__ import annotations

import argparse
import os

import ui


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ReCARE Studio: concept unlearning that keeps CARE concepts.")
    parser.add_argument("--model", default=os.environ.get("RECARE_MODEL", "mini-world"),
                        help="mini-world (default, bundled), a hub id, or a local diffusers folder [env RECARE_MODEL]")
    parser.add_argument("--device", default=os.environ.get("RECARE_DEVICE", "auto"), help="auto, cpu, cuda or mps")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME"), help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    demo = ui.create_app(model=args.model, device=args.device)
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **ui.launch_kwargs())


if __name__ == "__main__":
    main()
