"""Stage 1 measured as a search (recare.train.stage1_probe) on the tiny pipeline: a planted token that
draws the target is measured as drawing it, one that does not is not, the erased model is really the one
probed, and the recipe records the fractions in metrics.jsonl and result.json without changing the weights."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from recare.careset_io import parse_official
from recare.config import (
    ConfigError, ESDConfig, GenerateConfig, RolloutConfig, Stage1Config, Stage2Config, TextualInversionConfig,
    TrainConfig,
)
from recare.errors import EvaluationError
from recare.train.recipe import train
from recare.train.stage1_probe import (
    ORIGINAL, PROBE_STAGE, PROBED, Stage1Probe, build_probe, probe_prompt, probe_rows,
)
from recare.train.textual_inversion import LearnedToken
from tests.helpers_tiny import build_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GEN = GenerateConfig(prompt="probe", num_images=4, steps=2, height=16, width=16, batch_size=4)
CARESET = {"tench_care_word": ["A river", "A lake"], "tench_care_word_photo": ["A photo of river", "A photo of lake"]}


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


def single_token_words(pipe, count: int) -> list[str]:
    words = [w for w in ("fish", "river", "red", "blue", "the", "and", "for", "is") if
             len(pipe.tokenizer(w, add_special_tokens=False).input_ids) == 1]
    assert len(words) >= count
    return words[:count]


def word_token(pipe, word: str) -> LearnedToken:
    """A "<v1*>" whose embedding is `word`'s row: "a photo of <v1*>" encodes exactly as "a photo of <word>"."""
    row = pipe.tokenizer(word, add_special_tokens=False).input_ids[0]
    return LearnedToken("<v1*>", word, pipe.text_encoder.get_input_embeddings().weight[row].detach().clone())


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])


def planted_judge(pipe, word: str, seeds_with_target: set[int]):
    """The target is in image i when i is planted and the image is the original model's "a photo of <word>"."""
    from recare.generate import generate_images

    reference = pixels(generate_images(pipe, dataclasses.replace(GEN, prompt=f"a photo of {word}")).images)
    calls = []

    def judge(images):
        got = pixels(images)
        calls.append(got)
        return [i in seeds_with_target and bool(np.abs(got[i] - reference[i]).max() <= 1.0) for i in range(len(got))]

    judge.calls = calls
    return judge


def changed_unet(pipe):
    unet = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        unet.conv_in.bias.add_(0.5)    # an "erased" model: the same prompt no longer gives the same images
    return unet


def test_a_token_that_draws_the_target_is_measured_on_the_original_and_the_erased_model(pipe):
    target, _ = single_token_words(pipe, 2)
    judge = planted_judge(pipe, target, {0, 1, 2, 3})
    token = word_token(pipe, target)
    strength = Stage1Probe(pipe, judge, GEN)(0, token, changed_unet(pipe))
    assert (strength.round, strength.token, strength.prompt, strength.seeds) == (1, "<v1*>", "a photo of <v1*>", 4)
    assert strength.original == 1.0      # the token draws the target on the original model
    assert strength.erased == 0.0        # the erased model's images differ: the probe generated with it
    assert strength.norm == pytest.approx(float(token.embedding.norm()), abs=1e-4)
    assert not np.array_equal(judge.calls[0], judge.calls[1])
    assert "draws the target in 100% of images on the original, 0% on the erased model" in strength.sentence()


def test_a_token_that_does_not_draw_the_target_scores_nothing_and_fractions_count_images(pipe):
    target, other = single_token_words(pipe, 2)
    judge = planted_judge(pipe, target, {0, 1, 2, 3})
    weak = Stage1Probe(pipe, judge, GEN)(1, word_token(pipe, other), pipe.unet)
    assert (weak.round, weak.original, weak.erased) == (2, 0.0, 0.0)
    half = Stage1Probe(pipe, planted_judge(pipe, target, {0, 2}), GEN)(0, word_token(pipe, target), pipe.unet)
    assert (half.original, half.erased) == (0.5, 0.5)   # the erased model here is the original itself


