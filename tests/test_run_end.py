"""One end-state rule (`recare.jobs.worker.outcome_of` + `end_fields`) for a job run in a worker and for the
same job run as ZeroGPU chunks: done, cancelled, a user error, a damaged saved state and a bug end alike."""

from __future__ import annotations

import json

import pytest

from recare.errors import StateError
from recare.jobs.worker import end_fields, run_job
from recare.jobs.zerogpu import ChunkedGpuRunner, ChunkPolicy
from recare.runs import CANCELLED, DONE, FAILED, RunStore
from tests.jobs_fixture import expected_value
from tests.test_zerogpu import FakeSpaces

COMPARED = ("state", "error", "resumable", "not_resumable", "result")


def damaged_state(run, progress, cancel) -> None:
    """A job whose saved state cannot be read (it saved one first, as a resumed job would have)."""
    run.save_state(lambda folder: (folder / "state.json").write_text("{torn"))
    raise StateError("the saved state is damaged: start a new run")


CASES = {
    "done": ("tests.jobs_fixture:accumulate", {"steps": 3, "sleep_s": 0.0}, False),
    "cancelled": ("tests.jobs_fixture:accumulate", {"steps": 3, "sleep_s": 0.0}, True),
    "user error": ("tests.jobs_fixture:fail_user", {}, False),
    "damaged state": ("tests.test_run_end:damaged_state", {}, False),
    "bug": ("tests.jobs_fixture:fail_bug", {}, False),
}


def _end(status: dict) -> dict:
    return {key: status.get(key) for key in COMPARED}


@pytest.mark.parametrize("case", list(CASES))
def test_a_worker_and_zerogpu_chunks_record_the_same_end(tmp_path, case):
    target, config, cancel_first = CASES[case]
    ends = []
    for way in ("worker", "zerogpu"):
        run = RunStore(tmp_path / way).create("train", config, target=target, device="cuda:0")
        if cancel_first:
            run.cancel_path.touch()
        if way == "worker":
            status = run_job(run, target)
        else:
            policy = ChunkPolicy(duration_s=60, budget_s=30.0)
            status = ChunkedGpuRunner(policy, spaces_module=FakeSpaces()).run_job(run, target)
        assert status["finished"] and run.status()["state"] == status["state"]
        ends.append(_end(status))
    assert ends[0] == ends[1]
    end = ends[0]
    expected_state = {"done": DONE, "cancelled": CANCELLED}.get(case, FAILED)
    assert end["state"] == expected_state
    if case == "done":
        assert end["result"] == {"value": expected_value(3), "steps": 3} and end["resumable"] is False
    elif case == "cancelled":
        assert end["resumable"] is True and end["error"] is None
    elif case == "user error":
        assert "the loss became NaN" in end["error"] and end["not_resumable"] is None
    elif case == "damaged state":
        assert end["resumable"] is False and end["not_resumable"] == end["error"] == \
            "the saved state is damaged: start a new run"
    else:
        assert "unexpected error (KeyError)" in end["error"] and "missing" not in end["error"]


def test_end_fields_is_the_one_rule(tmp_path):
    run = RunStore(tmp_path).create("train", {})
    assert end_fields(run, {"outcome": "failed", "error": "x"})["resumable"] is False   # nothing saved yet
    run.save_state(lambda folder: (folder / "state.json").write_text(json.dumps({"step": 1})))
    assert end_fields(run, {"outcome": "failed", "error": "x"})["resumable"] is True
    assert end_fields(run, {"outcome": "failed", "error": "x", "damaged_state": True})["resumable"] is False
    assert end_fields(run, {"outcome": "done", "result": {"a": 1}})["result"] == {"a": 1}
    with pytest.raises(ValueError, match="unknown job outcome"):
        end_fields(run, {"outcome": "budget"})
