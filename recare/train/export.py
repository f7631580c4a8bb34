"""Writers for every training output format (the reading side is `recare.models`).

    tokens/<name>.safetensors      a learned token, {placeholder: embedding [hidden]}: the diffusers
                                   textual-inversion format, `pipe.load_textual_inversion(path, token=placeholder)`
    trained_params.safetensors     only the changed UNet tensors, under the UNet's own state-dict names:
                                   `unet.load_state_dict(load_file(path), strict=False)` applies them
    unet/                          a full diffusers UNet folder (`UNet2DConditionModel.from_pretrained`)
    ReCARE-Diffusers-UNet.pt       the official output: `torch.save` of the full UNet state dict

Every file is written to a temporary name and renamed into place (`recare.atomic.atomic_save` /
`atomic_write_dir`), so a crash never leaves a half-written weights file. Tensors are saved from
the CPU in the dtype they have in the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from recare.models.weights import OFFICIAL_UNET_FILE, TOKENS_DIR, TRAINED_PARAMS_FILE  # the names the reader looks for
from recare.atomic import atomic_save, atomic_write_dir
from recare.hashing import model_fingerprint  # re-exported: training writes it beside the weights
from recare.train.textual_inversion import LearnedToken

UNET_FOLDER = "unet"
__all__ = ["OFFICIAL_UNET_FILE", "TOKENS_DIR", "TRAINED_PARAMS_FILE", "UNET_FOLDER", "model_fingerprint",
           "save_learned_token", "save_learned_tokens", "read_learned_token", "token_file_name",
           "changed_tensor_names", "save_trained_params", "read_trained_params_header", "save_unet_folder",
           "save_official_pt"]

TRAINED_PARAMS_FORMAT = "recare-trained-params"
TRAINED_PARAMS_VERSION = "1"
LEARNED_TOKEN_FORMAT = "recare-learned-token"
LEARNED_TOKEN_VERSION = "1"



def _header(values: Mapping[str, Any]) -> dict[str, str]:
    """safetensors metadata is str -> str: strings stay, everything else is JSON."""
    return {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in values.items()}


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}


# ---------------------------------------------------------------------------------------------
# learned tokens


def token_file_name(placeholder: str, index: int = 0) -> str:
    """A file name for a placeholder: "<v1*>" -> "v1"; `token<index + 1>` when nothing printable is left."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "", placeholder)
    return name or f"token{index + 1}"


