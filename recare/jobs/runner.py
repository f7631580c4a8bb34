"""The job runner: long work (training, evaluation) in worker processes that outlive a browser event.

A job is a module-level function named by its import path, so a fresh worker process, or an app
restarted after a crash, can find it:

    def train_job(run: Run, progress, cancel) -> dict | None:
        settings = run.config()
        step = load_step(run.state_dir) if run.has_state() else 0   # resume where it stopped
        for step in range(step, total):
            ...
            emit(progress, "train", step + 1, total, loss=loss)
            if step % 50 == 0 or cancel.is_set():
                run.save_state(lambda folder: save_step(folder, step + 1))
            cancel.raise_if_cancelled()      # raises recare.errors.Cancelled
        return {"final_loss": loss}          # stored as status["result"]

    runner = JobRunner(RunStore())
    run = runner.submit("train", "recare.train:train_job", config, owner=key, device="cuda:0")
    runner.cancel(run.id)   # the job saves its state and ends CANCELLED
    runner.resume(run.id)   # back in the queue; the job continues from state/

Scheduling: one GPU job at a time per device, at most `max_cpu_jobs` CPU jobs; the rest wait in
a FIFO queue. Jobs already running from another process on the same runs folder (an earlier app
whose worker survived it) count against the same limits. A worker is a spawned process by
default (`use_processes=False`: a thread of this process). It writes RUNNING with its pid,
heartbeats every `HEARTBEAT_S` seconds, reports events into status.json and metrics.jsonl, and
ends DONE (+ result), CANCELLED (resumable) or FAILED (a `RecareError`'s message as it is; any
other exception as "Type: message" with its traceback in error.log). A worker that dies
without a word (killed, out of memory) is reported FAILED by `Run.status()`, resumable when it
saved a state.

A run is judged alive by its pid together with that process's identity (boot id and start time,
`recare.runs.process_identity`), so a pid reused after a restart does not keep a dead run running.
`shutdown()` cancels the running jobs (they save their state) and marks them; the next
`recover()` queues those runs again, with a note, so an app restart loses no work.

On a Hugging Face Space with ZeroGPU (`recare.jobs.zerogpu.zerogpu_available()`), a GPU job instead
runs in a thread of this process whose GPU work goes through `spaces.GPU` calls, in chunks that resume
from state/ (`recare.jobs.zerogpu.ChunkedGpuRunner`); CPU jobs, and every job elsewhere, are unchanged.

The app and the CLI do not call `submit` with hand-made settings: they build typed requests
(`recare.jobs.requests`) whose `submit_requests` checks, copies and bounds everything first and
then calls `submit_many` here, which applies the quota to the whole batch at once.
"""

from __future__ import annotations

import atexit
import dataclasses
import multiprocessing
import multiprocessing.util  # noqa: F401  (imported before our atexit hook, so ours runs first)
import os
import shutil
import socket
import threading
import time
import weakref
from typing import Any

from recare.errors import RunError
from recare.jobs.worker import (
    _TARGET_PATTERN, CANCELLED_OUTCOME, FAILED_OUTCOME, end_fields, process_main, record_end, run_job,
)
from recare.runs import CANCELLED, FAILED, FINISHED, QUEUED, RUNNING, Run, RunStore, process_identity
from recare.timestamps import now_iso

SHUTDOWN_NOTE = "the app restarted while this run was working; it continues from its last saved state"

def _device_key(device: str | None) -> str:
    """The slot a job's device takes ("auto" resolved first, so it cannot slip past the one-GPU-job rule)."""
    device = (device or "cpu").strip().lower()
    if device == "auto":
        from recare.models.device import resolve_device

        device = str(resolve_device("auto"))
    return "cuda:0" if device == "cuda" else device


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """One job of a submission: what `JobRunner.submit_many` creates and queues.

    Attributes:
        kind: run kind ("train", "evaluate").
        target: the job function, "package.module:function" (see `recare.jobs.targets`).
        config: the job's settings (config.json).
        device: "cpu" or a torch device.
        stage: called with the new run before it is queued, to copy its inputs into the run folder
            (a browser session's files may be gone by the time the job starts); raising removes the run.
    """

    kind: str
    target: str
    config: dict
    device: str = "cpu"
    stage: Any = None