def test_probe_prompt_follows_the_task_style_and_probe_seeds_is_bounded():
    assert probe_prompt("<v2*>", "painting") == "a painting in the style of <v2*>"
    assert probe_prompt("<v2*>", "photo") == "a photo of <v2*>"
    assert Stage1Config().probe_seeds == 16
    for bad in (-1, 257, 1.5, True):
        with pytest.raises(ConfigError, match="probe_seeds"):
            Stage1Config(probe_seeds=bad)
    assert build_probe(TrainConfig.for_method("recare-no-adv"), None) is None
    assert build_probe(TrainConfig(stage1=Stage1Config(probe_seeds=0)), None) is None


def tiny(**stage1) -> TrainConfig:
    return TrainConfig.for_method(
        "recare", reference_word="tench", initializer_token="a", save_every=2,
        rollout=RolloutConfig(steps=10, resolution=16),
        stage1=Stage1Config(n_iterations=2, esd=ESDConfig(iterations=2, learning_rate=1e-3),
                            textual_inversion=TextualInversionConfig(steps=2, resolution=16), **stage1),
        stage2=Stage2Config(iterations=2, learning_rate=1e-3))


def test_the_recipe_records_each_rounds_strength_in_metrics_and_result_without_changing_the_weights(pipe, tmp_path):
    images = [Image.new("RGB", (16, 16), (40 * i, 100, 200 - 30 * i)) for i in range(4)]
    calls = []

    def judge(images):   # the original model's images have the target in image 0, the erased ones none
        calls.append(pixels(images))
        return [images[0].info["probe_model"] == ORIGINAL and i == 0 for i in range(len(images))]

    probed = train(tiny(), pipe, images, parse_official(CARESET), tmp_path / "probed",
                   probe=Stage1Probe(pipe, judge, GEN))
    plain = train(tiny(), pipe, images, parse_official(CARESET), tmp_path / "plain", probe=None)
    assert all(torch.equal(a, b) for a, b in zip(probed.unet.state_dict().values(), plain.unet.state_dict().values()))
    rows = [json.loads(line) for line in (tmp_path / "probed" / "metrics.jsonl").read_text().splitlines()]
    probes = probe_rows(rows)
    assert [(r["stage"], r["step"], r["total"], r["original"], r["erased"], r["seeds"]) for r in probes] == \
        [(PROBE_STAGE, 1, 2, 0.25, 0.0, 4), (PROBE_STAGE, 2, 2, 0.25, 0.0, 4)]
    stages = [r["stage"] for r in rows]
    assert stages.index(PROBE_STAGE) > stages.index("stage1.textual_inversion")   # after round 1's inversion
    result = json.loads((tmp_path / "probed" / "result.json").read_text())
    assert [(p["round"], p["token"], p["original"], p["erased"]) for p in result["stage1_probe"]] == \
        [(1, "<v1*>", 0.25, 0.0), (2, "<v2*>", 0.25, 0.0)]
    assert not any(np.array_equal(calls[i], calls[i + 1]) for i in (0, 2))   # round r's erased UNet was probed
    assert "stage1_probe" not in json.loads((tmp_path / "plain" / "result.json").read_text())


def test_a_detector_that_cannot_load_skips_the_probe_and_says_why(pipe, tmp_path):
    images = [Image.new("RGB", (16, 16), (40 * i, 100, 200 - 30 * i)) for i in range(4)]

    def no_detector():
        raise EvaluationError("the classifier's weights are not on this machine")

    probe = Stage1Probe(pipe, no_detector, GEN, lazy=True)
    train(tiny(), pipe, images, parse_official(CARESET), tmp_path, probe=probe)
    result = json.loads((tmp_path / "result.json").read_text())
    assert "weights are not on this machine" in result["stage1_probe_skipped"] and "stage1_probe" not in result
    assert not probe_rows([json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()])


def test_min_token_strength_is_a_bounded_fraction_that_needs_the_probe():
    assert Stage1Config().min_token_strength == 0.0      # official: every token joins H
    for bad in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ConfigError, match="min_token_strength"):
            Stage1Config(min_token_strength=bad)
    with pytest.raises(ConfigError, match="probe_seeds above 0"):
        Stage1Config(min_token_strength=0.5, probe_seeds=0)


