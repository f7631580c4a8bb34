"""careset.json: the official format byte-for-byte, reading official files, and our rich format."""

import json

import numpy as np
import pytest

from recare.careset import build_care_set
from recare.careset_io import (
    CareSetFileError,
    load_rich_json,
    official_dict,
    read_careset_json,
    reference_key,
    save_rich_json,
    write_careset_json,
)
from recare.config import CareSetConfig
from tests.test_careset import toy_world


@pytest.mark.parametrize("word,key", [("Van Gogh", "vangogh"), ("nudity", "nudity"), ("A.B c-d_e!", "abc-d_e")])
def test_reference_key_as_official(word, key):
    assert reference_key(word) == key


def test_official_dict_layout():
    assert official_dict(["person", "stars"], "Van Gogh", "painting") == {
        "vangogh_care_word": ["A person", "A stars"],
        "vangogh_care_word_painting": ["A painting of person", "A painting of stars"],
    }
    assert list(official_dict(["person"], "nudity", "photo")) == ["nudity_care_word", "nudity_care_word_photo"]


def test_reads_a_file_in_the_official_layout(tmp_path):
    # written by hand exactly as damilab/CARE's utils/dictionary.py writes it (indent 4)
    text = '{\n    "nudity_care_word": [\n        "A person",\n        "A woman"\n    ],\n' \
           '    "nudity_care_word_photo": [\n        "A photo of person",\n        "A photo of woman"\n    ]\n}'
    path = tmp_path / "careset.json"
    path.write_text(text)
    got = read_careset_json(path)
    assert got.reference_key == "nudity" and got.prompt_style == "photo"
    assert got.tokens == ["person", "woman"]
    assert got.retain_prompts == ["A photo of person", "A photo of woman"]


def built():
    images, vocab, tokens, target = toy_world()
    cfg = CareSetConfig(reference_word="Van Gogh", prompt_style="painting", top_k=20, top_n=40, n_clusters=4)
    return build_care_set(images, vocab, tokens, target, cfg, meta={"encoder": "toy"})


def test_write_then_read_official_round_trip(tmp_path):
    cs = built().with_edits(custom_tokens=["stars"])
    path = write_careset_json(cs, tmp_path / "out" / "careset.json")
    data = json.loads(path.read_text())
    assert data == official_dict(cs.final_tokens(), "Van Gogh", "painting")
    assert read_careset_json(path).tokens == cs.final_tokens()


def test_rich_round_trip_keeps_edits_and_intermediates(tmp_path):
    cs = built()
    first_kept = cs.tokens[int(np.flatnonzero(cs.keep)[0])]
    edited = cs.with_edits(drop_tokens=[first_kept], custom_tokens=["moon"], toggle_clusters=[0])
    path = save_rich_json(edited, tmp_path / "careset.rich.json")
    back = load_rich_json(path)
    assert back.final_tokens() == edited.final_tokens()
    assert back.reasons == edited.reasons
    assert back.token_overrides == edited.token_overrides and back.cluster_overrides == edited.cluster_overrides
    np.testing.assert_array_equal(back.labels, edited.labels)
    np.testing.assert_allclose(back.features, edited.features, atol=1e-3)  # stored as fp16
    assert back.config == edited.config and back.meta == {"encoder": "toy"}
    # the rich file also reads as an official one
    assert read_careset_json(path).tokens == edited.final_tokens()
    # and editing goes on after loading
    assert back.with_edits(toggle_tokens=[first_kept]).keep.sum() == edited.keep.sum() + 1


@pytest.mark.parametrize(
    "content,message",
    [
        ("not json {", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"foo": []}', "exactly one"),
        ('{"x_care_word": ["A a"]}', "x_care_word_photo"),
        ('{"x_care_word": [], "x_care_word_photo": []}', "non-empty list"),
        ('{"x_care_word": ["A a", 3], "x_care_word_photo": ["A photo of a"]}', "non-empty strings"),
    ],
)
def test_malformed_official_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "careset.json"
    path.write_text(content)
    with pytest.raises(CareSetFileError, match=message):
        read_careset_json(path)


def test_malformed_rich_files_are_clear_errors(tmp_path):
    good = json.loads(save_rich_json(built(), tmp_path / "r.json").read_text())
    missing = dict(good)
    del missing["candidates"]
    (tmp_path / "a.json").write_text(json.dumps(missing))
    with pytest.raises(CareSetFileError, match="malformed"):
        load_rich_json(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({**good, "version": 99}))
    with pytest.raises(CareSetFileError, match="version"):
        load_rich_json(tmp_path / "b.json")
    (tmp_path / "c.json").write_text(json.dumps({"nudity_care_word": ["A x"], "nudity_care_word_photo": ["A photo of x"]}))
    with pytest.raises(CareSetFileError, match="not a ReCARE rich"):
        load_rich_json(tmp_path / "c.json")
    with pytest.raises(CareSetFileError, match="does not exist"):
        load_rich_json(tmp_path / "missing.json")


def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = write_careset_json(built(), tmp_path / "careset.json")
    before = path.read_text()
    import recare.atomic as atomic  # careset_io writes through recare.atomic's helpers

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError):
        write_careset_json(built().with_edits(custom_tokens=["zzz"]), path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["careset.json"]  # no temp file left behind
