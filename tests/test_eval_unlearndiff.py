"""UnlearnDiff: the simplex projection, the straight-through sampler, the prefix path through the real text
encoder, and the whole attack on a tiny model with a planted trigger word."""

import types

import pytest
import torch

from recare.eval.unlearndiff import (
    PrefixEmbedding, UnlearnDiff, UnlearnDiffSettings, attack_timesteps, candidate_ids, k_for_concept, prefixed_ids,
    project_to_simplex, straight_through_sample,
)
from tests.helpers_tiny import build_tiny_pipeline

TRIGGER = "red"
WORDS = ["red", "man", "the", "and", "in", "on", "of", "to", "is", "for", "with", "it", "he", "we", "this", "her", "his",
         "are", "one", "all", "out", "up"]   # one token each in the tiny vocabulary


def test_schedule_and_prefix_length_follow_the_paper():
    schedule = attack_timesteps(50)
    assert schedule[:3] == [10, 30, 50] and schedule[-1] == 990 and len(schedule) == 50
    assert attack_timesteps(10) == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
    assert (k_for_concept("tench"), k_for_concept("van gogh"), k_for_concept("nudity")) == (3, 3, 5)


def test_projection_onto_the_simplex_by_hand():
    rows = torch.tensor([[0.5, 0.5, 0.0],      # already on the simplex: unchanged
                         [1.0, 1.0, 0.0],      # theta = 0.5 -> (0.5, 0.5, 0)
                         [2.0, 0.0, 0.0],      # theta = 1 -> (1, 0, 0)
                         [0.1, 0.1, 0.1]])     # theta = -0.2333 -> uniform
    out = project_to_simplex(rows)
    assert torch.allclose(out, torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0],
                                             [1 / 3, 1 / 3, 1 / 3]]), atol=1e-6)
    # the projection is the closest point of the simplex: no random simplex point is closer
    v = torch.randn(4, 7)
    p = project_to_simplex(v)
    assert torch.allclose(p.sum(-1), torch.ones(4), atol=1e-6) and bool((p >= 0).all())
    others = torch.distributions.Dirichlet(torch.ones(7)).sample((500,))
    for row, proj in zip(v, p):
        assert float((row - proj).norm()) <= float((row - others).norm(dim=-1).min()) + 1e-6


def test_straight_through_sampling():
    probs = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    one_hot = straight_through_sample(probs, torch.Generator().manual_seed(0))
    assert one_hot.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]      # a certain row draws its token
    (one_hot * torch.tensor([[3.0, -0.5, 0.2], [-2.0, 0.0, 1.0]])).sum().backward()
    assert torch.allclose(probs.grad, torch.tensor([[1.0, -0.5, 0.2], [-1.0, 0.0, 1.0]]))   # hardtanh of the gradient


@pytest.fixture(scope="module")
def tiny():
    pipe = build_tiny_pipeline(seed=0)
    pipe.text_encoder.eval()
    return pipe


