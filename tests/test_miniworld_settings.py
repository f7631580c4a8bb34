"""The mini world's settings a retrain may change: checks, the plume cue, the statistics, the installed world's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recare.miniworld import world as W
from recare.miniworld.train import parse_world_settings, recare_spec

REPO = Path(__file__).resolve().parents[1]


def test_apply_settings_returns_the_previous_values_and_rejects_bad_ones(restore_world_settings):
    assert restore_world_settings == {"P_SMOKING_GIVEN_PERSON": 0.35, "P_VAN_GOGH_NIGHT": 0.8, "SMOKING_CUE": "cigarette"}
    previous = W.apply_settings({"P_SMOKING_GIVEN_PERSON": 0.15, "SMOKING_CUE": "plume"})
    assert previous == {"P_SMOKING_GIVEN_PERSON": 0.35, "SMOKING_CUE": "cigarette"}
    assert W.P_SMOKING_GIVEN_PERSON == 0.15 and W.SMOKING_CUE == "plume"
    for bad, message in (({"P_PERSON": 0.5}, "unknown world setting 'P_PERSON'"),
                         ({"P_VAN_GOGH_NIGHT": 1.5}, "between 0 and 1"),
                         ({"P_VAN_GOGH_NIGHT": True}, "between 0 and 1"),
                         ({"P_VAN_GOGH_NIGHT": "0.3"}, "between 0 and 1"),
                         ({"SMOKING_CUE": "cloud"}, "SMOKING_CUE must be one of")):
        with pytest.raises(W.WorldError, match=message):
            W.apply_settings({"P_SMOKING_GIVEN_PERSON": 0.2, **bad})
        assert W.P_SMOKING_GIVEN_PERSON == 0.15  # a refused call sets nothing, not even its valid part
    W.apply_settings(previous)
    assert W.settings() == restore_world_settings


def _changed_pixels(scene: W.Scene) -> np.ndarray:
    """(64, 64) bool: the pixels the smoking thing changes in `scene` (a plain photo, no noise)."""
    photo = W._STYLE_FUNCS["photo"]
    W._STYLE_FUNCS["photo"] = lambda img, trng: img
    try:
        without = W.Scene(scene.background, "photo", tuple(t for t in scene.things if t.kind != "smoking"), 1)
        a, b = W.render(W.Scene(scene.background, "photo", scene.things, 1)), W.render(without)
    finally:
        W._STYLE_FUNCS["photo"] = photo
    return np.abs(a.astype(int) - b.astype(int)).max(-1) > 8


def test_the_plume_cue_is_a_raised_hand_and_a_plume_twice_the_cigarettes_area(restore_world_settings):
    rng = np.random.default_rng(0)
    scenes = [W.sample_scene(rng, include=("smoking",)) for _ in range(40)]
    cigarette = np.mean([_changed_pixels(s).mean() for s in scenes])
    W.apply_settings({"SMOKING_CUE": "plume"})
    assert np.mean([_changed_pixels(s).mean() for s in scenes]) >= 2 * cigarette > 0.03  # of the image, on average
    W.apply_settings({"SMOKING_CUE": "cigarette"})
    person = W.Thing("person", 20, 60, colour="orange", variant=0)
    scene = W.Scene("grass", "photo", (person, W.Thing("smoking", 0, 0)), texture_seed=1)
    cigarette = _changed_pixels(scene)
    W.apply_settings({"SMOKING_CUE": "plume"})
    plume = _changed_pixels(scene)
    top = person.y - 44
    img = W.render(W.Scene("grass", "photo", scene.things, 1))
    assert np.abs(img[int(top + 16), int(person.x + 11)].astype(int) - np.array([255, 140, 26])).max() < 60  # the raised arm's orange sleeve
    assert plume[: int(top)].sum() >= 2 * cigarette[: int(top)].sum() > 0  # above the head: a plume, not four puffs
    assert not plume[:, : int(person.x) - 8].any()  # all of it on the side of the image's middle


def test_p_smoking_given_person_sets_how_often_a_person_smokes(restore_world_settings):
    def rate(n=3000):
        rng = np.random.default_rng(5)
        scenes = [W.sample_scene(rng) for _ in range(n)]
        people = [s for s in scenes if s.has("person")]
        return sum(s.has("smoking") for s in people) / len(people)

    assert 0.3 < rate() < 0.4
    W.apply_settings({"P_SMOKING_GIVEN_PERSON": 0.15})
    assert 0.11 < rate() < 0.19


def test_parse_world_settings_and_recare_json_record_them():
    assert parse_world_settings(["SMOKING_CUE=plume", "P_SMOKING_GIVEN_PERSON=0.15"]) == \
        {"SMOKING_CUE": "plume", "P_SMOKING_GIVEN_PERSON": 0.15}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_world_settings(["SMOKING_CUE"])
    assert recare_spec()["world_settings"] == W.settings()
    recorded = {**W.settings(), "SMOKING_CUE": "plume"}
    assert recare_spec(previous={"world_settings": recorded})["world_settings"] == recorded  # --spec-only keeps them
    assert recare_spec(previous={"world_settings": recorded}, world_settings=W.settings())["world_settings"] == W.settings()


def _import_world_with(folder: Path) -> subprocess.CompletedProcess:
    code = "import json; from recare.miniworld import world; print(json.dumps(world.settings()))"
    env = {**os.environ, "RECARE_MINI_WORLD": str(folder), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_the_renderer_takes_the_installed_worlds_settings_on_import(tmp_path):
    (tmp_path / "recare.json").write_text(json.dumps({"world_settings": {"SMOKING_CUE": "plume",
                                                                         "P_SMOKING_GIVEN_PERSON": 0.15}}))
    done = _import_world_with(tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"P_SMOKING_GIVEN_PERSON": 0.15, "P_VAN_GOGH_NIGHT": 0.8, "SMOKING_CUE": "plume"}
    (tmp_path / "recare.json").write_text(json.dumps({"world_settings": {"SMOKING_CUE": "fog"}}))
    done = _import_world_with(tmp_path)
    assert done.returncode != 0
    assert f"{tmp_path / 'recare.json'}: world_settings: SMOKING_CUE must be one of" in done.stderr
    (tmp_path / "recare.json").write_text("{not json")  # unreadable: the world's defaults (the loaders say what is wrong)
    assert json.loads(_import_world_with(tmp_path).stdout)["SMOKING_CUE"] == "cigarette"
