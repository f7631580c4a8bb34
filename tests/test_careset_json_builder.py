"""One careset.json builder (`recare.careset_io.official_json_text`): what the Build tab, a training run and a
submitted job's inputs used to write each their own way comes out byte for byte the same through it."""

from __future__ import annotations

import json

import pytest

from recare.careset import build_care_set
from recare.careset_io import (
    CareSetFileError, official_dict, official_json_text, read_careset_json, write_careset_json,
)
from recare.config import CareSetConfig
from recare.runs import RunStore
from recare.workflows import stage_inputs
from tests.test_careset import toy_world


@pytest.fixture(scope="module")
def careset():
    images, vocab, tokens, target = toy_world()
    cfg = CareSetConfig(reference_word="Syn Word", top_k=20, top_n=40, n_clusters=4, prompt_style="painting")
    return build_care_set(images, vocab, tokens, target, cfg).with_edits(custom_tokens=["extra token"])


def test_every_former_writer_gives_the_same_bytes_through_the_one_builder(careset, tmp_path):
    c = careset.config
    final = careset.final_tokens()
    # the Build tab's download and careset_io's writer: json.dumps(official_dict(...), indent=4) + "\n"
    build_tab = json.dumps(official_dict(final, c.reference_word, c.prompt_style), indent=4) + "\n"
    path = write_careset_json(careset, tmp_path / "careset.json")
    assert path.read_bytes() == build_tab.encode() == official_json_text(careset).encode()

    # a training run's copy: the OfficialCareSet it read, its two lists as read
    official = read_careset_json(path)
    key = official.reference_key
    recipe = json.dumps({f"{key}_care_word": list(official.base_prompts),
                         f"{key}_care_word_{official.prompt_style}": list(official.retain_prompts)}, indent=4) + "\n"
    assert official_json_text(official) == recipe == build_tab
    assert write_careset_json(official, tmp_path / "copy.json").read_bytes() == path.read_bytes()

    # a submitted job's inputs: the official dict copied into <run>/inputs/careset.json
    store = RunStore(tmp_path / "runs")
    run = store.create("train", {"inputs": {"careset": official.to_dict()}, "train": {}})
    settings = stage_inputs(run, run.config())
    staged = (run.path / "inputs" / "careset.json")
    assert settings["train"]["careset"] == str(staged)
    old_inputs = json.dumps(official.to_dict(), indent=4, ensure_ascii=False) + "\n"
    assert staged.read_bytes() == path.read_bytes() == old_inputs.encode()


def test_the_one_format_is_the_official_json_dump_and_refuses_what_is_not_a_careset(tmp_path):
    data = official_dict(["café", "person"], "nudity", "photo")
    text = official_json_text(data)
    assert text == json.dumps(data, indent=4) + "\n" and "caf\\u00e9" in text   # ASCII, as json.dump writes
    assert json.loads(text) == data
    with pytest.raises(CareSetFileError, match="exactly one '<key>_care_word'"):
        official_json_text({"nudity": ["A person"]})
    with pytest.raises(CareSetFileError, match="not a list"):
        official_json_text(["A person"])
