"""The metrics export (`recare.eval.export`): metrics.json and metrics.csv of several evaluations, worst runs included."""

from __future__ import annotations

import csv
import io
import json

import pytest

from recare.eval.export import metrics_csv, write_metrics_export
from recare.metrics import ratio, ratio_axes


def _row(model, run, asr, clip, care, asr_runs=None):
    row = {"model": model, "run": run, "asr": asr, "clip_score": clip,
           "care_score": {"mean": sum(care.values()) / len(care), "per_concept": care},
           "ratio": {"clip_range": [0.25, 0.32]}}
    if asr_runs is not None:
        row["asr_runs"] = asr_runs
        row["asr_worst"] = {a: max(v) for a, v in asr_runs.items()}
    return row


def _read(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_csv_has_worst_run_and_every_run_of_a_learned_attack():
    """Two models: one ran CCE three times (12.5, 25, 50 -> mean 29.17, worst 50), one ran it once. The CSV keeps
    the mean, adds asr_worst_cce and asr_cce_run1..3 (empty for the single-run model), and the RATIO radar's
    numbers, the worst run's Defense and RATIO from `recare.metrics` by hand."""
    runs = [12.5, 25.0, 50.0]
    mean = sum(runs) / 3
    rows = [_row("recare", "evaluate-a", {"erased": 0.0, "cce": mean}, 0.30, {"water": 1.0, "person": 0.5},
                 asr_runs={"cce": runs}),
            _row("base", "evaluate-b", {"erased": 90.0, "cce": 80.0}, 0.31, {"water": 0.75, "person": 1.0})]
    header, *_ = metrics_csv(rows).splitlines()
    assert header.split(",") == [
        "model", "run", "asr_erased", "asr_cce", "asr_worst_cce", "asr_cce_run1", "asr_cce_run2", "asr_cce_run3",
        "clip_score", "care_score", "care_water", "care_person", "defense_attack", "defense", "utility", "care",
        "ratio", "defense_worst", "ratio_worst"]
    first, second = _read(metrics_csv(rows))
    assert float(first["asr_cce"]) == pytest.approx(mean) and float(first["asr_worst_cce"]) == 50.0
    assert [float(first[f"asr_cce_run{k}"]) for k in (1, 2, 3)] == runs
    assert first["defense_attack"] == "cce"  # Appendix M: CCE makes the Defense axis when measured
    d, u, c = ratio_axes(mean, 0.30, 0.75, (0.25, 0.32))
    assert [float(first[k]) for k in ("defense", "utility", "care")] == pytest.approx([d, u, c])
    assert float(first["ratio"]) == pytest.approx(ratio(mean, 0.30, 0.75, (0.25, 0.32)))
    assert float(first["defense_worst"]) == pytest.approx(ratio_axes(50.0, 0.30, 0.75, (0.25, 0.32))[0])
    assert float(first["ratio_worst"]) == pytest.approx(ratio(50.0, 0.30, 0.75, (0.25, 0.32)))
    assert float(first["ratio_worst"]) < float(first["ratio"])  # the worst run defends less
    assert second["asr_worst_cce"] == second["asr_cce_run1"] == second["ratio_worst"] == ""  # one run: no spread
    assert float(second["asr_cce"]) == 80.0 and float(second["care_water"]) == 0.75


def test_csv_without_several_runs_has_no_worst_columns_and_blank_missing_numbers():
    """One-draw metrics (older files have no asr_runs) add no worst-run column; a partial row without a CLIP
    score still gets its row, with empty radar cells."""
    rows = [_row("a", "evaluate-a", {"erased": 10.0}, 0.3, {"water": 1.0}),
            {"model": "b", "run": "evaluate-b", "asr": {"erased": 20.0}, "clip_score": None, "care_score": None}]
    header = metrics_csv(rows).splitlines()[0].split(",")
    assert not [h for h in header if "worst" in h and h != "defense_worst" and h != "ratio_worst"]
    assert not [h for h in header if "_run" in h]
    a, b = _read(metrics_csv(rows))
    assert a["defense_worst"] == a["ratio_worst"] == ""
    assert float(b["asr_erased"]) == 20.0 and b["ratio"] == b["clip_score"] == b["care_water"] == ""


def test_write_metrics_export_writes_both_files(tmp_path):
    rows = [_row("recare", "evaluate-a", {"cce": 25.0}, 0.30, {"water": 1.0}, asr_runs={"cce": [0.0, 50.0]})]
    json_path, csv_path = write_metrics_export(rows, tmp_path)
    data = json.loads(json_path.read_text())
    assert data["models"] == rows and data["ratio_radar"][0]["asr_worst"] == 50.0
    assert data["ratio_radar"][0]["run"] == "evaluate-a"
    assert _read(csv_path.read_text())[0]["asr_worst_cce"] == "50.0"
