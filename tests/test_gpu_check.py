"""benchmarks/gpu_check.py: the projection's arithmetic on a hand-made report, and the tiny CPU dry run."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_check

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_projection_follows_the_official_recipe():
    report = {
        "gen": {"dtypes": {"fp16": {"projected_500_min": 2.0}, "fp32": {"projected_500_min": 4.0}}},
        "careset": {"encoders": {"ViT-B/32": {"total_min": 0.5}, "ViT-L/14": {"total_min": 9.0}}},
        "train": {"rows": [
            {"train_method": "noxattn", "autocast": "bf16", "gradient_checkpointing": False, "esd_s": 0.6,
             "stage2_s": 0.9, "esd_peak_gb": 14.0, "stage2_peak_gb": 15.5, "ti_s": 0.05, "ti_peak_gb": 9.0},
            {"train_method": "xattn", "autocast": "bf16", "gradient_checkpointing": False, "esd_s": 0.3,
             "stage2_s": 0.6, "esd_peak_gb": 17.0, "stage2_peak_gb": 8.0},            # TI: the noxattn row's
            {"train_method": "xattn", "autocast": "fp32", "gradient_checkpointing": True, "error": "out of memory"},
        ]},
    }
    rows = gpu_check.projection(report)["rows"]
    assert [r["setting"] for r in rows] == ["noxattn bf16", "xattn bf16"]
    first, second = rows
    # stage 1: 2 x 200 ESD iterations + 2 x 3000 TI steps; stage 2: 200 iterations
    assert first["stage1_min"] == pytest.approx((400 * 0.6 + 6000 * 0.05) / 60, abs=0.01)   # 9.0
    assert first["ti_min"] == pytest.approx(5.0)
    assert first["stage2_min"] == pytest.approx(3.0)
    assert first["train_min"] == pytest.approx(12.0)
    assert first["peak_gb"] == 15.5 and first["goal_memory_met"] and not first["goal_time_met"]
    assert first["vs_paper_train"] == pytest.approx(28.33 / 12.0, abs=0.01)
    # + 500 target images as a training job makes them (fp32 pipeline) and the official encoder's CARE-set
    assert first["with_generation_and_careset_min"] == pytest.approx(12.0 + 4.0 + 0.5)
    assert second["train_min"] == pytest.approx((400 * 0.3 + 6000 * 0.05 + 200 * 0.6) / 60, abs=0.01)   # 9.0
    assert second["peak_gb"] == 17.0 and second["goal_time_met"] and not second["goal_memory_met"]


def test_tiny_dry_run_on_the_cpu_writes_the_table(tmp_path, capsys):
    report = gpu_check.main([str(tmp_path), "--device", "cpu", "--tiny", "--parts", "gen"])
    assert "errors" not in report, report.get("errors")
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["device"] == "cpu" and saved["tiny"] is True and saved["seconds"]["gen"] > 0
    gen = saved["gen"]["dtypes"]["fp32"]
    assert gen["seeds_repeat_bit_identical"] is True and gen["images_per_s"] > 0 and gen["resolution"] == 64
    assert gen["projected_500_min"] == pytest.approx(500 / gen["images_per_s"] / 60, rel=0.01)
    assert "## generation (64 px, 4 DDIM steps, batch 2)" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_training_rows_on_the_cpu(tmp_path):
    report = gpu_check.main([str(tmp_path), "--device", "cpu", "--tiny", "--parts", "train", "--combos", "noxattn:fp32"])
    assert "errors" not in report, report.get("errors")
    (row,) = report["train"]["rows"]
    assert row["esd_s"] > 0 and row["stage2_s"] > 0 and row["ti_s"] > 0 and row["left_allocated_gb"] == 0
    assert [r["deterministic"] for r in report["train"]["repeat"]] == ["off", "warn-only", "strict"]
    assert all(r["bit_identical"] for r in report["train"]["repeat"])   # the CPU path is bit-reproducible
    (projected,) = report["projection"]["rows"]
    assert projected["setting"] == "noxattn fp32" and projected["peak_gb"] is None
