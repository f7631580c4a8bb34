"""The run folder: one directory per action (generate, careset, train, ...) holding everything it made.

A run folder is named `<kind>-<YYYYmmdd-HHMMSS>-<6 hex>` so two runs started in the same second
(two app users, two CLI calls) never share a folder. Every file is written under a temporary name
and renamed into place, so a crash or a cancel never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

_KIND_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def new_run_dir(root: str | Path, kind: str) -> Path:
    """Create and return a fresh, empty run folder under `root`.

    Args:
        root: parent folder for runs (created if missing), e.g. `runs/`.
        kind: what the run does ("generate", "careset", ...); letters, digits, `_` and `-` only.

    Returns:
        The new folder `root/<kind>-<timestamp>-<random>`; it did not exist before this call.
    """
    if not _KIND_PATTERN.match(kind):
        raise ValueError(f"run kind {kind!r} must be letters, digits, '_' or '-' (e.g. 'careset').")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for _ in range(100):
        path = root / f"{kind}-{stamp}-{secrets.token_hex(3)}"
        try:
            path.mkdir()  # exist_ok=False: mkdir is atomic, so a collision raises instead of sharing
        except FileExistsError:
            continue
        return path
    raise RuntimeError(f"could not create a unique run folder under {root}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder, then rename it into place.

    Args:
        path: destination file; its folder is created if missing.
        data: the bytes to write.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically (see `atomic_write_bytes`).

    Args:
        path: destination file.
        text: the text to write.
    """
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, indent: int = 2) -> Path:
    """Write `data` as pretty JSON (trailing newline) to `path` atomically.

    Args:
        path: destination file.
        data: anything `json.dumps` accepts.
        indent: JSON indentation.
    """
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")