def sequence_judge(original_hits: list[bool]):
    """The i-th probed inversion draws the target in every original-model image when original_hits[i], never on
    the erased model (each probe judges the erased model's images, then the original model's)."""
    probes = []

    def judge(images):
        if images[0].info["probe_model"] == PROBED:
            probes.append(1)
            return [False] * len(images)
        return [original_hits[len(probes) - 1]] * len(images)

    return judge


def test_a_token_weaker_than_min_token_strength_stays_out_of_stage_twos_erase_set(pipe, tmp_path):
    images = [Image.new("RGB", (16, 16), (40 * i, 100, 200 - 30 * i)) for i in range(4)]
    careset = parse_official(CARESET)
    config = tiny(min_token_strength=0.5)
    mixed = train(config, pipe, images, careset, tmp_path / "mixed", probe=Stage1Probe(pipe, sequence_judge([True, False]), GEN))
    result = json.loads((tmp_path / "mixed" / "result.json").read_text())
    assert result["erase_set"] == ["tench", "<v1*>"] and result["tokens"] == ["<v1*>", "<v2*>"]   # both saved
    assert [p["joins_h"] for p in result["stage1_probe"]] == [True, False]
    rows = probe_rows([json.loads(line) for line in (tmp_path / "mixed" / "metrics.jsonl").read_text().splitlines()])
    assert [r["joins_h"] for r in rows] == [1.0, 0.0]
    every = train(tiny(), pipe, images, careset, tmp_path / "every", probe=Stage1Probe(pipe, sequence_judge([True, False]), GEN))
    assert json.loads((tmp_path / "every" / "result.json").read_text())["erase_set"] == ["tench", "<v1*>", "<v2*>"]
    assert not all(torch.equal(a, b) for a, b in zip(mixed.unet.state_dict().values(), every.unet.state_dict().values()))

    # no strong token at all: stage 2 is exactly the no-adversarial ablation (its generator is its own)
    weak = train(config, pipe, images, careset, tmp_path / "weak", probe=Stage1Probe(pipe, sequence_judge([False, False]), GEN))
    assert json.loads((tmp_path / "weak" / "result.json").read_text())["erase_set"] == ["tench"]
    no_adv = train(dataclasses.replace(config, method="recare-no-adv", stage1=None), pipe, images, careset,
                   tmp_path / "no-adv", probe=None)
    assert all(torch.equal(a, b) for a, b in zip(weak.unet.state_dict().values(), no_adv.unet.state_dict().values()))


def test_without_a_judge_every_token_joins_and_the_result_says_why(pipe, tmp_path):
    images = [Image.new("RGB", (16, 16), (40 * i, 100, 200 - 30 * i)) for i in range(4)]

    def no_detector():
        raise EvaluationError("the classifier's weights are not on this machine")

    train(tiny(min_token_strength=0.5), pipe, images, parse_official(CARESET), tmp_path,
          probe=Stage1Probe(pipe, no_detector, GEN, lazy=True))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["erase_set"] == ["tench", "<v1*>", "<v2*>"] and "not on this machine" in result["stage1_probe_skipped"]


def test_trains_probe_table_says_which_tokens_join_h():
    from ui.train_view import probe_table

    rows = [{"stage": PROBE_STAGE, "step": 1, "original": 0.94, "erased": 0.75, "seeds": 16, "norm": 1.6, "joins_h": 1.0},
            {"stage": PROBE_STAGE, "step": 2, "original": 0.0, "erased": 0.06, "seeds": 16, "norm": 1.5, "joins_h": 0.0}]
    html = probe_table(rows, TrainConfig.for_method("recare", reference_word="tench"), {})
    cells = [row.split("</tr>")[0] for row in html.split("<tr>")[2:]]
    assert "94%" in cells[0] and "<td>yes</td>" in cells[0]
    assert "0%" in cells[1] and "<td>no (too weak)</td>" in cells[1] and "in stage 2's H" in html