def test_prefix_rows_go_through_the_installed_text_encoder(tiny):
    tok, enc = tiny.tokenizer, tiny.text_encoder
    ids = prefixed_ids(tok, "a boat", 2)
    plain = tok("red man a boat", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == plain.shape and ids[0, 0] == tok.bos_token_id and ids[0, 3:].tolist() == plain[0, 3:].tolist()
    wrapped = PrefixEmbedding(enc.get_input_embeddings())
    rows = enc.get_input_embeddings().weight[[tok.convert_tokens_to_ids("red</w>"), tok.convert_tokens_to_ids("man</w>")]]
    wrapped.prefix = rows.detach()
    from recare.train.textual_inversion import share_weights_copy

    copy = share_weights_copy(enc)
    copy.set_input_embeddings(wrapped)
    with torch.no_grad():
        assert torch.allclose(copy(ids)[0], enc(plain)[0], atol=1e-5)   # the same as typing the words
    assert enc.get_input_embeddings() is not wrapped                 # the model itself is not changed


class TriggerUNet(torch.nn.Module):
    """A stand-in UNet that denoises the reference latent exactly when the prompt's first token is the trigger.

    Its noise estimate is the true noise of x_t = sqrt(abar) x0 + sqrt(1 - abar) n times (1 - e), where
    e = || h_1 - h_trigger ||^2 / scale is how far the text state at position 1 (right after <sot>) lies
    from the trigger's: only the trigger there makes the loss vanish; every other prefix leaves an error.
    """

    def __init__(self, x0, alphas, trigger_state, scale):
        super().__init__()
        self.x0, self.alphas, self.trigger, self.scale = x0, alphas, trigger_state, scale
        self.anchor = torch.nn.Parameter(torch.zeros(()))   # gives the module a device and dtype

    def forward(self, sample, timestep, encoder_hidden_states):
        a = self.alphas[int(timestep)]
        noise = (sample - a.sqrt() * self.x0) / (1 - a).sqrt()
        e = ((encoder_hidden_states[:, 1] - self.trigger) ** 2).sum(-1) / self.scale
        return types.SimpleNamespace(sample=noise * (1 - e).view(-1, 1, 1, 1) + self.anchor)


def planted(tiny, candidates):
    tok, enc = tiny.tokenizer, tiny.text_encoder
    with torch.no_grad():
        states = torch.stack([enc(torch.tensor([[tok.bos_token_id, c, tok.eos_token_id]]))[0][0, 1]
                              for c in candidates])
        trigger_state = enc(tok(TRIGGER, return_tensors="pt").input_ids)[0][0, 1]
    scale = float(((states - trigger_state) ** 2).sum(-1).max())
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return TriggerUNet(x0, tiny.scheduler.alphas_cumprod.float(), trigger_state, scale), x0


def test_unlearndiff_finds_the_planted_trigger(tiny):
    candidates = candidate_ids(tiny.tokenizer, WORDS)
    unet, x0 = planted(tiny, candidates)
    assert len(candidates) == len(WORDS)          # every word is one token of the tiny vocabulary
    checked = []

    def shows_target(prompt):                     # the judge: the trigger word leads the prompt
        checked.append(prompt)
        return prompt.split()[0] == TRIGGER

    settings = UnlearnDiffSettings(k=3, timesteps=3, iterations=40, seed=1)
    attack = UnlearnDiff(unet, tiny.text_encoder, tiny.tokenizer, tiny.scheduler, candidates, settings)
    result = attack.attack("a boat", x0, shows_target)
    assert result.success and not result.before and result.prefix[0] == TRIGGER + "</w>"
    assert result.final_prompt.startswith(TRIGGER + " ") and result.final_prompt.endswith(" a boat")
    assert checked[0] == "a boat" and result.checks == len(checked) <= 4
    assert result.timestep in attack_timesteps(3)

    # without the trigger among the candidates nothing works: every timestep runs, no success
    others = candidate_ids(tiny.tokenizer, [w for w in WORDS if w != TRIGGER])
    short = UnlearnDiffSettings(k=3, timesteps=2, iterations=3, seed=1)
    failed = UnlearnDiff(unet, tiny.text_encoder, tiny.tokenizer, tiny.scheduler, others, short).attack(
        "a boat", x0, shows_target)
    assert not failed.success and failed.checks == 1 + 2 and len(failed.losses) == 2
    assert failed.prefix[0] != TRIGGER + "</w>"

    # a prompt whose plain image already shows the target succeeds before the attack, with no optimisation
    before = UnlearnDiff(unet, tiny.text_encoder, tiny.tokenizer, tiny.scheduler, candidates, short).attack(
        "red boat", x0, shows_target)
    assert before.success and before.before and before.final_prompt == "red boat" and before.losses == []


def test_bounded_settings():
    from recare.config import ConfigError
    from recare.eval.config import MAX_ATTACK_RUNS, EvaluationConfig

    for bad, match in (({"attack_runs": 0}, "attack_runs must be at least 1"),
                       ({"attack_runs": MAX_ATTACK_RUNS + 1}, "attack_runs must be at most"),
                       ({"ud_prompts": []}, "non-empty list"), ({"ud_prompts": ["a", "a"]}, "twice"),
                       ({"ud_k": 0}, "ud_k must be at least 1"), ({"ud_timesteps": 1001}, "at most 1000"),
                       ({"ud_seed": -1}, "ud_seed must be at least 0"), ({"attack_runs": 1.5}, "whole number")):
        with pytest.raises(ConfigError, match=match):
            EvaluationConfig(**bad)
