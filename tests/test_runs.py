"""recare.atomic (atomic file/folder writes) and recare.runs (the run store: owners, status, liveness, state, cancel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from recare import atomic as A
from recare import runs as R
from recare.errors import RunError
from recare.progress import ProgressEvent


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---- atomic writes --------------------------------------------------------------------------
def test_atomic_save_writes_through_a_temp_file_with_the_real_suffix(tmp_path):
    seen = []

    def write(tmp):
        seen.append(tmp)
        tmp.write_text("new")

    out = A.atomic_save(tmp_path / "sub" / "model.safetensors", write)
    assert out.read_text() == "new"
    assert seen[0].parent == out.parent and seen[0] != out and seen[0].name.endswith(".safetensors")
    assert _leftovers(out.parent) == []
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would make it, not mkstemp's 0600


def test_a_failing_writer_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_text("old")

    def half_then_crash(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        A.atomic_save(path, half_then_crash)
    assert path.read_text() == "old"
    assert _leftovers(tmp_path) == []
    with pytest.raises(ZeroDivisionError):
        A.atomic_write_json(tmp_path / "new.json", {"x": 1 / 0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pt"]


def test_atomic_write_dir_replaces_an_existing_folder(tmp_path):
    target = tmp_path / "unet"
    target.mkdir()
    (target / "stale.bin").write_text("old weights")
    with A.atomic_write_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and not any(tmp.iterdir())
        (tmp / "config.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_text("w")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "sub"]
    assert (target / "sub" / "w.bin").read_text() == "w"
    assert _leftovers(tmp_path) == []


def test_atomic_write_dir_failure_keeps_the_old_folder(tmp_path):
    target = tmp_path / "pipeline"
    target.mkdir()
    (target / "model.bin").write_text("old")
    with pytest.raises(RuntimeError, match="save failed"):
        with A.atomic_write_dir(target) as tmp:
            (tmp / "model.bin").write_text("partial")
            raise RuntimeError("save failed")
    assert [p.name for p in target.iterdir()] == ["model.bin"] and (target / "model.bin").read_text() == "old"
    assert _leftovers(tmp_path) == []
    with A.atomic_write_dir(tmp_path / "fresh") as tmp:  # no previous folder
        (tmp / "a").write_text("a")
    assert (tmp_path / "fresh" / "a").read_text() == "a"


# ---- root, ids, create/get/list/delete ------------------------------------------------------
def test_runs_root_explicit_env_and_default(tmp_path, monkeypatch):
    assert R.runs_root(tmp_path / "x") == (tmp_path / "x").resolve() and (tmp_path / "x").is_dir()
    monkeypatch.setenv("RECARE_HOME", str(tmp_path / "home"))
    assert R.runs_root() == (tmp_path / "home" / "runs").resolve()
    monkeypatch.delenv("RECARE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert R.runs_root() == (tmp_path / "user" / ".cache" / "recare" / "runs").resolve()


def test_create_writes_config_and_a_queued_status(tmp_path):
    store = R.RunStore(tmp_path)
    run = store.create("train", {"lr": 1e-5}, owner="alice", target="m:f", device="cpu")
    assert run.id.startswith("train-") and run.path.parent == store.root and run.kind == "train"
    assert run.config() == {"lr": 1e-5}
    status = run.status()
    assert set(status) >= {"id", "kind", "state", "owner", "created", "started", "updated", "finished", "progress",
                           "error", "pid", "host", "resumable", "attempts", "target", "result"}
    assert (status["id"], status["state"], status["owner"], status["target"]) == (run.id, R.QUEUED, "alice", "m:f")
    assert status["created"].endswith("+00:00")
    with pytest.raises(RunError):
        store.create("../evil", {})


@pytest.mark.parametrize("bad", ["../x", "/etc", "a/b", "..", ".", ".hidden", "", "a b", "x\\y", "a" * 200])
def test_bad_run_ids_are_refused(tmp_path, bad):
    store = R.RunStore(tmp_path / "runs")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "status.json").write_text("{}")  # a run-looking folder outside the root
    with pytest.raises(RunError, match="not a run id"):
        store.get(bad)


def test_owners_see_only_their_runs_plus_bundled_ones(tmp_path):
    bundled = tmp_path / "checkpoints" / "train-20250101-000000-abcdef"
    bundled.mkdir(parents=True)
    (bundled / "config.json").write_text("{}")
    store = R.RunStore(tmp_path / "runs", bundled=[bundled])
    a = store.create("train", {}, owner="alice")
    b = store.create("evaluate", {}, owner="bob")
    assert store.get(a.id, owner="alice") == a
    with pytest.raises(RunError, match="does not exist or is not yours"):
        store.get(a.id, owner="bob")
    with pytest.raises(RunError, match="does not exist or is not yours"):
        store.get("train-20990101-000000-000000", owner="alice")
    assert [r.id for r in store.list(owner="alice")] == [a.id, bundled.name]
    assert [r.id for r in store.list(owner="bob")] == [b.id, bundled.name]
    assert {r.id for r in store.list()} == {a.id, b.id, bundled.name}
    assert [r.id for r in store.list(owner="alice", kind="evaluate")] == []
    assert store.get(bundled.name, owner="bob").bundled
    assert store.get(bundled.name).status()["state"] == R.DONE
    with pytest.raises(RunError):
        store.delete(a.id, owner="bob")
    with pytest.raises(RunError, match="bundled"):
        store.delete(bundled.name, owner="bob")
    with pytest.raises(RunError, match="read-only"):
        store.get(bundled.name).update_status(state=R.FAILED)
    assert bundled.is_dir() and a.path.is_dir()


def test_list_is_newest_first_and_delete_refuses_live_runs(tmp_path):
    store = R.RunStore(tmp_path)
    first = store.create("train", {}, owner="o")
    second = store.create("train", {}, owner="o")
    first.update_status(created="2020-01-01T00:00:00.000+00:00")
    assert [r.id for r in store.list(owner="o")] == [second.id, first.id]
    with pytest.raises(RunError, match="cancel it first"):
        store.delete(second.id, owner="o")
    second.update_status(state=R.RUNNING, pid=os.getpid(), host=__import__("socket").gethostname())
    with pytest.raises(RunError, match="cancel it first"):
        store.delete(second.id, owner="o")
    second.update_status(state=R.DONE)
    (second.path / "big.bin").write_bytes(b"x" * 5000)
    assert second.size_bytes() >= 5000
    store.delete(second.id, owner="o")
    assert not second.path.exists() and [r.id for r in store.list()] == [first.id]
    assert _leftovers(tmp_path) == []


# ---- status, progress, metrics, state, cancel -----------------------------------------------
def test_report_updates_progress_and_appends_metrics(tmp_path):
    run = R.RunStore(tmp_path).create("train", {})
    run.report(ProgressEvent("stage1", 1, 10, "round 1"))
    run.report(ProgressEvent("stage2", 2, 10, "", {"loss": 0.5, "lr": 1e-5}))
    run.report(ProgressEvent("stage2", 3, 10, "", {"loss": float("nan")}))
    assert run.status()["progress"] == {"stage": "stage2", "step": 3, "total": 10, "message": "",
                                        "metrics": {"loss": None}}
    rows = run.read_metrics()
    assert [(r["stage"], r["step"], r["loss"]) for r in rows] == [("stage2", 2, 0.5), ("stage2", 3, None)]
    assert rows[0]["lr"] == 1e-5 and "time" in rows[0]
    assert len(run.metrics_path.read_text().splitlines()) == 2


def test_update_status_loses_no_update_between_threads(tmp_path):
    import threading

    run = R.RunStore(tmp_path).create("train", {})

    def write_keys(prefix):
        for i in range(15):  # each update reads, changes one key, writes: unlocked, keys would be lost
            run.update_status(**{f"{prefix}{i}": i})

    threads = [threading.Thread(target=write_keys, args=(p,)) for p in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status = json.loads(run.status_path.read_text())
    assert all(status[f"{p}{i}"] == i for p in "abcd" for i in range(15))
    assert run.update_status_if(lambda s: s["state"] == R.DONE, state=R.FAILED) is None
    assert run.status()["state"] == R.QUEUED


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_running_status_with_a_dead_worker_reads_and_is_saved_as_failed(tmp_path):
    import socket

    run = R.RunStore(tmp_path).create("train", {})
    run.update_status(state=R.RUNNING, pid=_dead_pid(), host=socket.gethostname())
    status = run.status()
    assert status["state"] == R.FAILED and status["resumable"] is False
    assert status["error"].startswith("the worker stopped unexpectedly (process")
    assert json.loads(run.status_path.read_text())["state"] == R.FAILED  # persisted, not only reported

    resumable = R.RunStore(tmp_path).create("train", {})
    resumable.save_state(lambda folder: (folder / "step.txt").write_text("3"))
    resumable.update_status(state=R.RUNNING, pid=_dead_pid(), host=socket.gethostname())
    assert resumable.status()["resumable"] is True


def test_a_killed_worker_not_yet_reaped_counts_as_dead(tmp_path):
    import signal
    import socket

    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    run = R.RunStore(tmp_path).create("train", {})
    run.update_status(state=R.RUNNING, pid=worker.pid, host=socket.gethostname())
    assert run.status()["state"] == R.RUNNING
    os.kill(worker.pid, signal.SIGKILL)
    try:
        deadline = time.monotonic() + 5
        while run.status()["state"] == R.RUNNING and time.monotonic() < deadline:
            time.sleep(0.01)  # the child is a zombie now (nobody waited for it): it must still read as gone
        assert run.status()["state"] == R.FAILED
    finally:
        worker.wait()


def test_another_hosts_worker_is_dead_after_a_stale_heartbeat(tmp_path):
    run = R.RunStore(tmp_path).create("train", {})
    run.update_status(state=R.RUNNING, pid=1, host="another-machine")
    assert run.status()["state"] == R.RUNNING  # heartbeat just now
    status = json.loads(run.status_path.read_text())
    status["updated"] = "2020-01-01T00:00:00.000+00:00"
    run.status_path.write_text(json.dumps(status))
    assert run.status()["state"] == R.FAILED and "no heartbeat" in run.status()["error"]


def test_live_worker_stays_running(tmp_path):
    import socket

    run = R.RunStore(tmp_path).create("train", {})
    run.update_status(state=R.RUNNING, pid=os.getpid(), host=socket.gethostname())
    assert run.status()["state"] == R.RUNNING


def test_save_state_swaps_the_whole_folder_and_a_failed_save_keeps_the_old_one(tmp_path):
    run = R.RunStore(tmp_path).create("train", {})
    assert not run.has_state()
    run.save_state(lambda folder: (folder / "a.txt").write_text("1"))
    run.save_state(lambda folder: (folder / "b.txt").write_text("2"))
    assert sorted(p.name for p in run.state_dir.iterdir()) == ["b.txt"]

    def crash(folder):
        (folder / "c.txt").write_text("partial")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError):
        run.save_state(crash)
    assert run.has_state() and sorted(p.name for p in run.state_dir.iterdir()) == ["b.txt"]
    # a crash between the two renames of the swap leaves only the old folder aside: it comes back
    os.replace(run.state_dir, run.path / ".state.old-1234abcd")
    assert run.has_state() and (run.state_dir / "b.txt").read_text() == "2"
    assert not [p for p in run.path.iterdir() if p.name.startswith(".state")]


def test_cancel_file_sets_the_token(tmp_path):
    run = R.RunStore(tmp_path).create("train", {})
    token = run.cancel_token()
    assert not token.is_set()
    run.request_cancel()
    assert run.cancel_path.exists() and token.is_set() and run.cancel_token().is_set()


def test_atomic_writes_live_only_in_atomic_py():
    """Defect 4: one atomic-write implementation (recare.atomic); every other module calls it."""
    import re
    from pathlib import Path

    import recare

    repo = Path(recare.__file__).parent.parent
    pattern = re.compile(r"\b(mkstemp|mkdtemp|os\.replace|os\.rename|\.rename\()")
    sources = [*(repo / "recare").rglob("*.py"), *(repo / "ui").rglob("*.py")]
    copies = [f"{path.relative_to(repo)}: {line.strip()}"
              for path in sorted(sources) if path not in (repo / "recare" / "atomic.py", repo / "recare" / "runs.py")
              for line in path.read_text(encoding="utf-8").splitlines() if pattern.search(line)]
    assert copies == []


def test_training_and_generation_code_do_not_import_the_run_store():
    """Modules that only write files use recare.atomic, not the run store (layering: runs sits above them)."""
    import re
    from pathlib import Path

    import recare

    repo = Path(recare.__file__).parent
    pattern = re.compile(r"^\s*(from recare\.runs import|import recare\.runs)", re.MULTILINE)
    modules = [repo / "generate.py", repo / "encoders.py", repo / "careset_io.py", repo / "train" / "recipe.py",
               repo / "train" / "export.py", repo / "train" / "preview.py", *(repo / "miniworld").glob("*.py")]
    assert [m.name for m in modules if pattern.search(m.read_text(encoding="utf-8"))] == []
