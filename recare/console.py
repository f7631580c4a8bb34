"""The `recare` command that `pip install -e .` puts on PATH: the same as `python -m recare`."""

from __future__ import annotations


def main() -> int:
    """Set the process defaults before torch loads (see `recare.runtime`), then run the CLI."""
    from recare.runtime import set_process_defaults

    set_process_defaults()
    from recare.cli import main as cli_main

    return cli_main()
