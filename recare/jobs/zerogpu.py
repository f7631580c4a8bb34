"""GPU jobs on a Hugging Face Space with ZeroGPU: the work in chunks of `spaces.GPU` calls that resume from state/.

On ZeroGPU a GPU exists only inside a function decorated with `spaces.GPU(duration=D)` and called
from the Gradio process, for at most D seconds: the `spaces` package runs the call in a forked
process that holds the GPU and kills it past D. A training run lasts far longer than one such call,
and the job runner's spawned workers get no GPU at all. So on such a Space the job runner runs a
GPU job in a thread of the Gradio process (`ChunkedGpuRunner.run_job`), and the job's own target
runs in chunks, each inside one `spaces.GPU` call:

    thread of the Gradio process                 one spaces.GPU(duration=D) call: run_chunk(...)
    ----------------------------                 ------------------------------------------------
    status RUNNING (pid of this process)         token = ChunkToken(the run's cancel file, budget)
    heartbeat                                    target(run, reporter, token), which resumes from
    chunk 1, 2, ...:                             state/ when the run has one, and when the token is
      user's cancel file -> CANCELLED            set saves state/ and raises Cancelled
      outcome of the call:                         -> "done" (+ result), "budget" (the chunk's time is up),
        "done"      -> DONE                           "cancelled" (the user's cancel file), "failed"
        "budget"    -> the next chunk
        "cancelled" -> CANCELLED (resumable)
        "failed"    -> FAILED

The chunk's token is set by the user's cancel file (as for any job) or by its budget: a time a bit
under D (`ChunkPolicy.budget_s`, default 3/4 of D, leaving the rest for the job to save its state
and hand the GPU back), or, for tests, a number of progress events. Training saves state/ when
cancelled and resumes bit for bit (`recare.train.recipe`), evaluation resumes from the images and
records it wrote (`recare.eval.run`), so chunked runs reach the same result as one long run.

A chunk stopped by its budget that reported no progress event it had not reported before (the model
loading alone took the whole budget, or the work restarts from zero each time, as generating a
job's target images does) counts as idle; after `MAX_IDLE_CHUNKS` idle chunks in a row the run
ends FAILED with advice instead of spending GPU quota forever.

`zerogpu_available()` says whether this applies: the `spaces` package is importable and this is a
ZeroGPU Space (`SPACES_ZERO_GPU`, set by Hugging Face; `RECARE_ZEROGPU=1` / `0` overrides it).
Elsewhere nothing changes: `zerogpu_runner()` returns None and jobs run as they always did.
Settings: `RECARE_ZEROGPU_DURATION` (seconds per `spaces.GPU` call, default 120).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
from typing import Callable

from recare.errors import Cancelled, ConfigError
from recare.progress import CancelToken, ProgressEvent
from recare.runs import Run

# the worker pieces every job shares (status writes, heartbeat, error.log, the request re-check)
from recare.jobs.worker import (
    CANCELLED_OUTCOME, DONE_OUTCOME, FAILED_OUTCOME, Heartbeat, StatusReporter, call_target, log_error, outcome_of,
    record_end, start_attempt,
)

ENV_OVERRIDE = "RECARE_ZEROGPU"             # "1": treat this as a ZeroGPU Space, "0": never
ENV_DURATION = "RECARE_ZEROGPU_DURATION"    # seconds asked for per spaces.GPU call
ENV_SPACE = "SPACES_ZERO_GPU"               # set by Hugging Face on ZeroGPU hardware (spaces.config reads it too)
DEFAULT_DURATION_S = 120                    # ZeroGPU's default is 60 s; shorter calls queue sooner
BUDGET_FRACTION = 0.75                      # a chunk stops its work after this part of the duration
MAX_IDLE_CHUNKS = 2                         # budget-stopped chunks in a row without new progress, then FAILED

OUTCOMES = ("done", "budget", "cancelled", "failed")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def zerogpu_available(environ: dict[str, str] | None = None) -> bool:
    """Whether GPU jobs must go through `spaces.GPU`: `spaces` is importable and this is a ZeroGPU Space.

    Args:
        environ: the variables to read (default os.environ). `RECARE_ZEROGPU=0` says no and
            `RECARE_ZEROGPU=1` says yes whatever `SPACES_ZERO_GPU` says (both still need `spaces`).
    """
    environ = os.environ if environ is None else environ
    override = (environ.get(ENV_OVERRIDE) or "").strip()
    if override == "0":
        return False
    if override != "1" and not _truthy(environ.get(ENV_SPACE)):
        return False  # not a ZeroGPU Space: do not even import spaces
    try:
        importlib.import_module("spaces")
    except ImportError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class ChunkPolicy:
    """How long each GPU chunk may run.

    Attributes:
        duration_s: the `duration` of every `spaces.GPU` call (ZeroGPU kills the call past it).
        budget_s: when a chunk stops its work (None: `BUDGET_FRACTION` of duration_s); the time
            left is for saving the state and returning.
        max_events: a chunk also stops after this many progress events (None: no such limit;
            tests use it to cut chunks at exact iterations).
    """

    duration_s: int = DEFAULT_DURATION_S
    budget_s: float | None = None
    max_events: int | None = None

    def __post_init__(self):
        if not isinstance(self.duration_s, int) or isinstance(self.duration_s, bool) or self.duration_s < 1:
            raise ConfigError(f"the ZeroGPU duration must be a whole number of seconds >= 1 (got {self.duration_s!r}).")
        if self.budget_s is not None and not 0 <= self.budget_s <= self.duration_s:
            raise ConfigError(f"the chunk budget must be between 0 and the duration {self.duration_s} s "
                              f"(got {self.budget_s!r}).")
        if self.max_events is not None and self.max_events < 1:
            raise ConfigError(f"max_events must be at least 1 (got {self.max_events!r}).")

    @property
    def chunk_budget_s(self) -> float:
        """Seconds a chunk works before it stops and saves."""
        return self.duration_s * BUDGET_FRACTION if self.budget_s is None else float(self.budget_s)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "ChunkPolicy":
        """The defaults, with `RECARE_ZEROGPU_DURATION` applied when set.

        Raises:
            ConfigError: a duration that is not a whole number >= 1.
        """
        environ = os.environ if environ is None else environ
        raw = (environ.get(ENV_DURATION) or "").strip()
        if not raw:
            return cls()
        try:
            return cls(duration_s=int(raw))
        except ValueError:
            raise ConfigError(f"{ENV_DURATION} must be a whole number of seconds >= 1 (got {raw!r}).") from None


class ChunkToken(CancelToken):
    """A chunk's cancel token: set by the run's cancel file (the user) or when the chunk's budget is spent.

    Args:
        path: the run's cancel file.
        budget_s: seconds from now after which the token is set (None: no time limit).
        max_events: progress events (`count_event`) after which the token is set (None: no limit).
    """

    def __init__(self, path, budget_s: float | None = None, max_events: int | None = None):
        super().__init__(path)
        self._deadline = None if budget_s is None else time.monotonic() + budget_s
        self.max_events = max_events
        self.events = 0
        self.budget_spent = False

    def count_event(self) -> None:
        self.events += 1

    def user_cancelled(self) -> bool:
        """Whether the run's cancel file exists (the user, or the app shutting down, asked to stop)."""
        return super().is_set()

    def is_set(self) -> bool:
        if self.user_cancelled():
            return True
        if not self.budget_spent:
            self.budget_spent = ((self._deadline is not None and time.monotonic() >= self._deadline)
                                 or (self.max_events is not None and self.events >= self.max_events))
        return self.budget_spent