def searching(**stage1) -> TrainConfig:
    return tiny(min_token_strength=0.5, attempts=3, **stage1)


def test_attempts_bounded_and_need_the_probe():
    assert Stage1Config().attempts == 1
    for bad in (0, 9, 1.5, True):
        with pytest.raises(ConfigError, match="attempts"):
            Stage1Config(attempts=bad)
    with pytest.raises(ConfigError, match="attempts above 1 need the token probe"):
        Stage1Config(attempts=2, probe_seeds=0)


def test_a_round_searches_until_a_token_is_strong_enough_and_keeps_the_strongest(pipe, tmp_path):
    images = [Image.new("RGB", (16, 16), (40 * i, 100, 200 - 30 * i)) for i in range(4)]
    # round 1: the 1st inversion is weak, the 2nd strong (the search stops); round 2: three weak ones
    hits = [False, True, False, False, False]
    searched = train(searching(), pipe, images, parse_official(CARESET), tmp_path / "search",
                     probe=Stage1Probe(pipe, sequence_judge(hits), GEN))
    result = json.loads((tmp_path / "search" / "result.json").read_text())
    first, second = result["stage1_probe"]
    assert (first["attempt"], first["joins_h"], [t["attempt"] for t in first["attempts"]]) == (2, True, [1, 2])
    assert (second["attempt"], second["joins_h"], [t["attempt"] for t in second["attempts"]]) == (1, False, [1, 2, 3])
    assert result["erase_set"] == ["tench", "<v1*>"]
    rows = [json.loads(line) for line in (tmp_path / "search" / "metrics.jsonl").read_text().splitlines()]
    assert [r["attempt"] for r in rows if r["stage"] == PROBE_STAGE] == [1, 2, 1, 2, 3]
    assert [(r["step"], r["attempt"], r["inversions"]) for r in probe_rows(rows)] == [(1, 2, 2), (2, 1, 3)]
    # the kept round-1 token is the second inversion's (TI seed + 1), not the one a single inversion learns
    single = train(tiny(min_token_strength=0.5), pipe, images, parse_official(CARESET), tmp_path / "single",
                   probe=Stage1Probe(pipe, sequence_judge([True, False]), GEN))
    assert not torch.equal(searched.tokens[0].embedding, single.tokens[0].embedding)
    ti = dataclasses.replace(searching().stage1.textual_inversion, seed=searching().stage1.textual_inversion.seed + 1)
    assert ti.seed == 43


# events: 1-2 erase r1, 3-4 TI a1, 5 probe, 6-7 TI a2, 8 probe (strong: round 1 ends), 9-10 erase r2, 11-12 TI a1,
# 13 probe, 14-15 TI a2, 16 probe, 17-18 TI a3, 19 probe, 20-21 stage 2
@pytest.mark.parametrize("stop_after", [4, 5, 6, 8, 14, 18])
def test_a_search_cancelled_anywhere_resumes_to_the_same_tokens_and_weights(pipe, tmp_path, stop_after):
    from recare.errors import Cancelled
    from recare.progress import CancelToken
    from tests.helpers_tiny import cancel_after

    images = [Image.new("RGB", (16, 16), (40 * i, 100, 200 - 30 * i)) for i in range(4)]
    hits = [False, True, False, False, False]
    straight = train(searching(), pipe, images, parse_official(CARESET), tmp_path / "straight",
                     probe=Stage1Probe(pipe, sequence_judge(hits), GEN))
    token, seen, judge = CancelToken(), [], sequence_judge(hits)   # one judge: a resumed run repeats no probe
    with pytest.raises(Cancelled):
        train(searching(), pipe, images, parse_official(CARESET), tmp_path / "cut", progress=cancel_after(token, stop_after, seen),
              cancel=token, probe=Stage1Probe(pipe, judge, GEN))
    rest = []
    resumed = train(searching(), pipe, images, parse_official(CARESET), tmp_path / "cut", progress=rest.append,
                    probe=Stage1Probe(pipe, judge, GEN))
    assert len(seen) + len(rest) == 21   # nothing done twice or skipped
    assert all(torch.equal(a.embedding, b.embedding) for a, b in zip(resumed.tokens, straight.tokens))
    assert all(torch.equal(a, b) for a, b in zip(resumed.unet.state_dict().values(), straight.unet.state_dict().values()))
    kept = [(p["round"], p["attempt"], len(p["attempts"])) for p in
            json.loads((tmp_path / "cut" / "result.json").read_text())["stage1_probe"]]
    assert kept == [(1, 2, 2), (2, 1, 3)]


