"""The body every worker runs: one job to its end, with its status, heartbeat and error log.

A worker is a spawned process or a thread of the job runner (`recare.jobs.runner`), a ZeroGPU chunk
(`recare.jobs.zerogpu`), or the CLI running a job in the foreground; all of them use the pieces here:
`resolve_target` (the job function named by its import path), `StatusReporter` (progress into
status.json and metrics.jsonl), `Heartbeat`, `log_error` (tracebacks of bugs into error.log) and
`run_job`. Before the job function runs, `run_job` checks the run's request again
(`recare.jobs.checks.recheck`): the model policy and the bounds it was submitted under travel in
its config.json, so a run folder edited on disk, or a request that skipped the submit path, is
refused before any work starts.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import socket
import threading
import time
import traceback
from typing import Any, Callable

from recare.errors import Cancelled, RecareError, StateError
from recare.progress import ProgressEvent
from recare.runs import CANCELLED, DONE, FAILED, HEARTBEAT_S, RUNNING, Run, process_identity
from recare.timestamps import now_iso

_TARGET_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
STATUS_WRITE_S = 0.5  # progress reaches status.json at most this often (metrics lines are never dropped)


def resolve_target(target: str) -> Callable[..., Any]:
    """Import the job function named "package.module:function".

    Args:
        target: the import path of a module-level function.
    """
    if not _TARGET_PATTERN.match(target or ""):
        raise ValueError(f"job target {target!r} must look like 'package.module:function'.")
    module_name, function_name = target.split(":")
    fn = getattr(importlib.import_module(module_name), function_name)
    if not callable(fn):
        raise TypeError(f"job target {target} is not a function")
    return fn


class StatusReporter:
    """The progress callback a job receives: every metrics line, throttled status writes."""

    def __init__(self, run: Run, listener: Callable[[ProgressEvent], None] | None = None):
        self.run = run
        self.listener = listener  # e.g. the CLI's tqdm bars for a job run in the foreground
        self._last_write = 0.0
        self._stage: str | None = None
        self._pending: ProgressEvent | None = None

    def __call__(self, event: ProgressEvent) -> None:
        now = time.monotonic()
        due = (event.stage != self._stage or (event.total > 0 and event.step >= event.total)
               or now - self._last_write >= STATUS_WRITE_S)
        self.run.report(event, write_status=due)
        if self.listener is not None:
            self.listener(event)
        self._stage = event.stage
        if due:
            self._last_write, self._pending = now, None
        else:
            self._pending = event

    def flush(self) -> None:
        """Write the last event that a throttled call skipped."""
        if self._pending is not None:
            self.run.update_status(progress=self._pending.to_dict())
            self._pending = None


class Heartbeat:
    """Bumps status.json's `updated` every HEARTBEAT_S while the job runs (a thread of the worker)."""

    def __init__(self, run: Run, pid: int):
        self._run, self._pid = run, pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{run.id}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._run.update_status_if(lambda s: s.get("state") == RUNNING and s.get("pid") == self._pid)
            except (OSError, RecareError):  # the folder went away: nothing left to keep alive
                return

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def log_error(run: Run, attempt: int) -> None:
    """Append the current exception's traceback to error.log, with a header per attempt."""
    header = f"--- attempt {attempt}, {now_iso()}, pid {os.getpid()}\n"
    with open(run.error_log_path, "a", encoding="utf-8") as fh:
        fh.write(header + traceback.format_exc() + "\n")


def bug_message(error: BaseException) -> str:
    """What a run's status says about an error that is a bug: one sentence, no exception text.

    The exception's own text (a C library's "Overflow when unpacking long long", a server path)
    goes to error.log with its traceback, never to the page.
    """
    return (f"the job stopped on an unexpected error ({type(error).__name__}); its details are in the run's "
            "error.log: please report it")


# how a job's call ended (`outcome_of`); a ZeroGPU chunk adds "budget" (its time was up: the next chunk goes on)
DONE_OUTCOME, CANCELLED_OUTCOME, FAILED_OUTCOME = "done", "cancelled", "failed"


