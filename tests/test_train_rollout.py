"""The x_t roll-out: the official draws, schedule and timestep, and batching that samples the same thing."""

from __future__ import annotations

import copy

import pytest
import torch

from recare.config import RolloutConfig
from recare.train.rollout import XtSampler, cfg_pair, encode_prompts
from tests.helpers_tiny import build_tiny_pipeline

LATENT = (4, 8, 8)  # the tiny UNet takes any size; 8x8 keeps each call cheap
SHORT = RolloutConfig(steps=12)  # k in [1, 10]: the same code path as 50 steps, fewer UNet calls


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def embeddings(pipe):
    return encode_prompts(pipe.tokenizer, pipe.text_encoder, ["", "a photo of a tench", "a river"])


def official_rollout(pipe, cond, uncond, k, noise, guidance=3.0, steps=50):
    """The official `diffusion` loop, written out: a fresh scheduler at `steps` steps, [uncond, cond] per step."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    embeddings = torch.cat([uncond, cond])
    with torch.no_grad():
        for i in range(k):
            t = scheduler.timesteps[i]
            out = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=embeddings).sample
            u, c = out.chunk(2)
            latents = scheduler.step(u + guidance * (c - u), t, latents).prev_sample
    scheduler.set_timesteps(1000)
    return latents, int(scheduler.timesteps[int(k / steps * 1000)])


def test_k_is_uniform_on_1_to_48(pipe):
    sampler = XtSampler(pipe.scheduler, LATENT)
    g = torch.Generator().manual_seed(0)
    ks = [sampler.draw_k(g) for _ in range(4000)]
    assert min(ks) == 1 and max(ks) == 48
    assert set(ks) == set(range(1, 49))
    counts = torch.bincount(torch.tensor(ks))[1:].float()
    assert counts.min() > 40 and counts.max() < 130  # about 83 each


def test_prediction_timestep_is_the_official_index(pipe):
    from diffusers import DDIMScheduler

    sampler = XtSampler(pipe.scheduler, LATENT)   # steps_offset 1, as SD v1.4's DDIM config
    assert pipe.scheduler.config.steps_offset == 1
    assert [sampler.prediction_timestep(k) for k in (1, 2, 24, 48)] == [1000 - 20 * k for k in (1, 2, 24, 48)]
    assert sampler.rollout_timesteps[:3] == [981, 961, 941]
    no_offset = DDIMScheduler.from_config({**pipe.scheduler.config, "steps_offset": 0})
    sampler0 = XtSampler(no_offset, LATENT)
    assert [sampler0.prediction_timestep(k) for k in (1, 48)] == [999 - 20, 999 - 960]


def test_sample_matches_the_official_loop(pipe, embeddings):
    sampler = XtSampler(pipe.scheduler, LATENT, RolloutConfig(steps=12, guidance=3.0))
    cond, uncond = embeddings["a photo of a tench"], embeddings[""]
    rollout = sampler.sample(pipe.unet, cfg_pair(uncond, cond), torch.Generator().manual_seed(5))
    # the same draws in the official order: k first, then the noise
    g = torch.Generator().manual_seed(5)
    k = int(torch.randint(1, 11, (1,), generator=g).item())
    noise = torch.randn((1, *LATENT), generator=g)
    expected, t = official_rollout(pipe, cond, uncond, k, noise, steps=12)
    assert rollout.k == k and rollout.timestep == t
    torch.testing.assert_close(rollout.latents, expected, rtol=1e-5, atol=1e-6)
    assert not rollout.latents.is_inference() and not rollout.latents.requires_grad


def test_same_seed_same_xt_and_the_unet_is_untouched(pipe, embeddings):
    unet = copy.deepcopy(pipe.unet).requires_grad_(True)
    before = {n: p.clone() for n, p in unet.named_parameters()}
    sampler = XtSampler(pipe.scheduler, LATENT, SHORT)
    pair = cfg_pair(embeddings[""], embeddings["a river"])
    a = sampler.sample(unet, pair, torch.Generator().manual_seed(3))
    b = sampler.sample(unet, pair, torch.Generator().manual_seed(3))
    c = sampler.sample(unet, pair, torch.Generator().manual_seed(4))
    assert torch.equal(a.latents, b.latents) and a.k == b.k
    assert not torch.equal(a.latents, c.latents)
    assert all(p.grad is None and torch.equal(p, before[n]) for n, p in unet.named_parameters())
    # x_t feeds a forward pass with gradients (it is not an inference-mode tensor)
    unet(a.latents, a.timestep, encoder_hidden_states=embeddings["a river"]).sample.mean().backward()


def test_batched_rollouts_equal_sequential_ones(pipe, embeddings):
    sampler = XtSampler(pipe.scheduler, LATENT, SHORT)
    pairs = [cfg_pair(embeddings[""], embeddings[p]) for p in ("a photo of a tench", "a river", "a photo of a tench")]
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    one_by_one = [sampler.sample(pipe.unet, pair, g1) for pair in pairs]
    batched = sampler.sample_batch(pipe.unet, pairs, g2)
    assert [r.k for r in batched] == [r.k for r in one_by_one]
    assert len({r.k for r in batched}) > 1      # the batch really shrinks as roll-outs finish
    for a, b in zip(batched, one_by_one):
        assert a.timestep == b.timestep
        torch.testing.assert_close(a.latents, b.latents, rtol=1e-4, atol=1e-5)
    assert torch.equal(g1.get_state(), g2.get_state())   # the same draws were made


def test_encode_prompts_once_each_and_equal_to_single_encoding(pipe):
    prompts = ["", "a river", "a river", "a photo of a tench"]
    out = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, batch_size=2)
    assert list(out) == ["", "a river", "a photo of a tench"]
    ids = pipe.tokenizer(["a river"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        single = pipe.text_encoder(ids)[0]
    assert out["a river"].shape == (1, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
    torch.testing.assert_close(out["a river"], single, rtol=1e-5, atol=1e-6)