def _event_key(event: ProgressEvent) -> list:
    """What makes an event new: a resumed chunk reports steps no earlier chunk did, a restarted one repeats them."""
    return [event.stage, int(event.step), int(event.total), event.message]


def run_chunk(run_path: str, target: str, budget_s: float | None, max_events: int | None, attempt: int) -> dict:
    """One chunk of a job: run `target` until it finishes or the chunk's token is set.

    This is the function `spaces.GPU` wraps; on ZeroGPU it runs in a forked process, so its
    arguments and its return value are plain picklable values, and it reports everything through
    the run folder (status.json, metrics.jsonl, error.log, state/).

    Args:
        run_path: the run folder.
        target: the job function, "package.module:function" (it resumes from state/ when there is one).
        budget_s: seconds this chunk may work (None: no time limit).
        max_events: progress events this chunk may report (None: no limit).
        attempt: the run's attempt number (for error.log).

    Returns:
        {"outcome": one of OUTCOMES, "events": keys of the progress events it reported,
         "result": the job's result (done), "error": the message (failed)}.
    """
    run = Run(run_path)
    token = ChunkToken(run.cancel_path, budget_s, max_events)
    reporter = StatusReporter(run)
    keys: list[list] = []

    def progress(event: ProgressEvent) -> None:
        keys.append(_event_key(event))
        token.count_event()
        reporter(event)

    try:
        outcome = outcome_of(run, attempt, result=call_target(run, target, progress, token))
    except BaseException as e:  # cancelled, a user error or a bug: the one rule of `outcome_of`
        outcome = outcome_of(run, attempt, e)
        if isinstance(e, Cancelled) and token.budget_spent and not token.user_cancelled():
            outcome["outcome"] = "budget"  # the chunk's own stop: the next chunk resumes from the saved state
    reporter.flush()
    return {**outcome, "events": keys}


