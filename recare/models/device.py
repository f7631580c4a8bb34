"""The device and weight dtype a model runs on: "auto" picks CUDA, then Apple MPS, then the CPU.

torch is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from recare.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

_DTYPE_NAMES = {
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}


@functools.lru_cache(maxsize=1)
def _dtype_table() -> dict[str, torch.dtype]:
    """User dtype names -> torch dtypes (built on first use so that importing this module skips torch)."""
    import torch

    return {name: getattr(torch, attr) for name, attr in _DTYPE_NAMES.items()}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Pick the torch device to run on.

    Args:
        device: "auto" (CUDA if available, then Apple MPS, then CPU) or any torch device string.
    """
    import torch

    if isinstance(device, torch.device):
        return device
    if device != "auto":
        try:
            return torch.device(device)
        except RuntimeError as e:
            raise ModelLoadError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:0' or 'mps'.") from e
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(device: str | torch.device, dtype: str | torch.dtype = "auto") -> torch.dtype:
    """Pick the weight dtype: fp16 on CUDA (as the official code), fp32 elsewhere, unless asked.

    Args:
        device: the device the model will run on.
        dtype: "auto", a name ("fp16", "bf16", "fp32", ...) or a torch.dtype.
    """
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if resolve_device(device).type == "cuda" else torch.float32
    table = _dtype_table()
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use 'auto', 'fp16', 'bf16' or 'fp32'.")
    return table[dtype]


def check_device_available(device: torch.device) -> None:
    """ModelLoadError when `device` names an accelerator this machine does not have (before any load).

    Args:
        device: a resolved device (see `resolve_device`).
    """
    import torch

    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelLoadError(f"device {str(device)!r} was asked for, but torch sees no CUDA GPU here: "
                                 "use 'auto' or 'cpu'.")
        if device.index is not None and device.index >= count:
            raise ModelLoadError(f"device {str(device)!r} was asked for, but there {'is' if count == 1 else 'are'} "
                                 f"only {count} CUDA GPU{'s' if count != 1 else ''} (cuda:0 .. cuda:{count - 1}).")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ModelLoadError("device 'mps' was asked for, but Apple MPS is not available here: use 'auto' or 'cpu'.")
    elif device.type not in ("cpu", "xpu"):
        raise ModelLoadError(f"device {str(device)!r} is not supported: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.")
