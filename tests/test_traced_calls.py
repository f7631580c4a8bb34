"""The traced UNet call (`recare.models.traced_calls`): the same numbers as the eager forward, bit for bit, and the
eager forward wherever the trace is not known to be exact."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from recare.models import traced_calls
from recare.models.traced_calls import predict_noise
from tests.helpers_tiny import TINY_HIDDEN


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_HIDDEN, norm_num_groups=2,
    )


def inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 77, TINY_HIDDEN, generator=g)


def eager(unet, sample, timestep, hidden):
    return unet(sample, timestep, encoder_hidden_states=hidden).sample


def traced_signatures(unet) -> list:
    traces = traced_calls._TRACES.get(unet)
    return [] if traces is None else [s for s, t in traces.by_signature.items() if isinstance(t, torch.nn.Module)]


@pytest.fixture(autouse=True)
def traced_path_on(monkeypatch):
    monkeypatch.delenv(traced_calls.EAGER_ENV, raising=False)
    monkeypatch.setattr(traced_calls, "TRACE_AFTER", 0)     # trace at the first call (the default waits for 50)


def test_a_signature_is_traced_only_after_its_first_eager_calls(monkeypatch):
    monkeypatch.setattr(traced_calls, "TRACE_AFTER", 2)
    unet = tiny_unet().eval()
    sample, hidden = inputs()
    with torch.no_grad():
        reference = eager(unet, sample, 7, hidden)
        for call in range(4):
            assert torch.equal(predict_noise(unet, sample, 7, hidden), reference)
            assert len(traced_signatures(unet)) == (call >= 2)


@pytest.mark.parametrize("timestep", [torch.tensor(981), torch.tensor([500, 20]), 640])
def test_forward_equals_eager_bit_for_bit_and_is_traced(timestep):
    unet = tiny_unet().eval()
    sample, hidden = inputs()
    with torch.inference_mode():
        first = predict_noise(unet, sample, timestep, hidden)
        again = predict_noise(unet, sample, timestep, hidden)
        reference = eager(unet, sample, timestep, hidden)
    assert torch.equal(first, reference) and torch.equal(again, reference)
    assert len(traced_signatures(unet)) == 1       # the trace was made once and used


def test_gradients_to_the_embeddings_and_to_the_trained_weights_equal_eager():
    """Textual inversion differentiates to the text embeddings, ESD to a subset of the weights: both exact."""
    unet = tiny_unet().train()
    for name, p in unet.named_parameters():
        p.requires_grad_("attn2" not in name)          # ESD-u's "noxattn"
    sample, hidden = inputs(batch=1)
    timestep = torch.tensor([321])

    def grads(call):
        unet.zero_grad(set_to_none=True)
        h = hidden.clone().requires_grad_(True)
        call(unet, sample, timestep, h).pow(2).mean().backward()
        return h.grad, [p.grad for p in unet.parameters() if p.requires_grad]

    for _ in range(3):     # TorchScript's executors change behaviour after the first calls: look past them
        h_fast, w_fast = grads(predict_noise)
    h_eager, w_eager = grads(eager)
    assert traced_signatures(unet)
    assert torch.equal(h_fast, h_eager)
    assert len(w_fast) == len(w_eager) > 0 and all(torch.equal(a, b) for a, b in zip(w_fast, w_eager))


def test_in_place_updates_reach_the_trace_and_a_replaced_parameter_retraces():
    unet = tiny_unet().eval()
    sample, hidden = inputs()
    t = torch.tensor(400)
    with torch.no_grad():
        predict_noise(unet, sample, t, hidden)
        unet.conv_in.weight.add_(0.05)                                     # an optimizer step, in place
        assert torch.equal(predict_noise(unet, sample, t, hidden), eager(unet, sample, t, hidden))
        unet.conv_out.weight = torch.nn.Parameter(unet.conv_out.weight * 2)   # a new object the old trace lacks
        assert torch.equal(predict_noise(unet, sample, t, hidden), eager(unet, sample, t, hidden))


def test_a_copy_gets_its_own_trace():
    unet = tiny_unet().eval()
    other = copy.deepcopy(unet)
    with torch.no_grad():
        other.conv_in.weight.mul_(0.5)
        sample, hidden = inputs()
        t = torch.tensor(100)
        assert torch.equal(predict_noise(unet, sample, t, hidden), eager(unet, sample, t, hidden))
        assert torch.equal(predict_noise(other, sample, t, hidden), eager(other, sample, t, hidden))
        assert not torch.equal(predict_noise(unet, sample, t, hidden), predict_noise(other, sample, t, hidden))


def test_the_eager_forward_where_a_trace_is_not_known_to_be_exact(monkeypatch):
    sample, hidden = inputs()
    t = torch.tensor(10)
    checkpointed = tiny_unet()
    checkpointed.enable_gradient_checkpointing()
    double = tiny_unet().double()
    cases = [(checkpointed, sample, hidden), (double, sample.double(), hidden.double())]
    with torch.no_grad():
        for unet, s, h in cases:
            assert torch.equal(predict_noise(unet, s, t, h), eager(unet, s, t, h))
            assert traced_signatures(unet) == []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = tiny_unet()
            predict_noise(plain, sample, t, hidden)
            assert traced_signatures(plain) == []
        monkeypatch.setenv(traced_calls.EAGER_ENV, "1")
        off = tiny_unet()
        assert torch.equal(predict_noise(off, sample, t, hidden), eager(off, sample, t, hidden))
        assert traced_signatures(off) == []


def test_any_module_with_the_unet_signature_is_called_as_it_is():
    class Planted(torch.nn.Module):
        def forward(self, sample, timestep, encoder_hidden_states):
            return type("Out", (), {"sample": sample * 2})()

    sample, hidden = inputs()
    assert torch.equal(predict_noise(Planted(), sample, 5, hidden), sample * 2)


def test_textual_inversion_and_the_roll_out_take_the_trace_and_give_the_eager_numbers(monkeypatch):
    from recare.config import RolloutConfig, TextualInversionConfig
    from recare.train.rollout import XtSampler, cfg_pair, encode_prompts
    from recare.train.textual_inversion import learn_token
    from tests.helpers_tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    pipe.unet.requires_grad_(False)
    images = [Image.new("RGB", (16, 16), (60 * i, 90, 200 - 50 * i)) for i in range(3)]
    config = TextualInversionConfig(steps=3, resolution=16, initializer_token="the", seed=5)
    embeddings = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["", "a photo of the"])
    pair = cfg_pair(embeddings[""], embeddings["a photo of the"])
    sampler = XtSampler(pipe.scheduler, (4, 8, 8), RolloutConfig(steps=10))

    def run():
        token = learn_token(pipe, images, "<v*>", config=config)
        rollout = sampler.sample(pipe.unet, pair, torch.Generator().manual_seed(3))
        return token.embedding, rollout.latents

    traced = run()
    assert len(traced_signatures(pipe.unet)) == 2     # the inversion's batch of 1, the roll-out's guided pair
    monkeypatch.setenv(traced_calls.EAGER_ENV, "1")
    eager_run = run()
    assert all(torch.equal(a, b) for a, b in zip(traced, eager_run))
