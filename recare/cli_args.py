"""The command line's shared argument helpers (`recare.cli` and its command modules use them).

    add_common(parser)              --device and --out
    check_folder_arg(flag, value)   a folder argument refused at the start, before any model loads
    overrides(args, names)          the config fields given on the command line
    is_file(path)                   Path.is_file, False for names the file system cannot look up
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from recare.config import ConfigError

DEFAULT_RUNS_DIR = "runs"


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', ...")
    parser.add_argument("--out", default=DEFAULT_RUNS_DIR, metavar="DIR",
                        help=f"parent folder of the run folder this command creates (default: {DEFAULT_RUNS_DIR})")


def check_folder_arg(flag: str, value: str | None) -> None:
    """ConfigError now, before any model loads, when a folder argument cannot be a folder.

    A folder argument is written to only at the end of a command (after minutes of generating or
    encoding), so a path that is a file, or under a file, is refused at the start instead.

    Args:
        flag: the option's name, for the message.
        value: the path given (None: the default, nothing to check).
    """
    if value is None:
        return
    path = Path(value).expanduser()
    try:
        existing = next(part for part in (path, *path.parents) if part.exists())
        is_dir, writable = existing.is_dir(), os.access(existing, os.W_OK)
    except (OSError, ValueError) as e:  # a name too long for the file system, a NUL byte
        raise ConfigError(f"{flag} {value[:200]!r} is not a usable folder ({e}).") from None
    if not is_dir:
        raise ConfigError(f"{flag} {value!r} cannot be a folder: {existing} is a file.")
    if not writable:
        raise ConfigError(f"{flag} {value!r}: {existing} is not writable.")


def overrides(args: argparse.Namespace, names: dict[str, str]) -> dict[str, Any]:
    """Config fields the user gave on the command line ({config field: argparse dest})."""
    return {field: getattr(args, dest) for field, dest in names.items() if getattr(args, dest) is not None}


def is_file(path: Path) -> bool:
    """Path.is_file, False for names the file system cannot look up (too long, a NUL byte)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False