class ChunkedGpuRunner:
    """Runs a GPU job as a loop of `spaces.GPU` chunks (the job runner's worker body on ZeroGPU).

    Create it while the app is being built (the job runner does, in its constructor): ZeroGPU looks
    for `spaces.GPU` functions when the Space starts.

    Args:
        policy: chunk duration and budget (default `ChunkPolicy.from_env()`).
        spaces_module: the `spaces` package (default: imported).
    """

    def __init__(self, policy: ChunkPolicy | None = None, spaces_module=None):
        self.policy = policy or ChunkPolicy.from_env()
        spaces = spaces_module if spaces_module is not None else importlib.import_module("spaces")

        def chunk(run_path: str, target: str, budget_s, max_events, attempt: int) -> dict:
            return run_chunk(run_path, target, budget_s, max_events, attempt)

        # a function of its own: spaces caches decorations per function, and this runner's duration is its own
        self.gpu_chunk: Callable[..., dict] = spaces.GPU(duration=self.policy.duration_s)(chunk)

    def run_job(self, run: Run, target: str) -> dict:
        """Run one job to its end, chunk after chunk, and record how it ended in status.json.

        Args:
            run: the run (its config.json holds the job's settings).
            target: the job function, "package.module:function".

        Returns:
            The final status.
        """
        pid, attempt = start_attempt(run, target, gpu_chunks=0)
        seen: set[tuple] = set()
        idle = 0
        chunk = 0
        with Heartbeat(run, pid):
            while True:
                if run.cancel_token().is_set():  # cancelled between two chunks
                    return record_end(run, {"outcome": CANCELLED_OUTCOME})
                chunk += 1
                run.update_status(gpu_chunks=chunk)
                try:
                    outcome = self.gpu_chunk(str(run.path), target, self.policy.chunk_budget_s,
                                             self.policy.max_events, attempt)
                except BaseException as e:  # the GPU call itself failed: quota, ZeroGPU's time limit, ...
                    log_error(run, attempt)
                    return record_end(run, {
                        "outcome": FAILED_OUTCOME,
                        "error": f"the GPU call of chunk {chunk} stopped ({type(e).__name__}: {e}); resume the run "
                                 "to continue from its last saved state"})
                if outcome.get("outcome") in (DONE_OUTCOME, CANCELLED_OUTCOME, FAILED_OUTCOME):
                    return record_end(run, outcome)
                new = {tuple(key) for key in outcome.get("events", ())} - seen
                seen |= new
                idle = 0 if new else idle + 1
                if idle >= MAX_IDLE_CHUNKS:
                    return record_end(run, {
                        "outcome": FAILED_OUTCOME,
                        "error": f"{idle} GPU chunks in a row of {self.policy.duration_s} s made no progress (the "
                                 f"model loading or a step that cannot be resumed takes longer than the chunk's "
                                 f"{self.policy.chunk_budget_s:.0f} s); set {ENV_DURATION} higher and resume the run"})


def zerogpu_runner(environ: dict[str, str] | None = None) -> ChunkedGpuRunner | None:
    """A `ChunkedGpuRunner` when `zerogpu_available()`, else None (jobs then run as they always did).

    Args:
        environ: the variables to read (default os.environ).
    """
    if not zerogpu_available(environ):
        return None
    return ChunkedGpuRunner(ChunkPolicy.from_env(environ))
