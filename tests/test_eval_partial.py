"""Provisional metrics of a running evaluation (`partial_metrics`) and custom prompts (`extra_prompts`), on tiny models."""

import json

import pytest

from recare.config import ConfigError
from recare.errors import Cancelled, EvaluationError
from recare.eval.config import EvaluationConfig, resolve_config
from recare.eval.plan import CARE, EXTRA, build_plan, planned_counts, prompt_table
from recare.eval.records import partial_records, read_records
from recare.eval.run import evaluate
from recare.eval.run_metrics import compute_metrics, partial_metrics
from recare.progress import CancelToken
from tests.helpers_tiny import make_tiny_eval_world

EXTRA_PROMPTS = ["a boat on a lake", "a man on the grass"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_eval_world(tmp_path_factory.mktemp("tiny-partial"))


def settings(tiny, **changes) -> EvaluationConfig:
    """erased (1 prompt) x 2 seeds, 2 custom prompts x 2 seeds, 3 CARE prompts (2 concepts) x 2 seeds, 3 captions."""
    base = dict(model=str(tiny / "pipeline"), target_prompt="a photo of a fish", target_concept="tench",
                care_prompts={"water": ["a lake", "a river"], "person": ["a man"]}, care_labels=["person", "fish"],
                encoder=str(tiny / "clip"), detector="oracle", clip_prompts=str(tiny / "captions.txt"),
                attacks=["erased"], extra_prompts=list(EXTRA_PROMPTS), seeds=2, care_images_per_prompt=2, steps=2,
                height=64, width=64, batch_size=2, device="cpu")
    return EvaluationConfig(**{**base, **changes})


def test_extra_prompts_config_is_checked_and_old_configs_still_load():
    assert EvaluationConfig.from_dict({"task": "tench"}).extra_prompts == []  # a config.json from before the field
    for bad, match in (([""], "non-empty"), (["a", "a"], "twice"), ("a boat", "list")):
        with pytest.raises(ConfigError, match=match):
            EvaluationConfig(extra_prompts=bad)


def test_partial_metrics_follow_the_records_then_equal_the_final_ones(tiny, tmp_path):
    config = settings(tiny)
    resolved = resolve_config(config)
    planned = planned_counts(resolved)
    assert planned == {"erased": 2, EXTRA: 4, CARE: 6, "clip": 3}
    table = prompt_table(resolved)
    assert [(r["set"], r["prompt"], r["seeds"]) for r in table[:3]] == [
        ("erased", "a photo of a fish", [42, 43]), (EXTRA, EXTRA_PROMPTS[0], [42, 43]), (EXTRA, EXTRA_PROMPTS[1], [42, 43])]
    assert [(r["concept"], r["prompt"]) for r in table[3:]] == [("water", "a lake"), ("water", "a river"),
                                                                ("person", "a man")]

    cancel = CancelToken()

    def stop_in_the_care_images(event):  # erased (2) + extra (4) + one CARE batch (2)
        if event.stage == "evaluate" and event.step >= 8:
            cancel.cancel()

    with pytest.raises(Cancelled):
        evaluate(config, out=tmp_path, progress=stop_in_the_care_images, cancel=cancel)
    (run_dir,) = tmp_path.iterdir()
    assert not (run_dir / "metrics.json").exists()

    records = partial_records(run_dir)
    partial = partial_metrics(run_dir)
    by_set = {}
    for r in records:
        by_set.setdefault(r["attack"], []).append(r)
    assert {k: len(v) for k, v in by_set.items()} == {"erased": 2, EXTRA: 4, CARE: 2}
    assert partial["progress"] == {"images": 8, "planned": 15, "complete": False,
                                   "sets": {"erased": [2, 2], EXTRA: [4, 4], CARE: [2, 6], "clip": [0, 3]}}
    # the provisional numbers are the metrics of the records so far: ASR from the attack's images, CARE from the
    # one concept with images, no CLIP score yet, so no RATIO
    assert partial["asr"]["erased"] == pytest.approx(100 * sum(r["positive"] for r in by_set["erased"]) / 2)
    care_concepts = {r["concept"] for r in by_set[CARE]}
    assert set(partial["care_score"]["per_concept"]) == care_concepts
    for concept in care_concepts:
        hits = [r["care_hit"] for r in by_set[CARE] if r["concept"] == concept]
        assert partial["care_score"]["per_concept"][concept] == pytest.approx(sum(hits) / len(hits))
    assert partial["clip_score"] is None and partial["ratio"]["value"] is None
    # custom prompts: generated on the attacks' seeds, judged, never an ASR
    assert "extra" not in partial["asr"] and set(partial["extra_detected"]) == set(EXTRA_PROMPTS)
    assert sorted((r["prompt"], r["seed"]) for r in by_set[EXTRA]) == sorted(
        (p, s) for p in EXTRA_PROMPTS for s in (42, 43))
    assert all((run_dir / r["file"]).is_file() and r["file"].startswith("images/extra/") for r in by_set[EXTRA])

    result = evaluate(None, run_dir=run_dir)  # resume to the end
    final = partial_metrics(run_dir)
    assert final.pop("progress") == {"images": 15, "planned": 15, "complete": True,
                                     "sets": {"erased": [2, 2], EXTRA: [4, 4], CARE: [6, 6], "clip": [3, 3]}}
    assert final == json.loads((run_dir / "metrics.json").read_text()) == result.metrics
    assert compute_metrics(read_records(run_dir), resolved) == result.metrics
    assert sum(len(b.items) for b in build_plan(resolved, _ctx(resolved), ["c"] * 3)) == 15


def _ctx(config):
    from recare.eval.attacks import AttackContext

    return AttackContext(config, None)


def test_without_extra_prompts_the_plan_is_unchanged(tiny):
    resolved = resolve_config(settings(tiny, extra_prompts=[]))
    plan = build_plan(resolved, _ctx(resolved), ["c"] * 3)
    assert [b.attack for b in plan] == ["erased", CARE, CARE, CARE, "clip", "clip"]
    assert EXTRA not in planned_counts(resolved)


def test_partial_metrics_of_a_folder_that_is_not_an_evaluation(tmp_path):
    with pytest.raises(EvaluationError, match="not an evaluation run"):
        partial_metrics(tmp_path)
