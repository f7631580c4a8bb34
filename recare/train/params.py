"""Which UNet parameters a training run changes (`train_method`), as one table.

The official code (damilab/CARE `FineTunedModel`) fine-tunes every `Linear` and `Conv2d` module
of the UNet whose qualified name passes a rule; norms (GroupNorm, LayerNorm) never train, in any
method. The rules, by name of the module inside the UNet:

    noxattn   every Linear/Conv2d except cross-attention (`attn2`)   (official default)
    xattn     only cross-attention (`attn2`: to_q, to_k, to_v, to_out.0)
    selfattn  only self-attention (`attn1`)
    full      every Linear/Conv2d (official name `full_unet`)

Parameters are named as in `unet.state_dict()` ("down_blocks.0.attentions.0.proj_in.weight"), so
what is trained is what `trained_params.safetensors` stores and `load_state_dict(strict=False)`
applies.
"""

from __future__ import annotations

from typing import Callable

import torch

from recare.config import TRAIN_METHODS
from recare.errors import ConfigError

# train_method -> rule on the module's qualified name; a table, not branches.
TRAINABLE_MODULE_RULES: dict[str, Callable[[str], bool]] = {
    "noxattn": lambda name: "attn2" not in name.split("."),
    "xattn": lambda name: "attn2" in name.split("."),
    "selfattn": lambda name: "attn1" in name.split("."),
    "full": lambda name: True,
}
ALIASES = {"full_unet": "full"}  # the official spelling
TRAINABLE_MODULE_TYPES = (torch.nn.Linear, torch.nn.Conv2d)  # LoRACompatible* of older diffusers subclass these

assert set(TRAINABLE_MODULE_RULES) == set(TRAIN_METHODS)


def _rule(train_method: str) -> Callable[[str], bool]:
    method = ALIASES.get(train_method, train_method)
    if method not in TRAINABLE_MODULE_RULES:
        raise ConfigError(f"unknown train_method {train_method!r}: use one of {sorted(TRAINABLE_MODULE_RULES)}.")
    return TRAINABLE_MODULE_RULES[method]


def trainable_parameter_names(unet: torch.nn.Module, train_method: str = "noxattn") -> list[str]:
    """State-dict names of the parameters `train_method` trains, in the UNet's parameter order.

    Args:
        unet: a diffusers UNet2DConditionModel (any module works: names are relative to it).
        train_method: one of noxattn, xattn, selfattn, full (or the official alias full_unet).
    """
    rule = _rule(train_method)
    chosen: set[str] = set()
    for module_name, module in unet.named_modules():
        if isinstance(module, TRAINABLE_MODULE_TYPES) and rule(module_name):
            chosen.update(f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False))
    return [name for name, _ in unet.named_parameters() if name in chosen]


def select_trainable(unet: torch.nn.Module, train_method: str = "noxattn") -> dict[str, torch.nn.Parameter]:
    """Set `requires_grad` on exactly the parameters `train_method` trains; return them by name.

    Args:
        unet: the UNet being fine-tuned (changed in place: requires_grad only).
        train_method: see `trainable_parameter_names`.

    Returns:
        {state-dict name: parameter}, in the UNet's parameter order (the optimizer's order).
    """
    names = set(trainable_parameter_names(unet, train_method))
    selected = {}
    for name, param in unet.named_parameters():
        param.requires_grad_(name in names)
        if name in names:
            selected[name] = param
    if not selected:
        raise ConfigError(f"train_method {train_method!r} selects no parameter of this UNet.")
    return selected


def count_trainable(unet: torch.nn.Module, train_method: str = "noxattn") -> int:
    """Number of scalars `train_method` trains (works on a meta-device UNet too).

    Args:
        unet: the UNet.
        train_method: see `trainable_parameter_names`.
    """
    names = set(trainable_parameter_names(unet, train_method))
    return sum(p.numel() for n, p in unet.named_parameters() if n in names)
