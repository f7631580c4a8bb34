"""Stage 2's closing search (not official; `Stage2Config.closing_rounds`) on the tiny pipeline: after stage 2
the attacker's own search runs against the trained UNet; a token that still draws the target joins H and stage 2
goes on from the trained UNet; the first round whose token does not join ends it. Checked against the pieces run
by hand, through a cancel anywhere, and in the Train workspace's table and plan."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image

from recare.careset_io import parse_official
from recare.config import ConfigError, Stage2Config, TrainConfig
from recare.train.recipe import train
from recare.train.search import CLOSING_ERASE, CLOSING_SEED, CLOSING_TI, CLOSING_TI_SEED, round_images
from recare.train.stage1_probe import PROBE_STAGE, PROBED, Stage1Probe, probe_rows
from tests.test_train_stage1_probe import CARESET, GEN, tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGES = [Image.new("RGB", (16, 16), (40 * i, 100, 200 - 30 * i)) for i in range(4)]


@pytest.fixture(scope="module")
def pipe():
    from tests.helpers_tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


def closing_config(rounds: int = 2, **stage2) -> TrainConfig:
    config = tiny(min_token_strength=0.5)
    s2 = dataclasses.replace(config.stage2, closing_rounds=rounds, closing_attempts=2, closing_iterations=2, **stage2)
    return dataclasses.replace(config, stage2=s2)


def pair_judge(hits: list[tuple[bool, bool]]):
    """The i-th probe finds the target in every image of the original model when hits[i][0], of the probed
    (erased or trained) model when hits[i][1]. Each probe judges the probed model's images first, then the
    original's when it needs them; every image says which model drew it (`info["probe_model"]`)."""
    probes = []

    def judge(images):
        probed = images[0].info["probe_model"] == PROBED
        if probed:
            probes.append(1)
        return [hits[len(probes) - 1][1 if probed else 0]] * len(images)

    return judge


# stage 1: both rounds' tokens draw the target on the original (they join H); closing round 1: the first inversion
# still draws it on the trained UNet (it joins, the round stops); closing round 2: nothing on the trained UNet
HITS = [(True, False), (True, False), (True, True), (True, False), (False, False)]


