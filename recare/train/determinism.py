"""Bit-reproducible training on CUDA: torch's deterministic algorithms while a block runs.

On the CPU every loop of `recare.train` is bit-reproducible already (explicit CPU generators, no
atomics). On CUDA a few kernels that the UNet's backward pass may use add in an unspecified order
(atomic adds: cuDNN's non-deterministic convolution algorithms, the memory-efficient, flash and
cuDNN attention backward passes, some scatter/index kernels), so two runs from the same state can
differ in the last bits and the difference grows over iterations. `deterministic()` switches torch
to its deterministic implementations and cuDNN to deterministic convolution algorithms for the
duration of a block, and restores the previous settings afterwards:

    with deterministic():
        train(config, pipe, images, careset, out_dir)

With `warn_only=False` (the default) torch's attention backward passes take their deterministic
paths, and an op that has no deterministic CUDA implementation raises a RuntimeError naming it.
With `warn_only=True` such ops run as before and torch only warns, but then the attention backward
passes stay non-deterministic too (torch: "Memory Efficient attention defaults to a
non-deterministic algorithm"), so runs are not bit-identical. cuBLAS needs
`CUBLAS_WORKSPACE_CONFIG=:4096:8` (or `:16:8`) in the environment before its first call; the
programs this repository ships set it (`recare.runtime.PROCESS_DEFAULTS`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

CUBLAS_SETTINGS = (":4096:8", ":16:8")   # the workspace configurations cuBLAS is deterministic with


def cublas_ready() -> bool:
    """True when CUBLAS_WORKSPACE_CONFIG holds a setting that makes cuBLAS deterministic."""
    return os.environ.get("CUBLAS_WORKSPACE_CONFIG", "") in CUBLAS_SETTINGS


@contextlib.contextmanager
def deterministic(enabled: bool = True, warn_only: bool = False) -> Iterator[None]:
    """Deterministic algorithms and deterministic cuDNN while the block runs; the previous settings after.

    Args:
        enabled: False makes this a no-op (so callers can pass a setting through).
        warn_only: let ops without a deterministic implementation run with a warning instead of raising
            (the attention backward passes then stay non-deterministic: see the module docstring).
    """
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


__all__ = ["deterministic", "cublas_ready", "CUBLAS_SETTINGS"]