def test_trains_probe_table_names_a_search_with_several_inversions():
    from ui.train_view import probe_table

    rows = probe_rows([{"stage": PROBE_STAGE, "step": 1, "original": o, "erased": 0.1, "seeds": 16, "norm": 1.5,
                        "joins_h": float(o >= 0.5), "attempt": a} for a, o in ((1, 0.1), (2, 0.6))])
    assert [(r["attempt"], r["original"], r["inversions"]) for r in rows] == [(2, 0.6, 2)]
    html = probe_table(rows, TrainConfig.for_method("recare", reference_word="tench"), {})
    assert "strongest of 2 inversions" in html and "60%" in html and "<td>yes</td>" in html


def test_search_original_inverts_against_the_original_unet_when_no_attempt_is_strong(pipe, tmp_path):
    from recare.train.recipe import round_images
    from recare.train.textual_inversion import learn_token

    with pytest.raises(ConfigError, match="search_original needs min_token_strength"):
        Stage1Config(search_original=True)
    images = [Image.new("RGB", (16, 16), (40 * i, 100, 200 - 30 * i)) for i in range(4)]
    config = tiny(min_token_strength=0.5, attempts=2, search_original=True)
    # round 1: two weak inversions against the erased UNet, then a strong one against the original;
    # round 2: nothing is strong (three inversions, the first kept)
    hits = [False, False, True, False, False, False]
    events = []
    result = train(config, pipe, images, parse_official(CARESET), tmp_path, progress=events.append,
                   probe=Stage1Probe(pipe, sequence_judge(hits), GEN))
    said = [e.message for e in events if e.stage == PROBE_STAGE]
    assert said[2].startswith("round 1, inversion 3 of up to 3:") and "too weak" not in said[2]
    first, second = result.summary["stage1_probe"]
    assert (first["attempt"], len(first["attempts"]), first["joins_h"]) == (3, 3, True)
    assert (second["attempt"], len(second["attempts"]), second["joins_h"]) == (1, 3, False)
    assert result.summary["erase_set"] == ["tench", "<v1*>"]
    ti = dataclasses.replace(config.stage1.textual_inversion, seed=config.stage1.textual_inversion.seed + 2)
    direct = learn_token((pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler),
                         round_images(images, 0, 2), placeholder="<v1*>", config=ti)
    assert torch.equal(direct.embedding, result.tokens[0].embedding)   # inverted against the original UNet


def test_trains_progress_waits_while_a_round_runs_another_inversion():
    from ui.train_view import current_phase

    plan = [("stage1.erase[1]", 2), ("stage1.textual_inversion[1]", 3), ("stage1.erase[2]", 2),
            ("stage1.textual_inversion[2]", 3), ("stage2", 2)]
    rows = [{"stage": "stage1.erase", "step": s} for s in (1, 2)] + \
        [{"stage": "stage1.textual_inversion", "step": s} for s in (1, 2, 3)]
    extra = [{"stage": "stage1.textual_inversion", "step": s} for s in (1, 2)]   # the search's second inversion
    assert current_phase(rows, plan, {}) == ("stage1.erase[2]", 5)
    assert current_phase(rows + extra, plan, {"progress": {"stage": "stage1.textual_inversion", "step": 2}}) == \
        ("stage1.erase[2]", 5)
    later = rows + extra + [{"stage": "stage1.textual_inversion", "step": 3}, {"stage": "stage1.erase", "step": 1}]
    assert current_phase(later, plan, {"progress": {"stage": "stage1.erase", "step": 1}}) == ("stage1.erase[2]", 6)
