"""Run folders: the persistent run store for long jobs (atomic writes live in `recare.atomic`).

The run store keeps one folder per job (training, evaluation, ...) under one root that outlives
a browser tab and the app process: `$RECARE_HOME/runs` when RECARE_HOME is set, else
`~/.cache/recare/runs`, or an explicit folder (`--runs-dir`). A run folder holds:

    config.json     the job's settings (written once, at creation)
    status.json     id, kind, state, owner, created, started, updated, finished, progress,
                    error, pid, host, resumable, attempts, target, device, result
    metrics.jsonl   one JSON object per progress event that carried metrics (append-only;
                    written and read by `recare.metrics_io`)
    state/          the job's resume state, replaced as a whole by `Run.save_state`
    cancel          present when a cancel was requested (the job stops at its next check)
    error.log       tracebacks of failures that were bugs, not user errors

A run folder is named `<kind>-<YYYYmmdd-HHMMSS>-<6 hex>` so two runs started in the same second
(two app users, two CLI calls) never share a folder. A browser sees only the runs it owns
(`owner`), plus read-only bundled runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from recare.atomic import atomic_write_dir, atomic_write_json, restore_interrupted_swap
from recare.errors import RunError
from recare.limits import Limits, human_bytes
from recare.metrics_io import METRICS_LINES, append_metrics, read_metrics_lines
from recare.progress import CancelToken, ProgressEvent
from recare.timestamps import now_iso, to_seconds

_KIND_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# A run id is one plain folder name: no separators, no "." or "..", no leading dot or dash.
_RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
FINISHED = (DONE, FAILED, CANCELLED)

HEARTBEAT_S = 2.0  # a running job bumps status.json's `updated` at least this often
STALE_S = 60.0  # a RUNNING run whose pid cannot be checked (other host) is dead after this long without a heartbeat


# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------
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
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        root.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            path = root / f"{kind}-{stamp}-{secrets.token_hex(3)}"
            try:
                path.mkdir()  # exist_ok=False: mkdir is atomic, so a collision raises instead of sharing
            except FileExistsError:
                continue
            return path
    except OSError as e:  # a runs folder the user named that cannot be written (a file, read-only, ...)
        raise RunError(f"cannot create a run folder under {root}: {e.strerror or e}; pick a writable folder.") from e
    raise RuntimeError(f"could not create a unique run folder under {root}")


def runs_root(path: str | Path | None = None) -> Path:
    """The folder that holds every run, created on demand.

    Args:
        path: an explicit folder (`--runs-dir`); default `$RECARE_HOME/runs` when RECARE_HOME is
            set, else `~/.cache/recare/runs`.
    """
    if path is not None:
        root = Path(path)
    elif os.environ.get("RECARE_HOME"):
        root = Path(os.environ["RECARE_HOME"]) / "runs"
    else:
        root = Path("~/.cache/recare/runs")
    root = root.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def check_run_id(run_id: str) -> str:
    """Return `run_id` if it is one plain folder name, else raise RunError (no '/', '..', absolute paths)."""
    if not isinstance(run_id, str) or not _RUN_ID_PATTERN.match(run_id):
        raise RunError(f"{run_id!r} is not a run id (expected a folder name like 'train-20250101-120000-a1b2c3').")
    return run_id


def _age_s(stamp: str | None) -> float:
    """Seconds since an ISO-8601 timestamp (infinite when missing or unreadable)."""
    then = to_seconds(stamp) if stamp is not None else None
    return float("inf") if then is None else time.time() - then


def _pid_alive(pid: int) -> bool | None:
    """Whether process `pid` runs on this machine (None: cannot tell on this OS). A zombie is dead."""
    if os.name != "posix":
        return None  # os.kill on Windows terminates the process instead of probing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:  # a killed child stays a zombie until its parent reaps it; it runs no code any more
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _boot_id() -> str:
    """This machine's boot id (Linux), else "" (a reboot gives a new one)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_identity(pid: int | None) -> str | None:
    """"<boot id>:<start time>" of process `pid` (Linux), None where it cannot be read.

    A pid alone does not name a process across restarts: a container that restarts gives its
    first processes the same small pids again. The boot id and the process's start time (clock
    ticks since boot, /proc/<pid>/stat field 22) do.

    Args:
        pid: a process id.
    """
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        start = stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError, ValueError):
        return None
    return f"{_boot_id()}:{start}"


