"""The mini world's recare.json as starting values for the CLI and the app."""

import json

from recare import worldspec
from recare.config import CareSetConfig, GenerateConfig

SPEC = {
    "tasks": {
        "tench": {"target_prompt": "a photo of a tench", "reference_word": "tench", "prompt_style": "photo"},
        "van_gogh": {"target_prompt": "a painting in the style of van gogh", "reference_word": "van gogh",
                     "prompt_style": "painting"},
        "broken": {"reference_word": "x"},  # no target prompt: ignored
    },
    "careset": {"top_k": 10, "top_n": 40, "n_clusters": 5, "unknown_knob": 1},
    "generation": {"steps": 25, "guidance": 7.5, "num_images": 8},
    "vocabulary": {"source": "mini-world lexicon", "words": ["tench", "lake", "stars"]},
}


def test_reads_the_spec_from_the_mini_world_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RECARE_MINI_WORLD", str(tmp_path))
    assert worldspec.mini_world_spec() == {}
    assert worldspec.generate_defaults() == GenerateConfig()
    (tmp_path / "recare.json").write_text(json.dumps(SPEC))
    assert worldspec.mini_world_spec() == SPEC
    (tmp_path / "recare.json").write_text("{broken")
    assert worldspec.mini_world_spec() == {}


def test_tasks_and_lookup():
    assert [t["reference_word"] for t in worldspec.mini_world_tasks(SPEC)] == ["tench", "van gogh"]
    assert worldspec.task_for_prompt("A Photo of a  TENCH", SPEC)["reference_word"] == "tench"
    assert worldspec.task_for_reference("Van Gogh", SPEC)["prompt_style"] == "painting"
    assert worldspec.task_for_prompt("a photo of a cat", SPEC) is None


def test_defaults_take_known_fields_and_the_task():
    gen = worldspec.generate_defaults(SPEC)
    assert (gen.prompt, gen.steps, gen.base_seed) == ("a photo of a tench", 25, 42)
    cs = worldspec.careset_defaults(SPEC, worldspec.task_for_reference("van gogh", SPEC))
    assert (cs.reference_word, cs.prompt_style, cs.top_k, cs.top_n, cs.n_clusters) == ("van gogh", "painting", 10, 40, 5)
    assert cs.alpha == CareSetConfig().alpha
    assert worldspec.careset_defaults({"careset": {"top_k": -3}}) == CareSetConfig()  # invalid: library defaults
    assert worldspec.mini_world_words(SPEC) == ["tench", "lake", "stars"]
    assert worldspec.mini_world_words({}) is None


def test_recare_spec_round_trips_the_shipped_recare_json():
    """recare.json rewritten from the world's code keeps every measured section (evaluation, unlearning, ...)."""
    import json
    from pathlib import Path

    from recare.miniworld.train import previous_spec, recare_spec

    path = Path(__file__).resolve().parent.parent / "checkpoints" / "mini-world" / "recare.json"
    shipped = previous_spec(path)
    assert shipped is not None and {"evaluation", "unlearning"} <= set(shipped)
    assert recare_spec(record=shipped["training"], previous=shipped) == shipped
    again = json.loads(json.dumps(recare_spec(previous=shipped)))
    assert again["evaluation"] == shipped["evaluation"] and again["unlearning"] == shipped["unlearning"]
    assert again["training"] == shipped["training"]
    # a measured field of one task, and a section this code does not know, survive a rewrite too
    marked = {**shipped, "future_section": {"x": 1},
              "tasks": {**shipped["tasks"], "tench": {**shipped["tasks"]["tench"], "measured": {"asr": 0.1}}}}
    rewritten = recare_spec(previous=marked)
    assert rewritten["future_section"] == {"x": 1} and rewritten["tasks"]["tench"]["measured"] == {"asr": 0.1}
    assert "unlearning" not in recare_spec()  # nothing measured without a previous file