def save_learned_token(token: LearnedToken, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write one learned token as a diffusers textual-inversion file {placeholder: embedding [hidden]}.

    Args:
        token: the token (`recare.train.textual_inversion.learn_token`'s result).
        path: the .safetensors file to write.
        metadata: extra header entries (the format, placeholder, initializer and steps are always there).

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    tensors = {token.placeholder: token.embedding.detach().float().reshape(-1).cpu().contiguous()}
    header = _header({"format": LEARNED_TOKEN_FORMAT, "format_version": LEARNED_TOKEN_VERSION,
                      "placeholder": token.placeholder, "initializer": token.initializer,
                      "steps": len(token.losses), **(metadata or {})})
    return atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def save_learned_tokens(tokens: Sequence[LearnedToken], folder: str | Path,
                        metadata: Mapping[str, Any] | None = None) -> list[Path]:
    """Write each token to `folder/tokens/<name>.safetensors` (name from the placeholder: "<v1*>" -> v1.safetensors).

    Args:
        tokens: the learned tokens, in order (file names sort in this order for "<v1*>", "<v2*>", ...).
        folder: the run folder.
        metadata: extra header entries for every file.

    Returns:
        The files written, in the tokens' order.
    """
    names = [token_file_name(t.placeholder, i) for i, t in enumerate(tokens)]
    if len(set(names)) != len(names):
        names = [f"token{i + 1}" for i in range(len(tokens))]
    return [save_learned_token(t, Path(folder) / TOKENS_DIR / f"{name}.safetensors", metadata)
            for t, name in zip(tokens, names)]


def read_learned_token(path: str | Path) -> LearnedToken:
    """Read a token file written by `save_learned_token` (or any one-tensor diffusers textual-inversion file).

    Args:
        path: the .safetensors file.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        if len(names) != 1:
            raise ValueError(f"{path} holds {len(names)} tensors; a learned-token file holds one.")
        embedding = f.get_tensor(names[0]).float().reshape(-1)
        meta = dict(f.metadata() or {})
    return LearnedToken(names[0], meta.get("initializer", ""), embedding)


# ---------------------------------------------------------------------------------------------
# UNet weights


def changed_tensor_names(unet: torch.nn.Module, base: Mapping[str, torch.Tensor] | Iterable[str]) -> list[str]:
    """The UNet state-dict names to export.

    Args:
        unet: the trained UNet.
        base: either the base model's state dict (names whose tensors differ from it are returned),
            or the names to export (e.g. the trainable parameters' names; each must be in the state dict).
    """
    state = unet.state_dict()
    if isinstance(base, Mapping):
        missing = sorted(set(state) - set(base))
        if missing:
            raise ValueError(f"the base state dict lacks {missing[0]!r}: it is not this UNet's base.")
        return [n for n, t in state.items()
                if t.shape != base[n].shape or not torch.equal(t.detach(), base[n].detach().to(t.device, t.dtype))]
    names = list(dict.fromkeys(base))
    unknown = [n for n in names if n not in state]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a UNet state-dict name (names look like "
                         f"'down_blocks.0.resnets.0.conv1.weight').")
    return names


def save_trained_params(unet: torch.nn.Module, base: Mapping[str, torch.Tensor] | Iterable[str], path: str | Path,
                        train_method: str, base_fingerprint: str | None = None,
                        metadata: Mapping[str, Any] | None = None) -> Path:
    """Write only the changed UNet tensors, under the UNet's own state-dict names (`trained_params.safetensors`).

    `unet.load_state_dict(safetensors.torch.load_file(path), strict=False)` applies the file to the
    base UNet; `recare.models.apply_trained` does the same after checking that it fits.

    Args:
        unet: the trained UNet.
        base: the base UNet's state dict (the tensors that differ from it are written), or the names to
            write (e.g. `[name for name, p in unet.named_parameters() if p.requires_grad]`).
        path: the file to write.
        train_method: which parameters were trained (noxattn, xattn, ...), recorded in the header.
        base_fingerprint: `model_fingerprint` of the base UNet; computed from `base` when it is a state dict.
        metadata: extra header entries (JSON-encoded when not strings).

    Header: format "recare-trained-params", format_version, base_fingerprint, train_method, tensors
    (count), and `metadata`.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    if base_fingerprint is None:
        if not isinstance(base, Mapping):
            raise TypeError("base_fingerprint is required when `base` lists names (model_fingerprint(base_unet)).")
        base_fingerprint = model_fingerprint(base)
    names = changed_tensor_names(unet, base)
    state = unet.state_dict()
    tensors = _cpu_tensors({n: state[n] for n in names})
    header = _header({"format": TRAINED_PARAMS_FORMAT, "format_version": TRAINED_PARAMS_VERSION,
                      "base_fingerprint": base_fingerprint, "train_method": train_method,
                      "tensors": len(tensors), **(metadata or {})})
    return atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def read_trained_params_header(path: str | Path) -> dict[str, str]:
    """The header of a trained_params.safetensors file (format, format_version, base_fingerprint, ...)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def save_unet_folder(unet: torch.nn.Module, path: str | Path) -> Path:
    """Write the full UNet as a diffusers folder (`save_pretrained`; loads with `UNet2DConditionModel.from_pretrained`).

    Args:
        unet: the UNet.
        path: the folder to create or replace as a whole (e.g. `<run>/unet`).
    """
    with atomic_write_dir(path) as tmp:
        unet.save_pretrained(tmp)
    return Path(path)


def save_official_pt(unet: torch.nn.Module, path: str | Path) -> Path:
    """Write the official output: `torch.save` of the full UNet state dict (CPU tensors).

    Load it with `unet.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))`.

    Args:
        unet: the UNet.
        path: the file (the official name is `ReCARE-Diffusers-UNet.pt`).
    """
    state = _cpu_tensors(unet.state_dict())
    return atomic_save(path, lambda tmp: torch.save(state, tmp))
