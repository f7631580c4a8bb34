"""Which model and encoder names a caller may load (`ModelPolicy`), and the bundled mini world's folder.

The names themselves: "mini-world" (the bundled offline world), a Hugging Face hub id ("owner/name"),
"open_clip:<arch>/<pretrained>" for encoders, or a local folder. A public deployment
(`ModelPolicy.public`) refuses local paths except inside folders its operator lists, with one message
that says nothing about the server's file system.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Iterable

from recare.errors import ModelLoadError
from recare.limits import Limits
from recare.miniworld.location import REPO_ROOT, mini_world_dir  # noqa: F401  (mini_world_dir re-exported by recare.models)

MINI_WORLD = "mini-world"
DEFAULT_HUB_MODEL = "CompVis/stable-diffusion-v1-4"   # the paper's base model
DEFAULT_OPEN_CLIP = "open_clip:ViT-B-32/openai"        # the official CARE-set encoder
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_id(name: str) -> bool:
    """True when `name` has the form of a Hugging Face hub id ("owner/name").

    Args:
        name: a model name.
    """
    return bool(_HUB_ID.match(name))



def is_dir_or_file(path: Path) -> tuple[bool, bool]:
    """(is a folder, is a file), False for names the file system cannot even look up (too long, ...)."""
    try:
        return path.is_dir(), path.is_file()
    except (OSError, ValueError):
        return False, False


PUBLIC_REFUSAL = (
    "this public app loads only {examples}; local paths are turned off "
    "(whoever runs the app can allow model folders with --allow-model DIR or RECARE_ALLOWED_MODELS)."
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclasses.dataclass(frozen=True)
class ModelPolicy:
    """Which model and encoder names a caller may load.

    Attributes:
        local_paths: True (local use, the default): any local folder. False (a public deployment):
            only 'mini-world', hub ids, 'open_clip:...' names, and folders inside `allowed_dirs`.
        allowed_dirs: folders (resolved, absolute) whose contents may be loaded even when
            `local_paths` is False; the operator lists them.
        limits: `name_chars` bounds the length of a name (None: `Limits.from_env()` when checked).
    """

    local_paths: bool = True
    allowed_dirs: tuple[Path, ...] = ()
    limits: Limits | None = None

    @classmethod
    def public(cls, allowed_dirs: Iterable[str | Path] = (), limits: Limits | None = None) -> "ModelPolicy":
        """The policy of a public deployment: no local paths except inside `allowed_dirs`.

        Args:
            allowed_dirs: model folders (or folders of model folders) the operator allows.
            limits: the bounds (default `Limits.from_env()`).
        """
        dirs = tuple(Path(d).expanduser().resolve() for d in allowed_dirs if str(d).strip())
        return cls(local_paths=False, allowed_dirs=dirs, limits=limits)

    @property
    def public_mode(self) -> bool:
        """True when local paths are refused (except the allowed folders)."""
        return not self.local_paths

    def check_name(self, name: str, what: str = "model") -> str:
        """`name` stripped, or ModelLoadError when it is empty, too long, or holds control characters.

        Args:
            name: what the user typed.
            what: "model" or "encoder", for the message.
        """
        if not isinstance(name, (str, Path)):
            raise ModelLoadError(f"the {what} name must be text.")
        name = str(name).strip()
        if not name:
            raise ModelLoadError(f"the {what} name is empty: use 'mini-world' or a hub id such as {DEFAULT_HUB_MODEL}.")
        limits = self.limits or Limits.from_env()
        if len(name) > limits.name_chars:
            raise ModelLoadError(limits.exceeded("name_chars", f"the {what} name has {len(name):,} characters"))
        if _CONTROL.search(name):
            raise ModelLoadError(f"the {what} name holds control characters: retype it.")
        return name

    def local_folder(self, name: str) -> Path | None:
        """The folder `name` points at when this policy lets it be loaded from disk, else None.

        With `local_paths` every name may be a path (the caller then looks at the file system).
        Without, only a path inside an allowed folder is one; nothing else touches the disk.

        Args:
            name: a checked name (see `check_name`).
        """
        if self.local_paths:
            return Path(name).expanduser()
        if not self.allowed_dirs or not (os.path.isabs(name) or name.startswith(("~", "."))):
            return None  # relative names are hub ids here, never paths under the server's working folder
        try:
            resolved = Path(name).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        if any(resolved == d or d in resolved.parents for d in self.allowed_dirs):
            return resolved
        return None

    def refuse(self, kind: str) -> ModelLoadError:
        """The one error for a path this policy does not allow (the same for any path, existing or not)."""
        examples = (f"'{MINI_WORLD}' or a hub id such as {DEFAULT_HUB_MODEL}" if kind == "model"
                    else f"'{MINI_WORLD}' or '{DEFAULT_OPEN_CLIP}' (or another 'open_clip:<arch>/<pretrained>')")
        return ModelLoadError(PUBLIC_REFUSAL.format(examples=examples))


LOCAL_USE = ModelPolicy()  # the default: every name allowed (frozen, so sharing it is safe)


def mini_world_part(sub: str, marker: str, what: str) -> Path:
    """A folder of the installed mini world, or a ModelLoadError saying how to build it."""
    folder = mini_world_dir() / sub
    if not (folder / marker).is_file():
        raise ModelLoadError(
            f"mini world not installed: {folder} has no {what}. Build it with "
            f"`python -m recare.miniworld.train --out {mini_world_dir()}`, or set RECARE_MINI_WORLD to a folder "
            f"that has one."
        )
    return folder
