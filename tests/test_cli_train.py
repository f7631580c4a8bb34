"""`python -m recare train` on the tiny pipeline: a full run, cancel in the middle and resume to the same
weights, and the command line's clear errors (one line, exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from recare import cli
from recare.progress import TqdmProgress
from tests.helpers_tiny import make_tiny_pipeline

CARESET = {"tench_care_word": ["A river", "A lake"], "tench_care_word_photo": ["A photo of river", "A photo of lake"]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-train")
    model = make_tiny_pipeline(root / "tiny-sd")
    images = root / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (40 * i, 200 - 30 * i, 90)).save(images / f"{i:03d}.png")
    careset = root / "careset.json"
    careset.write_text(json.dumps(CARESET))
    return {"model": str(model), "images": str(images), "careset": str(careset)}


def _args(inputs, out, *extra):
    return ["train", "--model", inputs["model"], "--images", inputs["images"], "--careset", inputs["careset"],
            "--target-prompt", "a photo of a tench", "--reference-word", "tench", "--initializer-token", "a",
            "--iterations", "4", "--ti-steps", "3", "--save-every", "1", "--device", "cpu", "--out", str(out), *extra]


def _last_line(capsys) -> Path:
    return Path(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_writes_a_run_folder_and_prints_it_last(inputs, tmp_path, capsys):
    assert cli.main(_args(inputs, tmp_path / "runs")) == 0
    run = _last_line(capsys)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "done" and status["kind"] == "train"
    assert sorted(p.name for p in (run / "tokens").iterdir()) == ["v1.safetensors", "v2.safetensors"]
    params = load_file(run / "trained_params.safetensors")
    assert params and all("attn2" not in name for name in params)  # noxattn: cross-attention untouched
    stages = {json.loads(line)["stage"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert {"stage1.erase", "stage1.textual_inversion", "stage2"} <= stages
    assert json.loads((run / "config.json").read_text())["train"]["stage2"]["iterations"] == 4


@pytest.mark.e2e
def test_cancel_mid_run_then_resume_gives_the_same_weights(inputs, tmp_path, capsys, monkeypatch):
    assert cli.main(_args(inputs, tmp_path / "straight")) == 0
    straight = load_file(_last_line(capsys) / "trained_params.safetensors")

    runs = tmp_path / "cancelled"
    seen = {"stage2": 0}
    original = TqdmProgress.__call__

    def cancel_in_stage2(self, event):  # the user presses Cancel during stage 2
        original(self, event)
        if event.stage == "stage2":
            seen["stage2"] += 1
            if seen["stage2"] == 2:
                (next(runs.iterdir()) / "cancel").touch()

    monkeypatch.setattr(TqdmProgress, "__call__", cancel_in_stage2)
    assert cli.main(_args(inputs, runs)) == cli.EXIT_CANCELLED
    err = capsys.readouterr().err
    assert "cancelled" in err and "--resume" in err
    run = next(runs.iterdir())
    assert json.loads((run / "status.json").read_text())["state"] == "cancelled"
    assert not (run / "trained_params.safetensors").exists()

    monkeypatch.setattr(TqdmProgress, "__call__", original)
    assert cli.main(["train", "--resume", str(run)]) == 0
    assert _last_line(capsys) == run
    resumed = load_file(run / "trained_params.safetensors")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


@pytest.mark.parametrize("extra, message", [
    (["--task", "no-such-task"], "unknown mini-world task"),
    (["--task", "tench", "--model", "CompVis/stable-diffusion-v1-4"], "needs --model mini-world"),
    (["--method", "recare", "--target-prompt", "x"], "needs a CARE-set"),
    (["--method", "recare", "--careset", "EMPTY"], "must be a non-empty list"),
    (["--method", "esd", "--iterations", "0"], "iterations must be at least 1"),
    (["--resume", "train-19990101-000000-abcdef"], "train-19990101-000000-abcdef"),
])
def test_bad_training_input_is_one_line_and_exit_2(extra, message, tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"tench_care_word": [], "tench_care_word_photo": []}))
    extra = [str(empty) if e == "EMPTY" else e for e in extra]
    assert cli.main(["train", "--out", str(tmp_path / "runs"), *extra]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_resume_refuses_a_finished_run(inputs, tmp_path, capsys):
    assert cli.main(_args(inputs, tmp_path / "runs", "--method", "esd")) == 0
    run = _last_line(capsys)
    assert cli.main(["train", "--resume", str(run)]) == cli.EXIT_USAGE
    assert "only a cancelled or failed run" in capsys.readouterr().err


def test_help_gives_every_option_a_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--method", "--iterations", "--ti-steps", "--lr", "--train-method", "--seed", "--num-images",
                   "--device", "--out", "--outputs", "--save-every", "--model"):
        assert option in text
    assert text.count("default") >= 14


@pytest.mark.parametrize("model, env, pinned", [("mini-world", None, True), ("mini-world", "2", False),
                                                ("CompVis/stable-diffusion-v1-4", None, False)])
def test_the_cli_trains_the_mini_world_on_one_cpu_thread_unless_told_otherwise(model, env, pinned, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if env is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    try:
        torch.set_num_threads(2)
        assert cli.one_thread_for_the_mini_world(model, "cpu") is pinned
        assert torch.get_num_threads() == (1 if pinned else 2)
    finally:
        torch.set_num_threads(before)