def test_a_token_that_still_draws_the_target_joins_h_and_stage_two_goes_on_from_the_trained_unet(pipe, tmp_path):
    from recare.train.stage2 import Stage2Trainer
    from recare.train.textual_inversion import learn_token, with_learned_tokens
    from recare.train.rollout import encode_prompts

    careset = parse_official(CARESET)
    plain = train(closing_config(rounds=0), pipe, IMAGES, careset, tmp_path / "plain",
                  probe=Stage1Probe(pipe, pair_judge(HITS), GEN))
    closed = train(closing_config(closing_ti_steps=3), pipe, IMAGES, careset, tmp_path / "closed",
                   probe=Stage1Probe(pipe, pair_judge(HITS), GEN))
    result = json.loads((tmp_path / "closed" / "result.json").read_text())
    assert result["erase_set"] == ["tench", "<v1*>", "<v2*>", "<v3*>"] and result["tokens"] == ["<v1*>", "<v2*>", "<v3*>"]
    first, second = result["closing_probe"]
    assert (first["closing_round"], first["attempt"], first["erased"], first["joins_h"]) == (1, 1, 1.0, True)
    assert [t["attempt"] for t in first["attempts"]] == [1]              # strong at once: the round stops
    assert (second["attempt"], second["joins_h"], len(second["attempts"])) == (1, False, 2)   # ties: the earliest
    rows = [json.loads(line) for line in (tmp_path / "closed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == CLOSING_ERASE] == [1, 2]          # one round's iterations
    assert [(r["step"], r["closing"], r["joins_h"]) for r in probe_rows(rows) if r.get("closing")] == \
        [(3, 1.0, 1.0), (4, 2.0, 0.0)]

    assert [r["step"] for r in rows if r["stage"] == CLOSING_TI][:3] == [1, 2, 3]      # closing_ti_steps

    # by hand: the token is a 3-step inversion against stage 2's UNet (TI seed + 100) on round 1's images, and the
    # UNet is stage 2's after closing_iterations more iterations with the larger H (generator seed + 1000)
    config = closing_config()
    ti = dataclasses.replace(config.stage1.textual_inversion, seed=config.stage1.textual_inversion.seed + CLOSING_TI_SEED,
                             steps=3)
    tokenizer, encoder = with_learned_tokens(pipe.tokenizer, pipe.text_encoder, plain.tokens)
    stage2_unet = plain.unet.requires_grad_(False)
    token = learn_token((stage2_unet, pipe.vae, encoder, tokenizer, pipe.scheduler), round_images(IMAGES, 0, 2),
                        placeholder="<v3*>", config=ti)
    assert torch.equal(token.embedding, closed.tokens[2].embedding)
    h = ["tench", "<v1*>", "<v2*>", "<v3*>"]
    tokenizer, encoder = with_learned_tokens(pipe.tokenizer, pipe.text_encoder, [*plain.tokens, token])
    prompts = ["", *h, *careset.base_prompts, *careset.retain_prompts]
    from recare.train.rollout import XtSampler

    size = config.rollout.resolution // 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    sampler = XtSampler(pipe.scheduler, (pipe.unet.config.in_channels, size, size), config.rollout, stage2_unet.device)
    trainer = Stage2Trainer(stage2_unet, pipe.unet, sampler, encode_prompts(tokenizer, encoder, prompts), h,
                            careset.base_prompts, careset.retain_prompts,
                            dataclasses.replace(config.stage2, iterations=2), seed=config.seed + CLOSING_SEED)
    trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(stage2_unet.state_dict().values(), closed.unet.state_dict().values()))


def test_a_first_closing_token_that_does_not_join_leaves_stage_twos_unet(pipe, tmp_path):
    careset = parse_official(CARESET)
    nothing = [(True, False), (True, False), (True, False), (True, False)]   # on the trained UNet: never
    plain = train(closing_config(rounds=0), pipe, IMAGES, careset, tmp_path / "plain",
                  probe=Stage1Probe(pipe, pair_judge(nothing), GEN))
    closed = train(closing_config(), pipe, IMAGES, careset, tmp_path / "closed",
                   probe=Stage1Probe(pipe, pair_judge(nothing), GEN))
    assert all(torch.equal(a, b) for a, b in zip(plain.unet.state_dict().values(), closed.unet.state_dict().values()))
    result = closed.summary
    assert result["erase_set"] == ["tench", "<v1*>", "<v2*>"] and len(closed.tokens) == 2
    assert [(p["closing_round"], len(p["attempts"]), p["joins_h"]) for p in result["closing_probe"]] == [(1, 2, False)]
    assert "closing_probe" not in plain.summary


def test_without_a_judge_each_closing_rounds_first_inversion_joins(pipe, tmp_path):
    from recare.errors import EvaluationError

    def no_detector():
        raise EvaluationError("the classifier's weights are not on this machine")

    events = []
    result = train(closing_config(), pipe, IMAGES, parse_official(CARESET), tmp_path, progress=events.append,
                   probe=Stage1Probe(pipe, no_detector, GEN, lazy=True))
    assert result.summary["erase_set"] == ["tench", "<v1*>", "<v2*>", "<v3*>", "<v4*>"]
    assert [e.step for e in events if e.stage == CLOSING_ERASE] == [1, 2, 1, 2]
    assert "not on this machine" in result.summary["stage1_probe_skipped"]


# events: 1-2 erase r1, 3-4 TI, 5 probe, 6-7 erase r2, 8-9 TI, 10 probe, 11-12 stage 2, 13-14 closing TI 1,
# 15 probe (joins), 16-17 closing erase 1, 18-19 closing TI 2 a1, 20 probe, 21-22 TI a2, 23 probe (the search ends)
@pytest.mark.parametrize("stop_after", [12, 13, 15, 16, 17, 19, 21])
def test_a_closing_search_cancelled_anywhere_resumes_to_the_same_tokens_and_weights(pipe, tmp_path, stop_after):
    from recare.errors import Cancelled
    from recare.progress import CancelToken
    from tests.helpers_tiny import cancel_after

    careset = parse_official(CARESET)
    straight = train(closing_config(), pipe, IMAGES, careset, tmp_path / "straight",
                     probe=Stage1Probe(pipe, pair_judge(HITS), GEN))
    token, seen, judge = CancelToken(), [], pair_judge(HITS)   # one judge: a resumed run repeats no probe
    with pytest.raises(Cancelled):
        train(closing_config(), pipe, IMAGES, careset, tmp_path / "cut", progress=cancel_after(token, stop_after, seen),
              cancel=token, probe=Stage1Probe(pipe, judge, GEN))
    rest = []
    resumed = train(closing_config(), pipe, IMAGES, careset, tmp_path / "cut", progress=rest.append,
                    probe=Stage1Probe(pipe, judge, GEN))
    assert len(seen) + len(rest) == 23   # nothing done twice or skipped
    assert [t.placeholder for t in resumed.tokens] == ["<v1*>", "<v2*>", "<v3*>"]
    assert all(torch.equal(a.embedding, b.embedding) for a, b in zip(resumed.tokens, straight.tokens))
    assert all(torch.equal(a, b) for a, b in zip(resumed.unet.state_dict().values(), straight.unet.state_dict().values()))
    untimed = lambda entries: json.loads(json.dumps(entries).replace('"seconds"', '"_"'), object_hook=lambda d: {
        k: v for k, v in d.items() if k != "_"})
    assert untimed(resumed.summary["closing_probe"]) == untimed(straight.summary["closing_probe"])


# stage 1 as HITS; closing round 1: the first inversion's candidate after 1 step (a) or after its 3 (b) still
# draws the target on the trained UNet; closing round 2: no candidate does
ON_THE_WAY = [(True, False), (True, False), (True, True), *[(True, False)] * 4]
AT_THE_END = [(True, False), (True, False), (True, False), (True, True), *[(True, False)] * 4]


@pytest.mark.parametrize("hits, steps", [(ON_THE_WAY, 1), (AT_THE_END, 3)])
def test_a_closing_inversion_probed_on_the_way_offers_both_candidates_and_goes_on_bit_for_bit(pipe, tmp_path,
                                                                                              hits, steps):
    from recare.train.textual_inversion import learn_token, with_learned_tokens

    careset = parse_official(CARESET)
    config = closing_config(closing_ti_steps=3, closing_probe_steps=1)
    assert config.closing_checkpoints == (1, 3)
    plain = train(closing_config(rounds=0), pipe, IMAGES, careset, tmp_path / "plain",
                  probe=Stage1Probe(pipe, pair_judge(hits), GEN))
    closed = train(config, pipe, IMAGES, careset, tmp_path / "closed", probe=Stage1Probe(pipe, pair_judge(hits), GEN))
    first, second = closed.summary["closing_probe"]
    assert (first["steps"], first["erased"], first["joins_h"]) == (steps, 1.0, True)   # strong: the round stops
    assert [t["steps"] for t in first["attempts"]] == [1, 3][:1 + (steps == 3)]
    assert [(t["attempt"], t["steps"]) for t in second["attempts"]] == [(1, 1), (2, 3), (3, 1), (4, 3)]
    assert second["joins_h"] is False and closed.summary["erase_set"][-1] == "<v3*>"
    # the kept candidate is the inversion stopped after `steps` (TI seed + 100), against stage 2's UNet
    ti = dataclasses.replace(config.stage1.textual_inversion, seed=config.stage1.textual_inversion.seed + CLOSING_TI_SEED,
                             steps=steps)
    tokenizer, encoder = with_learned_tokens(pipe.tokenizer, pipe.text_encoder, plain.tokens)
    token = learn_token((plain.unet.requires_grad_(False), pipe.vae, encoder, tokenizer, pipe.scheduler),
                        round_images(IMAGES, 0, 2), placeholder="<v3*>", config=ti)
    assert torch.equal(token.embedding, closed.tokens[2].embedding)
    rows = [json.loads(line) for line in (tmp_path / "closed" / "metrics.jsonl").read_text().splitlines()]
    sentences = [r for r in rows if r["stage"] == PROBE_STAGE and r.get("closing")]
    assert [r["steps"] for r in sentences] == [1, 3][:1 + (steps == 3)] + [1, 3, 1, 3]


def share_judge(shares: list[tuple[int, int]], judged: list):
    """The i-th probe finds the target in the first shares[i][0] images of the original model and the first
    shares[i][1] of the probed one; `judged` collects (probe, model) per call."""
    probes = []

    def judge(images):
        model = images[0].info["probe_model"]
        probes.extend([1] if model == PROBED else [])
        judged.append((len(probes), model))
        return [i < shares[len(probes) - 1][0 if model != PROBED else 1] for i in range(len(images))]

    return judge


class EveryOriginal(Stage1Probe):
    """The probe as it was before the closing search could skip the original: it always measures it."""

    def __call__(self, round_index, token, erased_unet, original_if=None):
        return super().__call__(round_index, token, erased_unet)


def test_the_closing_search_skips_the_original_only_where_it_cannot_change_the_search(pipe, tmp_path, monkeypatch):
    """Closing round 1: the first candidate draws the target in 2 of 4 images on the trained UNet, the second in 1
    (less: its original is not probed), the third in 2 (a tie: probed, and kept on the original's 4 of 4)."""
    monkeypatch.setattr("recare.train.search.CLOSING_EARLY_STOP", 1.0)     # no early stop: every candidate runs
    careset = parse_official(CARESET)
    config = closing_config(rounds=1, closing_ti_steps=3, closing_probe_steps=1)
    shares = [(4, 0), (4, 0), (3, 2), (4, 1), (4, 2), (0, 0)]
    judged, judged_every = [], []
    events = []
    lazy = train(config, pipe, IMAGES, careset, tmp_path / "lazy", progress=events.append,
                 probe=Stage1Probe(pipe, share_judge(shares, judged), GEN))
    every = train(config, pipe, IMAGES, careset, tmp_path / "every",
                  probe=EveryOriginal(pipe, share_judge(shares, judged_every), GEN))
    assert all(torch.equal(a, b) for a, b in zip(lazy.unet.state_dict().values(), every.unet.state_dict().values()))
    assert lazy.summary["erase_set"] == every.summary["erase_set"] == ["tench", "<v1*>", "<v2*>", "<v3*>"]
    assert torch.equal(lazy.tokens[2].embedding, every.tokens[2].embedding)
    (entry,) = lazy.summary["closing_probe"]
    assert [(t["attempt"], t["original"], t["erased"]) for t in entry["attempts"]] == \
        [(1, 0.75, 0.5), (2, None, 0.25), (3, 1.0, 0.5), (4, None, 0.0)]
    assert (entry["attempt"], entry["original"], entry["erased"], entry["joins_h"]) == (3, 1.0, 0.5, True)
    assert [(t["attempt"], t["original"]) for t in every.summary["closing_probe"][0]["attempts"]] == \
        [(1, 0.75), (2, 1.0), (3, 1.0), (4, 0.0)]
    # stage 1's probes and the closing candidates that could matter judge both models, the probed one first
    assert [m for p, m in judged if p > 2] == ["probed", "original", "probed", "probed", "original", "probed"]
    rows = [json.loads(line) for line in (tmp_path / "lazy" / "metrics.jsonl").read_text().splitlines()]
    assert [r["attempt"] for r in rows if r["stage"] == PROBE_STAGE and r.get("closing") and "original" not in r] \
        == [2.0, 4.0]
    said = [e.message for e in events if e.stage == PROBE_STAGE and "closing round" in e.message]
    assert len(said) == 4 and "0.25" not in said[1] and \
        "draws the target in 25% of images on the trained model, less than the round's kept candidate " \
        "(the original was not probed); stays out of H" in said[1]


def test_a_closing_search_probed_on_the_way_resumes_from_any_cut_to_the_same_run(pipe, tmp_path):
    from recare.errors import Cancelled
    from recare.progress import CancelToken
    from tests.helpers_tiny import cancel_after

    careset = parse_official(CARESET)
    config = closing_config(closing_ti_steps=3, closing_probe_steps=1)
    events = []
    straight = train(config, pipe, IMAGES, careset, tmp_path / "straight", progress=events.append,
                     probe=Stage1Probe(pipe, pair_judge(AT_THE_END), GEN))
    stages = [e.stage for e in events]
    first_probe = next(i for i, e in enumerate(events) if e.stage == PROBE_STAGE and "closing" in e.metrics)
    # cut: at the on-the-way probe, at the continued inversion's first step, and inside the next round's inversion
    cuts = [first_probe + 1, first_probe + 2, len(stages) - stages[::-1].index(CLOSING_TI) - 1]
    assert stages[first_probe + 1] == CLOSING_TI and events[first_probe + 1].step == 2
    for n, stop_after in enumerate(cuts):
        token, seen, judge = CancelToken(), [], pair_judge(AT_THE_END)
        with pytest.raises(Cancelled):
            train(config, pipe, IMAGES, careset, tmp_path / f"cut{n}", progress=cancel_after(token, stop_after, seen),
                  cancel=token, probe=Stage1Probe(pipe, judge, GEN))
        rest = []
        resumed = train(config, pipe, IMAGES, careset, tmp_path / f"cut{n}", progress=rest.append,
                        probe=Stage1Probe(pipe, judge, GEN))
        assert len(seen) + len(rest) == len(events), stop_after
        assert all(torch.equal(a.embedding, b.embedding) for a, b in zip(resumed.tokens, straight.tokens))
        assert all(torch.equal(a, b) for a, b in zip(resumed.unet.state_dict().values(),
                                                     straight.unet.state_dict().values()))


def test_closing_settings_are_bounded_and_need_stage_one():
    assert (Stage2Config().closing_rounds, Stage2Config().closing_attempts) == (0, 3)   # off: the official stage 2
    for field, bad in (("closing_rounds", 5), ("closing_rounds", -1), ("closing_attempts", 0),
                       ("closing_attempts", 9), ("closing_iterations", 0), ("closing_rounds", 1.5),
                       ("closing_ti_steps", 0), ("closing_ti_steps", 2.5), ("closing_probe_steps", 0),
                       ("closing_probe_steps", 2.5)):
        with pytest.raises(ConfigError, match=field):
            Stage2Config(**{field: bad})
    with pytest.raises(ConfigError, match="need stage1 set"):
        TrainConfig.for_method("recare-no-adv", stage2=Stage2Config(closing_rounds=1))
    with pytest.raises(ConfigError, match="closing_probe_steps .3. must be below"):
        closing_config(closing_ti_steps=3, closing_probe_steps=3).validate()
    assert closing_config(closing_ti_steps=3).closing_checkpoints == (3,)


def test_train_shows_closing_rounds_in_its_plan_estimate_and_probe_table():
    from recare.train.speed import estimate_seconds, training_plan
    from ui.train_view import phase_label, probe_table

    config = closing_config()
    plan = training_plan(config)
    assert plan[-4:] == [(f"{CLOSING_TI}[1]", 2), (f"{CLOSING_ERASE}[1]", 2), (f"{CLOSING_TI}[2]", 2),
                         (f"{CLOSING_ERASE}[2]", 2)]
    assert training_plan(closing_config(closing_ti_steps=7))[-2] == (f"{CLOSING_TI}[2]", 7)
    assert phase_label(f"{CLOSING_TI}[2]") == "closing round 2: textual inversion against the trained UNet"
    speed = {"erase": 1.0, "textual_inversion": 10.0, "stage2": 100.0}
    base = estimate_seconds(closing_config(rounds=0), speed)
    assert estimate_seconds(config, speed) == base + 2 * 100.0 + 2 * 10.0          # one round, one inversion
    assert estimate_seconds(config, speed, longest=True) == \
        estimate_seconds(closing_config(rounds=0), speed, longest=True) + 2 * 2 * 100.0 + 2 * 2 * 2 * 10.0
    rows = probe_rows([{"stage": PROBE_STAGE, "step": 3, "original": 1.0, "erased": 0.38, "seeds": 16, "norm": 1.7,
                        "joins_h": 1.0, "attempt": 1, "closing": 1.0}])
    html = probe_table(rows, config, {})
    assert "closing round 1 (the trained model)" in html and "&lt;v3*&gt;" in html and "38%" in html
