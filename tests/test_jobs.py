"""recare.jobs: workers, queue, cancel/resume, a killed worker, user errors vs bugs, recover."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from recare import runs as R
from recare.errors import RunError
from recare.jobs import resolve_target, run_job
from tests.jobs_fixture import expected_value

ACCUMULATE = "tests.jobs_fixture:accumulate"
# How long a job may take to get somewhere: a spawned worker imports the library first, which on a loaded
# 2-core machine (two pytest-xdist workers, other work) takes far longer than the job. A bound, not a speed claim.
REACH_S = 120.0


def _wait_for(predicate, timeout=REACH_S, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _step(run) -> int:
    return run.status()["progress"]["step"]


def test_cancel_resume_finishes_with_the_uninterrupted_result(store, make_runner):
    runner = make_runner()  # spawned worker processes
    steps = 40
    run = runner.submit("train", ACCUMULATE, {"steps": steps, "sleep_s": 0.05}, owner="alice")
    _wait_for(lambda: _step(run) >= 4, what="a few steps")
    status = run.status()
    assert status["state"] == R.RUNNING and status["pid"] != os.getpid() and status["attempts"] == 1
    assert "Cancel requested" in runner.cancel(run.id, owner="alice")
    assert "already requested" in runner.cancel(run.id, owner="alice")  # twice: harmless
    status = runner.wait(run.id, timeout=REACH_S)
    assert status["state"] == R.CANCELLED and status["resumable"] is True
    stopped_at = status["progress"]["step"]
    assert 4 <= stopped_at < steps and run.has_state()
    assert "already cancelled" in runner.cancel(run.id, owner="alice")

    with pytest.raises(RunError):
        runner.resume(run.id, owner="mallory")
    runner.resume(run.id, owner="alice")
    status = runner.wait(run.id, timeout=REACH_S)
    assert status["state"] == R.DONE and status["attempts"] == 2 and status["error"] is None
    assert status["result"] == {"value": expected_value(steps), "steps": steps}
    # every step ran exactly once across the two attempts
    assert [row["step"] for row in run.read_metrics()] == list(range(1, steps + 1))
    assert not run.error_log_path.exists()
    assert "Nothing to cancel" in runner.cancel(run.id)
    with pytest.raises(RunError, match="only cancelled or failed"):
        runner.resume(run.id)


def test_a_killed_worker_reads_failed_and_resume_finishes_it(store, make_runner):
    runner = make_runner()
    steps = 30
    run = runner.submit("train", ACCUMULATE, {"steps": steps, "sleep_s": 0.04})
    _wait_for(lambda: _step(run) >= 3, what="a few steps")
    pid = json.loads(run.status_path.read_text())["pid"]
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    _wait_for(lambda: json.loads(run.status_path.read_text())["state"] == R.FAILED, timeout=5,
              what="status.json to say failed")
    assert time.monotonic() - killed_at < 5
    status = run.status()
    assert status["state"] == R.FAILED and status["resumable"] is True
    assert "the worker stopped unexpectedly" in status["error"]

    runner.resume(run.id)
    status = runner.wait(run.id, timeout=REACH_S)
    assert status["state"] == R.DONE and status["result"]["value"] == expected_value(steps)
    assert not [p for p in run.path.iterdir() if p.name.startswith(".state.")]  # no half-saved state left


def test_queue_positions_and_cancelling_a_queued_job(store, make_runner):
    runner = make_runner(max_cpu_jobs=1, use_processes=False)
    config = {"steps": 200, "sleep_s": 0.01}
    first = runner.submit("train", ACCUMULATE, config)
    second = runner.submit("train", ACCUMULATE, config)
    third = runner.submit("train", ACCUMULATE, config)
    gpu = runner.submit("train", ACCUMULATE, {"steps": 1, "sleep_s": 0.0}, device="cuda")  # its own slot
    _wait_for(lambda: first.status()["state"] == R.RUNNING, what="the first job to start")
    assert runner.queue_position(first.id) is None
    assert (runner.queue_position(second.id), runner.queue_position(third.id)) == (1, 2)
    assert second.status()["state"] == R.QUEUED
    assert runner.wait(gpu.id, timeout=REACH_S)["state"] == R.DONE  # did not wait behind the CPU queue

    assert "before it started" in runner.cancel(second.id)
    assert second.status()["state"] == R.CANCELLED and runner.queue_position(second.id) is None
    assert runner.queue_position(third.id) == 1
    assert "already cancelled" in runner.cancel(second.id)

    runner.cancel(first.id)
    assert runner.wait(first.id, timeout=REACH_S)["state"] == R.CANCELLED
    _wait_for(lambda: third.status()["state"] == R.RUNNING, what="the third job to start")
    assert second.status()["state"] == R.CANCELLED  # a cancelled queued job never starts
    runner.cancel(third.id)
    assert runner.wait(third.id, timeout=REACH_S)["state"] == R.CANCELLED


def test_a_user_error_fails_with_its_message(store, make_runner):
    runner = make_runner(use_processes=False)
    run = runner.submit("train", "tests.jobs_fixture:fail_user", {})
    status = runner.wait(run.id, timeout=REACH_S)
    assert status["state"] == R.FAILED
    assert status["error"] == "the loss became NaN at step 1; lower the learning rate"
    assert status["resumable"] is False and not run.error_log_path.exists()
    assert run.read_metrics()[0]["loss"] is None
    with pytest.raises(RunError, match="before it saved any state"):
        runner.resume(run.id)


def test_a_bug_fails_with_its_type_and_a_traceback_in_error_log(store, make_runner):
    runner = make_runner()
    run = runner.submit("train", "tests.jobs_fixture:fail_bug", {})
    status = runner.wait(run.id, timeout=REACH_S)
    assert status["state"] == R.FAILED and "unexpected error (KeyError)" in status["error"]
    assert "'missing'" not in status["error"]  # the exception's own text goes to error.log only
    log = run.error_log_path.read_text()
    assert "Traceback" in log and "fail_bug" in log and "KeyError" in log


def test_an_unknown_target_fails_the_run_and_a_malformed_one_is_refused(store, make_runner):
    runner = make_runner(use_processes=False)
    with pytest.raises(ValueError, match="package.module:function"):
        runner.submit("train", "not a target", {})
    run = runner.submit("train", "tests.jobs_fixture:no_such_job", {})
    status = runner.wait(run.id, timeout=REACH_S)
    assert status["state"] == R.FAILED and "(AttributeError)" in status["error"]
    assert resolve_target(ACCUMULATE).__name__ == "accumulate"


def test_owners_control_only_their_runs(store, make_runner):
    runner = make_runner(use_processes=False)
    run = runner.submit("train", ACCUMULATE, {"steps": 2, "sleep_s": 0.0}, owner="alice")
    runner.wait(run.id, timeout=REACH_S)
    for call in (lambda: runner.cancel(run.id, owner="bob"), lambda: runner.resume(run.id, owner="bob"),
                 lambda: store.delete(run.id, owner="bob"), lambda: store.get(run.id, owner="bob")):
        with pytest.raises(RunError, match="not yours"):
            call()
    assert store.list(owner="bob") == [] and store.list(owner="alice") == [run]


def test_recover_fails_dead_runs_and_queues_waiting_ones(store, make_runner):
    crashed = store.create("train", {"steps": 3, "sleep_s": 0.0}, target=ACCUMULATE, device="cpu")
    crashed.save_state(lambda folder: (folder / "state.json").write_text(json.dumps({"step": 1, "value": 7})))
    crashed.update_status(state=R.RUNNING, pid=2 ** 22 + 12345, host=socket.gethostname())  # no such pid
    waiting = store.create("train", {"steps": 3, "sleep_s": 0.0}, target=ACCUMULATE, device="cpu")
    runner = make_runner(use_processes=False)
    report = runner.recover()
    assert report == {"failed": [crashed.id], "queued": [waiting.id]}
    status = crashed.status()
    assert status["state"] == R.FAILED and status["resumable"] is True
    assert runner.wait(waiting.id, timeout=REACH_S)["state"] == R.DONE
    runner.resume(crashed.id)
    assert runner.wait(crashed.id, timeout=REACH_S)["state"] == R.DONE


def test_a_shut_down_runner_refuses_new_jobs_and_cancels_running_ones(store, make_runner):
    runner = make_runner(use_processes=False)
    run = runner.submit("train", ACCUMULATE, {"steps": 500, "sleep_s": 0.01})
    _wait_for(lambda: _step(run) >= 1, what="the job to start")
    runner.shutdown(timeout=5)
    assert run.status()["state"] == R.CANCELLED and run.status()["resumable"] is True
    with pytest.raises(RunError, match="shut down"):
        runner.submit("train", ACCUMULATE, {})


def test_run_job_in_the_foreground(store):
    run = store.create("train", {"steps": 5, "sleep_s": 0.0}, target=ACCUMULATE)
    status = run_job(run, ACCUMULATE)
    assert status["state"] == R.DONE and status["result"]["value"] == expected_value(5)
    assert status["progress"]["step"] == 5 and status["pid"] == os.getpid()



def test_auto_device_takes_the_slot_of_the_device_it_resolves_to():
    from recare.jobs.runner import _device_key
    from recare.models import resolve_device

    resolved = str(resolve_device("auto"))
    assert _device_key("auto") == _device_key(resolved) == ("cuda:0" if resolved == "cuda" else resolved)
    assert _device_key(None) == "cpu" and _device_key(" CUDA ") == "cuda:0"
