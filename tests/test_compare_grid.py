"""Compare's image grid as data (`ui.compare_data.grid_data`): a row per attack run, verdicts judged once per image."""

from __future__ import annotations

import json

from PIL import Image

from recare.eval.config import EvaluationConfig
from recare.eval.detection_cache import DetectionCache
from recare.eval.records import RECORD_FIELDS, write_records_csv
from recare.runs import RunStore
from ui.compare_data import grid_data, grid_info, grid_note

CCE_PROMPT = "A photo of a <cce*>"


def _evaluation(tmp_path, made: list[tuple[int, int, str]]):
    """An evaluation run of erased + CCE run twice, 2 seeds, whose records.csv holds the CCE images `made`
    ((run, seed, colour)); no model is loaded."""
    config = EvaluationConfig(model=str(tmp_path / "no-model"), target_prompt="a photo of a fish", target_concept="tench",
                              care_prompts={"water": ["a lake"]}, detector="oracle", attacks=["erased", "cce"],
                              attack_runs=2, seeds=2, device="cpu")
    run = RunStore(tmp_path / "runs").create("evaluate", {"evaluation": config.to_dict(), "compare": {"label": "m"}},
                                             owner="k" * 32)
    records = []
    for i, (attack_run, seed, colour) in enumerate(made):
        file = f"images/cce/r{attack_run}-{seed}.png"
        (run.path / file).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), colour).save(run.path / file)
        records.append({**{f: None for f in RECORD_FIELDS}, "index": i, "attack": "cce", "run": attack_run,
                        "concept": "tench", "prompt": CCE_PROMPT, "attack_prompt": "A photo of a tench", "seed": seed,
                        "file": file, "positive": colour == "red"})
    write_records_csv(run.path / "records.csv", records)
    return run


def _counting_detector(calls: list):
    def detect(image):
        calls.append(1)
        return [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9 if image.getpixel((0, 0))[0] > 200 else 0.0}]
    return detect


def test_each_attack_run_has_its_own_row(tmp_path):
    """CCE ran twice on the same prompt and seeds: the grid shows both runs' images (not the last run's only)."""
    run = _evaluation(tmp_path, [(0, 42, "blue"), (0, 43, "green"), (1, 42, "red"), (1, 43, "black")])
    cache = DetectionCache(_counting_detector([]), name="stand-in")
    grid = grid_data([run], json.dumps(["cce", CCE_PROMPT]), cache)
    info = grid_info(grid)
    assert [r["model"] for r in info["rows"]] == ["m · attack run 1", "m · attack run 2"]
    assert [r["attack_run"] for r in info["rows"]] == [0, 1]
    assert grid_note(grid).startswith("Rows: 1 model(s), 2 attack runs · columns: seeds 42, 43")
    assert [[c["file"] for c in r["cells"]] for r in info["rows"]] == [
        ["images/cce/r0-42.png", "images/cce/r0-43.png"], ["images/cce/r1-42.png", "images/cce/r1-43.png"]]
    assert [[c["blurred"] for c in r["cells"]] for r in info["rows"]] == [[False, False], [True, False]]
    one = grid_info(grid_data([run], json.dumps(["erased", "a photo of a fish"]), cache))  # one run: one row
    assert [r["model"] for r in one["rows"]] == ["m"] and [c["state"] for c in one["rows"][0]["cells"]] == [
        "pending", "pending"]


def test_two_polls_run_the_detector_only_on_new_images(tmp_path):
    """The grid is rebuilt on every 2-s poll: the second poll judges only the image made in between."""
    run = _evaluation(tmp_path, [(0, 42, "blue"), (1, 42, "red")])
    calls: list = []
    cache = DetectionCache(_counting_detector(calls), name="stand-in")
    choice = json.dumps(["cce", CCE_PROMPT])
    first = grid_info(grid_data([run], choice, cache))
    assert len(calls) == 2 and [c["state"] for c in first["rows"][0]["cells"]] == ["ready", "pending"]
    run = _evaluation(tmp_path / "again", [(0, 42, "blue"), (1, 42, "red"), (0, 43, "green")])  # same images + one
    second = grid_info(grid_data([run], choice, cache))
    assert len(calls) == 3 and [c["state"] for c in second["rows"][0]["cells"]] == ["ready", "ready"]
    grid_data([run], choice, cache)
    assert len(calls) == 3
