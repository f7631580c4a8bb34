"""One writer and one reader for a run's metrics files, one timestamp format, and older files still read."""

from __future__ import annotations

import json
import time

import pytest

from recare.errors import ConfigError
from recare.metrics_io import (
    METRICS_JSON, METRICS_LINES, append_metrics, read_metrics_json, read_metrics_lines, write_metrics_json,
)
from recare.progress import ProgressEvent
from recare.runs import RunStore
from recare.timestamps import iso_from_seconds, now_iso, to_seconds
from recare.train.speed import step_seconds


def test_lines_written_are_read_back_with_one_timestamp_format(tmp_path):
    before = time.time()
    assert append_metrics(tmp_path, ProgressEvent("stage2", 1, 3, "", {"loss": 0.5, "lr": 1e-5})) is True
    assert append_metrics(tmp_path, ProgressEvent("stage2", 2, 3, "no metrics")) is False   # nothing to log
    assert append_metrics(tmp_path, ProgressEvent("stage2", 2, 3, "", {"loss": float("nan")})) is True
    rows = read_metrics_lines(tmp_path)
    assert [(r["stage"], r["step"], r["total"], r["loss"]) for r in rows] == [("stage2", 1, 3, 0.5), ("stage2", 2, 3, None)]
    assert rows[0]["lr"] == 1e-5
    for row in rows:
        assert isinstance(row["time"], str) and row["time"].endswith("+00:00")
        assert before - 1 <= to_seconds(row["time"]) <= time.time() + 1


def test_a_run_folder_writes_and_reads_through_the_same_functions(tmp_path):
    run = RunStore(tmp_path / "runs").create("train", {"x": 1})
    run.append_metrics(ProgressEvent("stage2", 1, 2, "", {"loss": 1.0}))
    append_metrics(run.path, ProgressEvent("stage2", 2, 2, "", {"loss": 0.5}))
    assert run.metrics_path == run.path / METRICS_LINES
    assert [r["loss"] for r in run.read_metrics()] == [1.0, 0.5] == [r["loss"] for r in read_metrics_lines(run.path)]


def test_older_lines_with_epoch_seconds_still_read_in_the_one_format(tmp_path):
    """Training runs wrote {"time": time.time()} before there was one format; such a folder must still open."""
    t0 = 1_764_878_400.25
    old = [{"stage": "stage2", "step": 1, "total": 3, "loss": 0.9, "time": t0},
           {"stage": "stage2", "step": 2, "total": 3, "loss": 0.8, "time": t0 + 1.5}]
    (tmp_path / METRICS_LINES).write_text("".join(json.dumps(r) + "\n" for r in old) + '{"stage": "stag',
                                          encoding="utf-8")  # a torn last line from a crash
    rows = read_metrics_lines(tmp_path)
    assert [r["loss"] for r in rows] == [0.9, 0.8]
    assert rows[0]["time"] == iso_from_seconds(t0) == "2025-12-04T20:00:00.250+00:00"
    assert to_seconds(rows[1]["time"]) - to_seconds(rows[0]["time"]) == pytest.approx(1.5)
    # the speed estimate reads old and new stamps alike: the same step seconds from either form
    assert step_seconds(old)["stage2"] == step_seconds(rows)["stage2"] == [pytest.approx(1.5)]


def test_timestamps_read_both_forms_and_refuse_the_rest():
    stamp = now_iso()
    assert abs(to_seconds(stamp) - time.time()) < 5
    assert to_seconds(12.5) == 12.5
    assert to_seconds("2020-01-01T00:00:00") == to_seconds("2020-01-01T00:00:00+00:00")  # no zone: UTC
    assert to_seconds("yesterday") is None and to_seconds(None) is None and to_seconds(True) is None


def test_metrics_json_round_trip_and_clear_errors(tmp_path):
    metrics = {"asr": {"cce": 40.0}, "clip_score": 0.3, "ratio": {"value": None}}
    assert write_metrics_json(tmp_path, metrics) == tmp_path / METRICS_JSON
    assert read_metrics_json(tmp_path) == metrics
    empty = tmp_path / "unfinished"
    empty.mkdir()
    assert read_metrics_json(empty, missing_ok=True) is None
    with pytest.raises(ConfigError, match="is not a finished evaluation run"):
        read_metrics_json(empty)
    (empty / METRICS_JSON).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="not a JSON object"):
        read_metrics_json(empty)
    (empty / METRICS_JSON).write_text("{torn", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot be read"):
        read_metrics_json(empty)
