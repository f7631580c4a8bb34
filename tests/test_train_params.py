"""Trainable-parameter table: counts on an SD v1.4-shaped UNet and the tiny UNet against a hand count."""

from __future__ import annotations

import pytest
import torch

from recare.errors import ConfigError
from recare.train.params import count_trainable, select_trainable, trainable_parameter_names

# The real CompVis/stable-diffusion-v1-4 unet/config.json (random weights here).
SD14_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD14_TOTAL = 859_520_964  # the published parameter count of the SD v1.4 UNet

TINY_UNET = dict(  # tests/helpers_tiny.py
    block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, norm_num_groups=2,
)


# ---- the hand count: parameters of every layer from the architecture's formulas --------------

def conv(cin, cout, k):
    return cin * cout * k * k + cout


def linear(cin, cout, bias=True):
    return cin * cout + (cout if bias else 0)


def hand_count(cfg: dict) -> dict[str, int]:
    """Scalars per group: attn1 / attn2 Linear layers, other Linear/Conv2d, and norms (never trained)."""
    n = {"attn1": 0, "attn2": 0, "other": 0, "norm": 0}
    boc, layers, cross = cfg["block_out_channels"], cfg["layers_per_block"], cfg["cross_attention_dim"]
    temb = 4 * boc[0]

    def resnet(cin, cout):
        n["other"] += conv(cin, cout, 3) + linear(temb, cout) + conv(cout, cout, 3)
        n["other"] += conv(cin, cout, 1) if cin != cout else 0      # 1x1 shortcut
        n["norm"] += 2 * cin + 2 * cout                             # GroupNorm before each conv

    def transformer(c):
        n["other"] += 2 * conv(c, c, 1)                             # proj_in, proj_out (1x1 convs)
        n["attn1"] += 3 * linear(c, c, bias=False) + linear(c, c)   # q, k, v, out
        n["attn2"] += linear(c, c, bias=False) + 2 * linear(cross, c, bias=False) + linear(c, c)
        n["other"] += linear(c, 8 * c) + linear(4 * c, c)           # GEGLU feed-forward
        n["norm"] += 2 * c + 3 * 2 * c                              # GroupNorm + 3 LayerNorms

    n["other"] += conv(cfg["in_channels"], boc[0], 3) + linear(boc[0], temb) + linear(temb, temb)
    out = boc[0]
    for i, kind in enumerate(cfg["down_block_types"]):
        cin, out = out, boc[i]
        for j in range(layers):
            resnet(cin if j == 0 else out, out)
            if kind.startswith("CrossAttn"):
                transformer(out)
        if i < len(boc) - 1:
            n["other"] += conv(out, out, 3)                         # downsampler
    resnet(boc[-1], boc[-1]), transformer(boc[-1]), resnet(boc[-1], boc[-1])  # mid block
    rev = list(reversed(boc))
    prev = rev[0]
    for i, kind in enumerate(cfg["up_block_types"]):
        out, skip_in = rev[i], rev[min(i + 1, len(boc) - 1)]
        for j in range(layers + 1):
            skip = skip_in if j == layers else out
            resnet((prev if j == 0 else out) + skip, out)
            if kind.startswith("CrossAttn"):
                transformer(out)
        if i < len(boc) - 1:
            n["other"] += conv(out, out, 3)                         # upsampler
        prev = out
    n["norm"] += 2 * boc[0]
    n["other"] += conv(boc[0], cfg["out_channels"], 3)
    return n


def expected(cfg):
    h = hand_count(cfg)
    return {"noxattn": h["attn1"] + h["other"], "xattn": h["attn2"], "selfattn": h["attn1"],
            "full": h["attn1"] + h["attn2"] + h["other"], "total": sum(h.values())}


def build(cfg, device="cpu"):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**cfg)


@pytest.fixture(scope="module")
def sd14_unet():
    return build(SD14_UNET, "meta")  # shapes only: counting needs no weights


def test_hand_count_matches_the_published_sd14_total(sd14_unet):
    assert expected(SD14_UNET)["total"] == SD14_TOTAL
    assert sum(p.numel() for p in sd14_unet.parameters()) == SD14_TOTAL


@pytest.mark.parametrize("method", ["noxattn", "xattn", "selfattn", "full"])
def test_sd14_counts_match_hand_count(sd14_unet, method):
    assert count_trainable(sd14_unet, method) == expected(SD14_UNET)[method]


def test_sd14_figures_written_out(sd14_unet):
    # Cross-attention of one transformer of width C: q and out C*C (+C bias on out), k and v 768*C.
    # 16 transformers: 5 of width 320, 5 of 640, 6 of 1280.
    per = {c: 2 * c * c + 2 * 768 * c + c for c in (320, 640, 1280)}
    assert 5 * per[320] + 5 * per[640] + 6 * per[1280] == 43_962_560
    assert count_trainable(sd14_unet, "xattn") == 43_962_560
    # every Linear/Conv2d = all parameters minus the norms' 200,320 scalars
    assert count_trainable(sd14_unet, "full") == SD14_TOTAL - 200_320 == 859_320_644
    assert count_trainable(sd14_unet, "noxattn") == 859_320_644 - 43_962_560 == 815_358_084
    assert count_trainable(sd14_unet, "full_unet") == count_trainable(sd14_unet, "full")


@pytest.mark.parametrize("method", ["noxattn", "xattn", "selfattn", "full"])
def test_tiny_counts_match_hand_count(method):
    unet = build(TINY_UNET)
    assert count_trainable(unet, method) == expected(TINY_UNET)[method]
    assert sum(p.numel() for p in unet.parameters()) == expected(TINY_UNET)["total"]


def test_select_trainable_sets_requires_grad_and_excludes_norms_and_cross_attention():
    unet = build(TINY_UNET)
    chosen = select_trainable(unet, "noxattn")
    assert list(chosen) == trainable_parameter_names(unet, "noxattn")
    for name, p in unet.named_parameters():
        assert p.requires_grad == (name in chosen)
    assert not any(".attn2." in n for n in chosen)
    assert not any("norm" in n.split(".")[-2] for n in chosen)      # GroupNorm/LayerNorm never train
    assert "conv_in.weight" in chosen and "time_embedding.linear_1.bias" in chosen
    assert any(".attn1.to_q.weight" in n for n in chosen)
    xattn = select_trainable(unet, "xattn")
    assert xattn and all(".attn2." in n for n in xattn)
    assert sum(p.requires_grad for p in unet.parameters()) == len(xattn)
    # names are state-dict keys: load_state_dict(strict=False) applies exactly them
    state = unet.state_dict()
    assert all(n in state for n in chosen)


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown train_method"):
        trainable_parameter_names(build(TINY_UNET), "attn3")
