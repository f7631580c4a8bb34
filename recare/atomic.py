"""Atomic file and folder writes: every module that writes a file uses these.

`atomic_save(path, write)` writes a file under a temporary name beside `path`, flushes it to disk
and renames it into place; `atomic_write_dir(path)` does the same for a whole folder (a
`save_pretrained` output, a job's resume state). A crash or a cancel never leaves a half-written
file or folder behind, and a failed write keeps the previous version.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator


def _fsync_path(path: Path) -> None:
    """Flush a file's or folder's data to disk (best effort where the OS cannot open folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its rename is durable enough there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fresh_name(parent: Path, prefix: str, suffix: str = "") -> Path:
    return parent / f"{prefix}{secrets.token_hex(4)}{suffix}"


def atomic_save(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a file through `write(tmp)` on a temporary file beside `path`, then rename it into place.

    The temporary file keeps `path`'s suffix (writers such as `np.save` add one otherwise), has
    the permissions a plain `open` would give (umask), and is flushed to disk before the rename;
    the folder entry is flushed after it. If `write` raises, `path` keeps its old content and the
    temporary file is removed.

    Args:
        path: destination file; its folder is created if missing.
        write: called once with the temporary path, e.g. `lambda p: torch.save(obj, p)` or
            `lambda p: save_file(tensors, p)`.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _fresh_name(path.parent, f".{path.stem}.", f".tmp{path.suffix}")
        try:
            # O_EXCL: never reuse someone else's file; mode 0o666 so the umask decides, as for open()
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write(tmp)
        if not tmp.is_file():
            raise FileNotFoundError(f"the writer did not leave a file at {tmp}")
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder, then rename it into place.

    Args:
        path: destination file; its folder is created if missing.
        data: the bytes to write.

    Returns:
        The destination path.
    """
    return atomic_save(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically (see `atomic_write_bytes`).

    Args:
        path: destination file.
        text: the text to write.
    """
    return atomic_write_bytes(path, text.encode("utf-8"))


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the file is missing, unreadable or not a JSON object.

    For files that are caches or optional records (a speed cache, an export record, a world spec):
    a broken one reads as absent and is rewritten whole by `atomic_write_json`.

    Args:
        path: the file.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def atomic_write_json(path: str | Path, data: Any, indent: int = 2) -> Path:
    """Write `data` as pretty JSON (trailing newline) to `path` atomically.

    Args:
        path: destination file.
        data: anything `json.dumps` accepts.
        indent: JSON indentation.
    """
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


@contextlib.contextmanager
def atomic_write_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling of `path`; on success it replaces `path` as a whole.

    Usage:

        with atomic_write_dir(out / "unet") as tmp:
            unet.save_pretrained(tmp)

    On success the files are flushed to disk, the old `path` (if any) is moved aside, the new
    folder renamed in, and the old one removed. If the block raises, the temporary folder is
    removed and `path` is left as it was.

    Args:
        path: the destination folder; its parent is created if missing.

    Yields:
        The temporary folder to write into (empty; permissions as a plain `mkdir` gives).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _fresh_name(path.parent, f".{path.name}.tmp-")
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists() or path.is_symlink():
            old = _fresh_name(path.parent, f".{path.name}.old-")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # put the previous folder back
                raise
            _fsync_path(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
            _fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def restore_interrupted_swap(path: Path) -> None:
    """If a crash hit `atomic_write_dir` between its two renames, put the previous folder back."""
    if path.exists():
        return
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        os.replace(olds[-1], path)
