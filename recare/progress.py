"""One progress event and one cancel token for every long call of the library.

Every long call (generation, vocabulary encoding, the CARE-set, training, evaluation) takes two
optional arguments:

    progress: Callable[[ProgressEvent], None] | None   # called with one event per step
    cancel:   CancelToken | None                        # checked between steps

A `ProgressEvent` says which stage is running, how far it is (`step` of `total`), a short
message, and numbers worth plotting (`metrics`, e.g. {"loss": 0.12}). The CLI renders events
with tqdm (`TqdmProgress`), the app with `gr.Progress` and its live views, a job writes them into
its run's `status.json`.

A `CancelToken` is set from another thread (`cancel()`) or, for a job in another process, by a
file appearing (`CancelToken(path=run / "cancel")`). A long call checks it between steps
(`raise_if_cancelled()` or `is_set()`), saves what it must, and stops: a cancelled call raises
`recare.errors.Cancelled` or returns what it made, as its docstring says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from recare.errors import Cancelled


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    """How far a long call is.

    Attributes:
        stage: what runs now, e.g. "generate", "vocabulary", "careset", "stage1.erase", "stage2".
        step: steps done in this stage (0..total).
        total: steps in this stage (0 when unknown).
        message: a short human line ("image 5-8 of 64", "round 1 of 2: textual inversion").
        metrics: numbers to plot or log for this step (loss, erase, retain, lr, seconds, ...).
    """

    stage: str
    step: int
    total: int
    message: str = ""
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """step / total in [0, 1] (0 when the total is unknown)."""
        return min(1.0, max(0.0, self.step / self.total)) if self.total > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (non-finite metrics become None: JSON has no NaN)."""
        metrics = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in self.metrics.items()}
        return {"stage": self.stage, "step": int(self.step), "total": int(self.total),
                "message": self.message, "metrics": metrics}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ProgressEvent":
        metrics = {k: (float("nan") if v is None else float(v)) for k, v in dict(data.get("metrics") or {}).items()}
        return cls(stage=str(data.get("stage", "")), step=int(data.get("step", 0)), total=int(data.get("total", 0)),
                   message=str(data.get("message", "")), metrics=metrics)


ProgressCallback = Callable[[ProgressEvent], None]


def emit(progress: ProgressCallback | None, stage: str, step: int, total: int, message: str = "",
         **metrics: float) -> None:
    """Send one event to `progress` if there is a listener (the usual way library code reports).

    Args:
        progress: the caller's callback, or None.
        stage, step, total, message: see `ProgressEvent`.
        **metrics: numbers for this step (loss=..., lr=...).
    """
    if progress is not None:
        progress(ProgressEvent(stage, step, total, message, dict(metrics)))


class CancelToken:
    """Set once to ask a long call to stop; checked between steps.

    Args:
        path: optional file whose existence also means "cancelled" (a job in another process, or
            one resumed after a restart, is cancelled by creating that file).
    """

    def __init__(self, path: str | Path | None = None):
        self._event = threading.Event()
        self.path = Path(path) if path is not None else None

    def cancel(self) -> None:
        """Ask the call to stop (also creates the cancel file when the token has one)."""
        self._event.set()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()

    def is_set(self) -> bool:
        if self._event.is_set():
            return True
        if self.path is not None and self.path.exists():
            self._event.set()
            return True
        return False

    def raise_if_cancelled(self, what: str = "the job") -> None:
        """Raise `recare.errors.Cancelled` when the token is set."""
        if self.is_set():
            raise Cancelled(f"{what} was cancelled")


def check_cancel(cancel: CancelToken | None, what: str = "the job") -> None:
    """`cancel.raise_if_cancelled(what)` when there is a token (no-op for None)."""
    if cancel is not None:
        cancel.raise_if_cancelled(what)


class TqdmProgress:
    """Renders events as tqdm bars on stderr, one bar per stage (the CLI's view).

    Use as the `progress` callback; call `close()` (or use `with`) at the end.
    """

    def __init__(self, unit: str = "it", file=None):
        self.unit = unit
        self.file = file if file is not None else sys.stderr
        self._bar = None
        self._stage: str | None = None

    def __call__(self, event: ProgressEvent) -> None:
        from tqdm.auto import tqdm

        if event.stage != self._stage:
            self.close()
            self._stage = event.stage
            self._bar = tqdm(total=event.total or None, desc=event.stage, unit=self.unit, file=self.file,
                             dynamic_ncols=True)
        bar = self._bar
        if event.total and bar.total != event.total:
            bar.total = event.total
        postfix = ", ".join([event.message] * bool(event.message)
                            + [f"{k}={v:.4g}" for k, v in event.metrics.items()])
        if postfix:
            bar.set_postfix_str(postfix, refresh=False)
        bar.update(event.step - bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._stage = None

    def __enter__(self) -> "TqdmProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def listening(progress: "bool | ProgressCallback | None", unit: str = "it") -> Iterator[ProgressCallback | None]:
    """The callback for a `progress` argument that may also be an on/off switch (the offline build code's
    `progress=True`: tqdm bars on stderr).

    True gives a `TqdmProgress` (closed when the block ends), False or None gives None (events are
    dropped by `emit`), and a callback is used as it is.

    Args:
        progress: a callback, or True / False.
        unit: the bars' unit when they are drawn here.
    """
    if callable(progress):
        yield progress
    elif progress:
        with TqdmProgress(unit=unit) as bars:
            yield bars
    else:
        yield None