def outcome_of(run: Run, attempt: int, error: BaseException | None = None, result: Any = None) -> dict:
    """How a job's call ended, as plain values: {"outcome", "result" | "error", "damaged_state"}.

    No error: done with `result`. `Cancelled`: cancelled (the job saved its state). A user error
    (`RecareError`): failed with its message; a damaged saved state (`StateError`) is marked so the run
    is not offered for resume. Anything else is a bug: its traceback goes to error.log and the message
    says only that (`bug_message`).

    Args:
        run: the run (for error.log).
        attempt: the attempt number (error.log's header).
        error: what the job raised, or None.
        result: the job's result (JSON) when it returned.
    """
    if error is None:
        return {"outcome": DONE_OUTCOME, "result": result}
    if isinstance(error, Cancelled):
        return {"outcome": CANCELLED_OUTCOME}
    if isinstance(error, RecareError):
        return {"outcome": FAILED_OUTCOME, "error": str(error), "damaged_state": isinstance(error, StateError)}
    log_error(run, attempt)
    return {"outcome": FAILED_OUTCOME, "error": bug_message(error)}


def end_fields(run: Run, outcome: dict) -> dict:
    """The status.json fields of a run's end state, the one rule every runner uses.

    DONE: the result, not resumable. CANCELLED: no error, resumable (from its saved state, or from the
    start). FAILED: the message, resumable when the run saved a state that is not damaged
    (`damaged_state`: not resumable, and `not_resumable` says why).

    Args:
        run: the run (whether it has a saved state).
        outcome: {"outcome": "done" | "cancelled" | "failed", "result", "error", "damaged_state"}.
    """
    kind = outcome.get("outcome")
    if kind == DONE_OUTCOME:
        return {"state": DONE, "finished": now_iso(), "result": outcome.get("result"), "resumable": False}
    if kind == CANCELLED_OUTCOME:
        return {"state": CANCELLED, "finished": now_iso(), "error": None, "resumable": True}
    if kind != FAILED_OUTCOME:
        raise ValueError(f"unknown job outcome {kind!r}")
    damaged = bool(outcome.get("damaged_state"))
    return {"state": FAILED, "finished": now_iso(), "error": outcome.get("error"),
            "resumable": not damaged and run.has_state(), "not_resumable": outcome.get("error") if damaged else None}


def record_end(run: Run, outcome: dict) -> dict:
    """Write the run's end state (`end_fields`) into status.json; returns the new status."""
    return run.update_status(**end_fields(run, outcome))


def start_attempt(run: Run, target: str, **extra: Any) -> tuple[int, int]:
    """Mark the run RUNNING in this process (pid and its identity). Returns (pid, attempt number)."""
    pid = os.getpid()
    attempt = int(run.status().get("attempts") or 0) + 1
    run.update_status(state=RUNNING, pid=pid, pid_id=process_identity(pid), host=socket.gethostname(),
                      started=now_iso(), finished=None, error=None, result=None, resumable=False, attempts=attempt,
                      target=target, **extra)
    return pid, attempt


def call_target(run: Run, target: str, progress, cancel) -> Any:
    """Check the run's request again (`recare.jobs.checks.recheck`), then call the job function.

    Returns:
        The job's result as plain JSON (a result that is not JSON is a bug: TypeError).
    """
    from recare.jobs.checks import recheck

    recheck(run)
    fn = resolve_target(target)
    return json.loads(json.dumps(fn(run, progress, cancel)))


def run_job(run: Run, target: str, listener: Callable[[ProgressEvent], None] | None = None) -> dict:
    """Run one job to its end in this process and record how it ended in status.json.

    This is the body of every worker (process or thread); the CLI may call it to run a job in
    the foreground.

    Args:
        run: the run (its config.json holds the job's settings).
        target: the job function, "package.module:function".
        listener: also receives every progress event (the CLI draws them with tqdm).

    Returns:
        The final status.
    """
    pid, attempt = start_attempt(run, target)
    reporter = StatusReporter(run, listener)
    with Heartbeat(run, pid):
        try:
            outcome = outcome_of(run, attempt, result=call_target(run, target, reporter, run.cancel_token()))
        except BaseException as e:  # cancelled, a user error, or a bug (or an interrupt): see outcome_of
            outcome = outcome_of(run, attempt, e)
        reporter.flush()
        return record_end(run, outcome)


def process_main(run_path: str, target: str) -> None:
    """Entry point of a spawned worker process."""
    # Ctrl+C in the app's terminal reaches the whole process group; the app then cancels its jobs
    # (they save their state) instead of each worker dying mid-step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run_job(Run(run_path), target)