@dataclasses.dataclass
class _Worker:
    run_id: str
    device: str
    handle: Any  # multiprocessing Process or threading.Thread

    def alive(self) -> bool:
        return self.handle.is_alive()

    @property
    def pid(self) -> int | None:
        return getattr(self.handle, "pid", None)


def _shutdown_at_exit(ref: "weakref.ref[JobRunner]") -> None:
    runner = ref()
    if runner is not None:
        runner.shutdown()


class JobRunner:
    """Starts queued runs in workers, bounded per device; cancel, resume and recover runs.

    Args:
        store: the run store the jobs live in.
        max_cpu_jobs: CPU jobs running at once.
        max_gpu_jobs_per_device: jobs running at once on one GPU ("cuda:0", "mps", ...).
        use_processes: workers are spawned processes (default; a job can be killed, and a crash
            in it cannot take the app down); False runs them as threads of this process.
        poll_s: how often running workers are checked while some run.
    """

    def __init__(self, store: RunStore, max_cpu_jobs: int = 1, max_gpu_jobs_per_device: int = 1,
                 use_processes: bool = True, poll_s: float = 0.2):
        if max_cpu_jobs < 1 or max_gpu_jobs_per_device < 1:
            raise ValueError("max_cpu_jobs and max_gpu_jobs_per_device must be at least 1")
        self.store = store
        self.max_cpu_jobs = max_cpu_jobs
        self.max_gpu_jobs_per_device = max_gpu_jobs_per_device
        self.use_processes = use_processes
        self.poll_s = poll_s
        self._spawn = multiprocessing.get_context("spawn")  # fork is unsafe with CUDA and threads
        self._cond = threading.Condition()
        self._submit_lock = threading.Lock()
        self._queue: list[str] = []  # run ids waiting, oldest first
        self._active: dict[str, _Worker] = {}
        self._closed = False
        self._thread: threading.Thread | None = None
        from recare.jobs.zerogpu import zerogpu_runner

        self._zerogpu = zerogpu_runner()  # None unless on a ZeroGPU Space (made now: ZeroGPU looks at start-up)
        atexit.register(_shutdown_at_exit, weakref.ref(self))

    # -- public API ----------------------------------------------------------------------------
    def submit(self, kind: str, target: str, config: dict, owner: str = "", device: str = "cpu",
               client: str = "") -> Run:
        """Create a run and queue it; it starts when a slot for its device frees.

        Args:
            kind: run kind ("train", "evaluate", ...).
            target: the job function, "package.module:function".
            config: the job's settings (written to config.json).
            owner: who may see and control the run.
            device: "cpu" or a resolved torch device ("cuda:0", "mps"); one job at a time per GPU.
            client: who sent it (the app's client address; "" for the CLI), for the per-client limit.
        """
        return self.submit_many([JobSpec(kind, target, config, device)], owner=owner, client=client)[0]

    def submit_many(self, specs: list["JobSpec"], owner: str = "", client: str = "") -> list[Run]:
        """Create and queue several runs as one request: the quota is checked for all of them at once.

        Either every run is created (its inputs staged by `spec.stage`) and queued, or none is: a
        quota refusal or a failed staging removes the runs made so far.

        Args:
            specs: the jobs.
            owner: who may see and control the runs.
            client: who sent the request ("" for the CLI).

        Raises:
            RunError: the runner is shut down, or the batch would go over a limit (the message names it).
        """
        for spec in specs:
            if not _TARGET_PATTERN.match(spec.target or ""):
                raise ValueError(f"job target {spec.target!r} must look like 'package.module:function'.")
        created: list[Run] = []
        with self._submit_lock:  # one batch at a time: two requests cannot both pass the same quota
            if self._closed:
                raise RunError("the job runner is shut down; restart the app to start jobs.")
            self.store.check_quota(owner, client=client, count=len(specs))
            try:
                for spec in specs:
                    run = self.store.create(spec.kind, spec.config, owner=owner, target=spec.target,
                                            device=_device_key(spec.device), client=client, quota=False)
                    created.append(run)
                    if spec.stage is not None:
                        spec.stage(run)
            except BaseException:
                for run in created:
                    shutil.rmtree(run.path, ignore_errors=True)
                raise
            with self._cond:
                self._queue.extend(run.id for run in created)
                self._wake()
        return created

    def cancel(self, run_id: str, owner: str | None = None) -> str:
        """Cancel a run: a queued one at once, a running one at its next cancel check.

        Cancelling twice, or cancelling a finished run, does nothing and says so.

        Args:
            run_id: the run.
            owner: who asks (None: no owner check).

        Returns:
            A short message saying what happened.
        """
        run = self.store.get(run_id, owner)
        if run.bundled:
            return f"Nothing to cancel: {run_id} is a bundled run."
        with self._cond:
            status = run.status()
            if status["state"] == QUEUED:
                cancelled = run.update_status_if(lambda s: s.get("state") == QUEUED,
                                                 **end_fields(run, {"outcome": CANCELLED_OUTCOME}))
                if cancelled is not None:
                    if run_id in self._queue:
                        self._queue.remove(run_id)
                    return f"Cancelled {run_id} before it started."
                status = run.status()  # another runner started it meanwhile: cancel the running job
            if status["state"] == RUNNING:
                if run.cancel_path.exists():
                    return f"Cancel of {run_id} was already requested; it stops at its next step."
                run.request_cancel()
                return f"Cancel requested: {run_id} saves its state and stops at its next step."
            return f"Nothing to cancel: {run_id} is already {status['state']}."

    def resume(self, run_id: str, owner: str | None = None, client: str = "") -> Run:
        """Queue a cancelled run, or a failed run that saved a state, again (same target and config).

        The job continues from its saved state (`run.has_state()`).

        Args:
            run_id: the run.
            owner: who asks (None: no owner check).
            client: who sent the request (the per-client limit; "" for the CLI).
        """
        run = self.store.get(run_id, owner)
        if run.bundled:
            raise RunError(f"run {run_id} is bundled with the app and read-only.")
        with self._submit_lock, self._cond:
            if self._closed:
                raise RunError("the job runner is shut down; restart the app to resume jobs.")
            status = run.status()
            state = status.get("state")
            if state == FAILED and not status.get("resumable"):
                why = status.get("not_resumable") or "it failed before it saved any state"
                raise RunError(f"run {run_id} cannot be resumed: {why}; start a new run instead.")
            if state not in (CANCELLED, FAILED):
                raise RunError(f"run {run_id} is {state}; only cancelled or failed runs can be resumed.")
            if not status.get("target"):
                raise RunError(f"run {run_id} does not say which job it runs (no target); it cannot be resumed.")
            self.store.check_quota(str(status.get("owner") or ""), client=client)  # a resumed run is one more job
            run.cancel_path.unlink(missing_ok=True)
            queued = run.update_status_if(lambda s: s.get("state") in (CANCELLED, FAILED), state=QUEUED,
                                          error=None, finished=None, result=None, pid=None, pid_id=None,
                                          note=None, client=client or status.get("client") or "")
            if queued is None:
                raise RunError(f"run {run_id} changed state meanwhile; look at it again.")
            self._queue.append(run_id)
            self._wake()
        return run

    def queue_position(self, run_id: str) -> int | None:
        """1 for the next job to start on its device, 2 for the one after, ...; None when not waiting here."""
        with self._cond:
            if run_id not in self._queue:
                return None
            device = self._device_of(run_id)
            ahead = [r for r in self._queue[: self._queue.index(run_id)] if self._device_of(r) == device]
            return len(ahead) + 1

    def wait(self, run_id: str, timeout: float | None = None) -> dict:
        """Wait until the run is done, failed or cancelled (or `timeout` seconds pass).

        Args:
            run_id: the run.
            timeout: seconds to wait at most (None: no limit).

        Returns:
            The run's status at that moment (check `state`: it may still be queued or running).
        """
        run = self.store.get(run_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = run.status()
            if status.get("state") in FINISHED or (deadline is not None and time.monotonic() >= deadline):
                return status
            time.sleep(0.05)

    def recover(self) -> dict[str, list[str]]:
        """At start-up: report runs whose worker is gone as FAILED, and queue the runs still QUEUED.

        A RUNNING run whose worker still runs (another process on this folder) is left alone and
        counts against the device limits. Runs that a shutdown stopped (`shutdown()` marks them)
        are queued again with a note, and continue from their saved state.

        Returns:
            {"failed": ids now failed (resumable when they saved a state), "queued": ids queued here}.
        """
        failed, queued = [], []
        with self._cond:
            for run in reversed(self.store.list()):  # oldest first, so the queue keeps their order
                if run.bundled:
                    continue
                try:
                    before = run.stored_status()
                    after = run.status()  # persists FAILED when the worker is gone
                except RunError:
                    continue
                if after.get("stopped_by_shutdown") and after.get("state") in (CANCELLED, FAILED, RUNNING):
                    if self._requeue_after_shutdown(run):
                        queued.append(run.id)
                    continue
                if before.get("state") == RUNNING and after.get("state") == FAILED:
                    failed.append(run.id)
                elif after.get("state") == QUEUED and after.get("target") and run.id not in self._queue:
                    self._queue.append(run.id)
                    queued.append(run.id)
            if queued:
                self._wake()
        return {"failed": failed, "queued": queued}

    def shutdown(self, cancel_running: bool = True, timeout: float = 10.0) -> None:
        """Stop starting jobs; cancel the running ones (they save their state) and wait for them.

        Processes still alive after `timeout` are terminated; their runs then read FAILED
        (resumable from the last saved state). Queued runs stay QUEUED for the next `recover()`.

        Args:
            cancel_running: ask running jobs to stop (False: only wait for them).
            timeout: seconds to wait for the workers.
        """
        with self._cond:
            if self._closed and not self._active:
                return
            self._closed = True
            workers = list(self._active.values())
            self._cond.notify_all()
        if cancel_running:
            for worker in workers:
                try:
                    run = self.store.get(worker.run_id)
                    # marked first, so the next recover() queues it again; a run the user cancelled stays cancelled
                    run.update_status_if(lambda s: s.get("state") == RUNNING and not run.cancel_path.exists(),
                                         stopped_by_shutdown=True)
                    run.request_cancel()
                except (RunError, OSError):
                    pass
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.handle.join(max(0.0, deadline - time.monotonic()))
            if worker.alive() and not isinstance(worker.handle, threading.Thread):
                worker.handle.terminate()
                worker.handle.join(2.0)
                if worker.alive():
                    worker.handle.kill()
                    worker.handle.join(2.0)
        with self._cond:
            self._reap()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def _requeue_after_shutdown(self, run: Run) -> bool:
        """Queue a run that a shutdown stopped (caller holds the lock); False when it cannot resume."""
        if run.id in self._queue or not run.stored_status().get("target"):
            return False
        if run.status().get("state") == RUNNING:  # its worker still runs (another app on this folder)
            return False
        run.cancel_path.unlink(missing_ok=True)
        queued = run.update_status_if(
            lambda s: s.get("state") in (CANCELLED, FAILED) and s.get("stopped_by_shutdown")
            and (s.get("state") == CANCELLED or s.get("resumable")),
            state=QUEUED, error=None, finished=None, result=None, pid=None, pid_id=None, stopped_by_shutdown=False,
            note=SHUTDOWN_NOTE)
        if queued is None:
            return False
        self._queue.append(run.id)
        return True

    # -- scheduling ----------------------------------------------------------------------------
    def _wake(self) -> None:
        """Start the scheduler thread on first use, and make it look at the queue now (caller holds the lock)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="recare-job-runner", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def _loop(self) -> None:
        with self._cond:
            while not self._closed:
                self._reap()
                self._start_ready()
                self._cond.wait(self.poll_s if (self._active or self._queue) else None)

    def _device_of(self, run_id: str) -> str:
        try:
            return _device_key(self.store.get(run_id).stored_status().get("device"))
        except RunError:
            return "cpu"

    def _limit(self, device: str) -> int:
        return self.max_cpu_jobs if device == "cpu" else self.max_gpu_jobs_per_device

    def _foreign_running(self) -> dict[str, int]:
        """RUNNING runs of other processes on this runs folder whose worker is alive, per device."""
        counts: dict[str, int] = {}
        for run in self.store.list():
            if run.bundled or run.id in self._active:
                continue
            try:
                status = run.stored_status()
                if status.get("state") == RUNNING and run.status().get("state") == RUNNING:
                    device = _device_key(status.get("device"))
                    counts[device] = counts.get(device, 0) + 1
            except RunError:
                continue
        return counts

    def _start_ready(self) -> None:
        """Start every queued run whose device has a free slot (caller holds the lock)."""
        if not self._queue:
            return
        busy: dict[str, int] = {}
        for worker in self._active.values():
            busy[worker.device] = busy.get(worker.device, 0) + 1
        foreign: dict[str, int] | None = None
        for run_id in list(self._queue):
            device = self._device_of(run_id)
            if busy.get(device, 0) >= self._limit(device):
                continue
            if foreign is None:
                foreign = self._foreign_running()  # only read when a slot looks free
                for key, n in foreign.items():
                    busy[key] = busy.get(key, 0) + n
                if busy.get(device, 0) >= self._limit(device):
                    continue
            self._queue.remove(run_id)
            if self._start(run_id, device):
                busy[device] = busy.get(device, 0) + 1

    def _start(self, run_id: str, device: str) -> bool:
        """Claim a queued run (QUEUED -> RUNNING, so no other runner starts it) and start its worker."""
        try:
            run = self.store.get(run_id)
            claimed = run.update_status_if(lambda s: s.get("state") == QUEUED, state=RUNNING, pid=os.getpid(),
                                           pid_id=process_identity(os.getpid()), host=socket.gethostname(),
                                           started=now_iso())
        except RunError:  # deleted meanwhile
            return False
        if claimed is None:  # cancelled, or started by another runner
            return False
        target = claimed["target"]
        if self._zerogpu is not None and device != "cpu":  # ZeroGPU: spaces.GPU chunks called from a thread here
            handle = threading.Thread(target=self._zerogpu.run_job, args=(run, target), name=f"recare-job-{run_id}",
                                      daemon=True)
        elif self.use_processes:
            handle = self._spawn.Process(target=process_main, args=(str(run.path), target),
                                         name=f"recare-job-{run_id}")
        else:
            handle = threading.Thread(target=run_job, args=(run, target), name=f"recare-job-{run_id}", daemon=True)
        try:
            handle.start()
        except BaseException as e:
            record_end(run, {"outcome": FAILED_OUTCOME, "error": f"could not start the worker: {e}"})
            return False
        if not isinstance(handle, threading.Thread):  # until the worker writes its own pid, watch the process
            run.update_status_if(lambda s: s.get("state") == RUNNING and s.get("pid") == os.getpid(), pid=handle.pid,
                                 pid_id=process_identity(handle.pid))
        self._active[run_id] = _Worker(run_id, device, handle)
        return True

    def _reap(self) -> None:
        """Forget finished workers; a process that died without writing its end is marked FAILED."""
        for run_id, worker in list(self._active.items()):
            if worker.alive():
                continue
            worker.handle.join()
            del self._active[run_id]
            exitcode = getattr(worker.handle, "exitcode", None)
            pid = worker.pid
            try:
                run = self.store.get(run_id)
                run.update_status_if(
                    lambda s: s.get("state") == RUNNING and (pid is None or s.get("pid") == pid),
                    **end_fields(run, {"outcome": FAILED_OUTCOME,
                                       "error": f"the worker stopped unexpectedly (exit code {exitcode})"}))
            except RunError:
                pass