def worker_gone(status: dict) -> str | None:
    """Why the worker of a RUNNING status is no longer running, or None when it may be alive.

    On the same host the worker's pid and its identity (`process_identity`, recorded beside the
    pid) decide: a pid that now belongs to another process (reused after a restart) is gone too.
    Elsewhere (a shared runs folder) a heartbeat older than STALE_S does.

    Args:
        status: a status.json dict.
    """
    pid, host = status.get("pid"), status.get("host")
    if pid and host == socket.gethostname():
        alive = _pid_alive(int(pid))
        if alive is False:
            return f"process {pid} is gone"
        recorded = status.get("pid_id")
        if alive and recorded and process_identity(int(pid)) not in (None, recorded):
            return f"process {pid} is gone (its pid now belongs to another process)"
        if alive:
            return None
    age = _age_s(status.get("updated"))
    if age > STALE_S:
        return f"no heartbeat for {age:.0f} s"
    return None


def _new_status(run_id: str, kind: str, owner: str, target: str | None, device: str | None,
                client: str = "") -> dict:
    stamp = now_iso()
    return {
        "id": run_id, "kind": kind, "state": QUEUED, "owner": owner, "client": client,
        "created": stamp, "started": None, "updated": stamp, "finished": None,
        "progress": {"stage": "", "step": 0, "total": 0, "message": "", "metrics": {}},
        "error": None, "pid": None, "host": None, "resumable": False, "attempts": 0,
        "target": target, "device": device, "result": None,
    }


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes and threads (flock on a lock file; one per open file)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; status updates are then only atomic, not serialised
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class Run:
    """A handle on one run folder. Cheap to create; every call reads the files (no cached state).

    Args:
        path: the run folder.
        bundled: a read-only run shipped with the app (visible to every owner, never changed).
    """

    def __init__(self, path: str | Path, bundled: bool = False):
        self.path = Path(path)
        self.bundled = bundled

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}{', bundled=True' if self.bundled else ''})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Run) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def kind(self) -> str:
        return str(self.stored_status().get("kind") or self.id.rsplit("-", 3)[0])

    config_path = property(lambda self: self.path / "config.json")
    status_path = property(lambda self: self.path / "status.json")
    metrics_path = property(lambda self: self.path / METRICS_LINES)
    error_log_path = property(lambda self: self.path / "error.log")
    cancel_path = property(lambda self: self.path / "cancel")
    state_dir = property(lambda self: self.path / "state")

    # -- config and status ---------------------------------------------------------------------
    def config(self) -> dict:
        """The job's settings (config.json)."""
        try:
            return json.loads(self.config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunError(f"run {self.id} has no config.json") from None
        except json.JSONDecodeError as e:
            raise RunError(f"run {self.id}: config.json is not valid JSON ({e})") from None

    def stored_status(self) -> dict:
        """status.json exactly as stored (no liveness check; see `status`)."""
        try:
            return json.loads(self.status_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            if self.bundled:  # a shipped result folder need not carry a status.json
                return {**_new_status(self.id, self.id.rsplit("-", 3)[0], "", None, None), "state": DONE,
                        "created": None, "updated": None}
            raise RunError(f"run {self.id} has no status.json (deleted or not a run folder)") from None
        except json.JSONDecodeError as e:
            raise RunError(f"run {self.id}: status.json is not valid JSON ({e})") from None

    def status(self) -> dict:
        """status.json as a dict. A RUNNING run whose worker is gone is reported, and saved, as FAILED.

        The error then reads "the worker stopped unexpectedly (...)", and `resumable` is True
        when the job saved a resume state.
        """
        status = self.stored_status()
        if status.get("state") != RUNNING or self.bundled or worker_gone(status) is None:
            return status
        pid = status.get("pid")

        def still_dead(current: dict) -> bool:  # re-checked under the lock: a new attempt may have started
            return current.get("state") == RUNNING and current.get("pid") == pid and worker_gone(current) is not None

        why = worker_gone(status)
        changed = self.update_status_if(still_dead, state=FAILED, finished=now_iso(), resumable=self.has_state(),
                                        error=f"the worker stopped unexpectedly ({why})")
        return changed if changed is not None else self.stored_status()

    def update_status_if(self, condition: Callable[[dict], bool], **fields: Any) -> dict | None:
        """Atomically apply `fields` to status.json if `condition(current status)` holds.

        The read-modify-write runs under a file lock (safe between threads and processes) and
        bumps `updated`.

        Args:
            condition: called with the current status dict.
            **fields: status fields to set.

        Returns:
            The new status, or None when the condition did not hold (nothing written).
        """
        if self.bundled:
            raise RunError(f"run {self.id} is bundled with the app and read-only.")
        with _file_lock(self.path / ".status.lock"):
            current = self.stored_status()
            if not condition(current):
                return None
            current.update(fields)
            current["updated"] = now_iso()
            atomic_write_json(self.status_path, current)
            return current

    def update_status(self, **fields: Any) -> dict:
        """Atomically set `fields` in status.json (read-modify-write under a file lock); bumps `updated`.

        Args:
            **fields: status fields to set, e.g. `state=DONE, result={...}`.

        Returns:
            The new status.
        """
        return self.update_status_if(lambda _: True, **fields)

    # -- progress and metrics ------------------------------------------------------------------
    def append_metrics(self, event: ProgressEvent) -> None:
        """Append `{"stage","step","total", **metrics, "time"}` to metrics.jsonl (`recare.metrics_io.append_metrics`)."""
        append_metrics(self.path, event)

    def report(self, event: ProgressEvent, write_status: bool = True) -> None:
        """Record one progress event: status["progress"] and, with metrics, a metrics.jsonl line.

        Args:
            event: the event.
            write_status: False to only append metrics (a caller throttling status writes).
        """
        self.append_metrics(event)
        if write_status:
            self.update_status(progress=event.to_dict())

    def read_metrics(self) -> list[dict]:
        """Every metrics.jsonl line, oldest first (`recare.metrics_io.read_metrics_lines`)."""
        return read_metrics_lines(self.path)

    # -- cancel --------------------------------------------------------------------------------
    def cancel_token(self) -> CancelToken:
        """A token that is set when the cancel file exists (works across processes and restarts)."""
        return CancelToken(path=self.cancel_path)

    def request_cancel(self) -> None:
        """Create the cancel file; the job stops at its next check."""
        self.cancel_path.touch()

    # -- resume state --------------------------------------------------------------------------
    def save_state(self, write: Callable[[Path], None]) -> Path:
        """Write the resume state: `write(folder)` fills a fresh folder that then replaces state/ at once.

        A crash while saving keeps the previous state/.

        Args:
            write: called with an empty folder to write the state into.

        Returns:
            The state folder.
        """
        for leftover in self.path.glob(".state.tmp-*"):  # from a worker killed mid-save
            shutil.rmtree(leftover, ignore_errors=True)
        with atomic_write_dir(self.state_dir) as tmp:
            write(tmp)
        return self.state_dir

    def has_state(self) -> bool:
        """Whether the job saved a resume state."""
        restore_interrupted_swap(self.state_dir)
        return self.state_dir.is_dir()

    # -- size ----------------------------------------------------------------------------------
    def size_bytes(self) -> int:
        """Bytes used by the run folder's files (links not followed)."""
        total = 0
        for folder, _, files in os.walk(self.path):
            for name in files:
                try:
                    total += (Path(folder) / name).lstat().st_size
                except OSError:
                    continue
        return total


class RunStore:
    """Every run under one root folder, with owners: a browser sees its own runs and bundled ones.

    Args:
        root: the runs folder (see `runs_root` for the default).
        bundled: run folders shipped with the app: listed for every owner, never changed or deleted.
        limits: `jobs_per_owner` and `owner_disk_bytes` bound what one owner may start (default
            `Limits.from_env()`); runs without an owner (the CLI's) are not bounded.
    """

    def __init__(self, root: str | Path | None = None, bundled: tuple[str | Path, ...] | list = (),
                 limits: Limits | None = None):
        self.root = runs_root(root)
        self.bundled = tuple(Path(b).expanduser().resolve() for b in bundled)
        self.limits = limits or Limits.from_env()

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    def create(self, kind: str, config: dict, owner: str = "", target: str | None = None,
               device: str | None = None, client: str = "", quota: bool = True) -> Run:
        """Create a run folder with config.json and a QUEUED status.json.

        Args:
            kind: what the run does ("train", "evaluate", ...); letters, digits, `_`, `-`.
            config: the job's settings (JSON-able).
            owner: who may see it (a browser key or user name; "" for the CLI).
            target: the job function "package.module:function" (set by the job runner).
            device: the device the job runs on ("cpu", "cuda:0", ...).
            client: who sent the request (the app's client address, hashed; "" for the CLI).
            quota: check the limits first (`check_quota`); False when the caller checked them for
                a whole batch.
        """
        if not _KIND_PATTERN.match(kind):
            raise RunError(f"run kind {kind!r} must be letters, digits, '_' or '-' (e.g. 'train').")
        if quota:
            self.check_quota(owner, client=client)
        path = new_run_dir(self.root, kind)
        run = Run(path)
        try:
            atomic_write_json(run.config_path, config)
            atomic_write_json(run.status_path, _new_status(run.id, kind, str(owner), target, device, str(client)))
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        return run

    def check_quota(self, owner: str, client: str = "", count: int = 1) -> None:
        """RunError when `count` more jobs may not start: the limits on queued + running jobs (in total,
        per client address, per owner) and on disk (all runs, one owner's runs).

        The owner key separates visitors' runs, but a client picks its own key, so the server is
        bounded by the totals and the client address, not by keys.

        Args:
            owner: who wants to start the jobs; "" with no client (the CLI) is never bounded.
            client: the client address the request came from ("" when unknown).
            count: jobs the request starts together (all or nothing).
        """
        if not owner and not client:
            return
        limits = self.limits
        mine = [run for run in self.list() if not run.bundled]
        statuses = []
        for run in mine:
            try:
                statuses.append((run, run.stored_status()))
            except RunError:
                continue
        active = [(run, st) for run, st in statuses if st.get("state") in (QUEUED, RUNNING)]
        asks = f"this request starts {count} jobs" if count != 1 else "this request starts a job"

        def refuse(field: str, what: str, advice: str) -> RunError:
            return RunError(limits.exceeded(field, f"{asks} and {what}") + f" Nothing was started; {advice}")

        if count > limits.jobs_per_owner:
            raise RunError(limits.exceeded("jobs_per_owner", asks) + " Nothing was started.")
        if len(active) + count > limits.jobs_total:
            raise refuse("jobs_total", f"the server has {len(active)} jobs queued or running",
                         "try again when some have finished.")
        if client:
            from_client = sum(1 for _, st in active if st.get("client") == client)
            if from_client + count > limits.jobs_per_client:
                raise refuse("jobs_per_client", f"{from_client} jobs from your address are queued or running",
                             "wait for one to finish or cancel one.")
        if owner:
            own = sum(1 for _, st in active if st.get("owner") == owner)
            if own + count > limits.jobs_per_owner:
                raise refuse("jobs_per_owner", f"you have {own} jobs queued or running",
                             "wait for one to finish or cancel one.")
            used = sum(run.size_bytes() for run, st in statuses if st.get("owner") == owner)
            if used >= limits.owner_disk_bytes:
                raise RunError(limits.exceeded("owner_disk_bytes", f"your runs take {human_bytes(used)}") +
                               " Delete old runs to start new ones.")
        total = sum(run.size_bytes() for run, _ in statuses)
        if total >= limits.runs_disk_bytes:
            raise RunError(limits.exceeded("runs_disk_bytes", f"the server's runs take {human_bytes(total)}") +
                           " Nothing was started; try again later.")

    def _find(self, run_id: str) -> Run | None:
        check_run_id(run_id)
        path = self.root / run_id
        if (path / "status.json").is_file():
            return Run(path)
        for folder in self.bundled:
            if folder.name == run_id and folder.is_dir():
                return Run(folder, bundled=True)
        return None

    def get(self, run_id: str, owner: str | None = None) -> Run:
        """The run `run_id`; RunError when missing, not a plain folder name, or not `owner`'s.

        Args:
            run_id: the run folder's name.
            owner: who asks; None skips the check (CLI, maintenance). Bundled runs are everyone's.
        """
        run = self._find(run_id)
        if run is None or (owner is not None and not run.bundled and run.stored_status().get("owner") != owner):
            # one message for both cases: a run id never tells whether it exists for someone else
            raise RunError(f"run {run_id!r} does not exist or is not yours.")
        return run

    def list(self, owner: str | None = None, kind: str | None = None) -> list[Run]:
        """`owner`'s runs newest first (owner None: every run), then the bundled ones in their given order.

        Args:
            owner: whose runs; None for all.
            kind: only runs of this kind.
        """
        found: list[tuple[str, Run]] = []
        for path in self.root.iterdir() if self.root.is_dir() else ():
            if path.name.startswith(".") or not (path / "status.json").is_file():
                continue
            try:
                status = Run(path).stored_status()
            except RunError:
                continue
            if owner is not None and status.get("owner") != owner:
                continue
            if kind is not None and status.get("kind") != kind:
                continue
            found.append((str(status.get("created") or ""), Run(path)))
        found.sort(key=lambda item: (item[0], item[1].id), reverse=True)
        bundled = [Run(folder, bundled=True) for folder in self.bundled if folder.is_dir()]
        return [run for _, run in found] + [run for run in bundled if kind is None or run.kind == kind]

    def delete(self, run_id: str, owner: str | None) -> None:
        """Delete a run folder and everything in it.

        Refused for bundled runs and for queued or running runs (cancel them first).

        Args:
            run_id: the run.
            owner: who asks (None: no owner check).
        """
        run = self.get(run_id, owner)
        if run.bundled:
            raise RunError(f"run {run_id} is bundled with the app and cannot be deleted.")
        state = run.status().get("state")
        if state in (QUEUED, RUNNING):
            raise RunError(f"run {run_id} is {state}: cancel it first, then delete it.")
        # rename first, so listing never sees a half-deleted run
        doomed = self.root / f".deleting-{run_id}-{secrets.token_hex(3)}"
        os.replace(run.path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
