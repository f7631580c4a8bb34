"""A training run's resumable state folder (`<run>/state/`) and the small conversions it stores.

    StateFolder(path).save(small, fresh, fixed)   replace the whole folder atomically
    StateFolder(path).load(name)                   read one file (weights_only: no code runs)

`state.pt` holds where the run stands (phase, round), the tokens learned so far (`token_dict`), the
textual-inversion state and the config; big tensor files sit beside it (see recare.train.recipe).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from recare.atomic import atomic_write_dir
from recare.errors import StateError

STATE_FORMAT = "recare-train-state"
STATE_VERSION = 1
STATE_DIR = "state"


def trained_tensors(unet: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    params = dict(unet.named_parameters())
    return {n: params[n].detach().to("cpu", copy=True) for n in names}


def load_tensors(unet: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def token_dict(token) -> dict:
    return {"placeholder": token.placeholder, "initializer": token.initializer,
            "embedding": token.embedding.detach().cpu().clone(), "losses": list(token.losses)}


def token_of(data: dict):
    from recare.train.textual_inversion import LearnedToken

    return LearnedToken(data["placeholder"], data["initializer"], data["embedding"], tuple(data["losses"]))



class StateFolder:
    """`<out_dir>/state/`: one small `state.pt` plus big tensor files, replaced as a whole on every save.

    Args:
        path: the state folder.
        save_dir: writes a whole folder atomically: `save_dir(write)` calls `write(tmp)` and swaps tmp in
            (default `recare.atomic.atomic_write_dir`; a job passes `Run.save_state`).
    """

    def __init__(self, path: Path, save_dir: Callable[[Callable[[Path], None]], Any] | None = None):
        self.path = Path(path)
        self._save_dir = save_dir or self._atomic_save

    def _atomic_save(self, write: Callable[[Path], None]) -> Path:
        with atomic_write_dir(self.path) as tmp:
            write(tmp)
        return self.path

    def save(self, small: dict, fresh: dict[str, Callable[[], Any]], fixed: dict[str, Callable[[], Any]]) -> None:
        """Write a new state.

        Args:
            small: state.pt's content.
            fresh: file name -> producer of content that changes between saves (always written).
            fixed: file name -> producer of content that never changes once written: hard-linked (or
                copied) from the current state folder when it is there, else written.
        """
        def write(tmp: Path) -> None:
            for name, produce in fixed.items():
                previous = self.path / name
                if previous.is_file():
                    try:
                        os.link(previous, tmp / name)
                    except OSError:  # no hard links on this file system
                        shutil.copy2(previous, tmp / name)
                else:
                    torch.save(produce(), tmp / name)
            for name, produce in fresh.items():
                torch.save(produce(), tmp / name)
            torch.save(small, tmp / "state.pt")  # last: a folder with state.pt is complete

        self._save_dir(write)

    def exists(self) -> bool:
        return (self.path / "state.pt").is_file()

    def load(self, name: str = "state.pt") -> Any:
        """One file of the state, read with `weights_only=True`: tensors and plain values, no code runs.

        Raises:
            StateError: the file is damaged (a truncated save) or holds something else than a state
                (a pickle placed there); the run cannot be resumed from it.
        """
        try:
            return torch.load(self.path / name, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated archives, foreign pickles and missing files raise many types here
            raise StateError(f"the run's saved state is damaged or was not written by a training run ({name}: "
                             f"{type(e).__name__}), so it cannot be resumed; start a new run") from e
