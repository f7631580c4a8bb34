"""Where the installed mini world lives (no dependencies, so the renderer can read its settings)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def mini_world_dir() -> Path:
    """The bundled mini world's folder: `$RECARE_MINI_WORLD` if set (and not empty), else `<repo>/checkpoints/mini-world`."""
    return Path(os.environ.get("RECARE_MINI_WORLD") or REPO_ROOT / "checkpoints" / "mini-world")
