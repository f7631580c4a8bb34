"""The UNet's noise prediction through a traced forward on the CPU: the same numbers, less Python.

The mini world's UNet is small (3.2 M parameters on 8x8 latents), so on the CPU about half of its forward is
Python module calls and operator dispatch, not arithmetic. A `torch.jit.trace` of the forward runs the same
ATen kernels on the same inputs in the same order, without the module calls. Measured on the mini world (this
2-core machine, one thread; `python -m benchmarks.traced_calls` prints the table): every output and gradient
equal bit for bit, and the roll-out's guided pair, a textual-inversion step and the student's step take 16-27%
less time.

Bit for bit needs TorchScript's plain interpreter: its optimising executor differentiates some operators with
formulas of its own (the weights' gradients then differ in the last bit) and caches graphs that refuse a later
call under `torch.inference_mode`. So every traced call runs under `torch.jit.optimized_execution(False)` (a
per-thread flag: two trainings in two threads of one process do not undo each other's).

    eps = predict_noise(unet, latents, timestep, hidden)   # = unet(latents, timestep, encoder_hidden_states=hidden).sample

The traced path is taken only where it is known to be exact: a diffusers `UNet2DConditionModel` on the CPU in
float32, no autocast, no gradient checkpointing, no hooks. One trace is made per module and input signature
(shapes, strides, dtypes, train/eval mode), after `TRACE_AFTER` eager calls of that signature (a short run, such
as a test's, never pays for a trace), and checked once against the eager forward; a trace that fails, differs,
or no longer holds the module's current parameters is dropped for the eager forward.
Everything else calls the module as it is. `RECARE_EAGER_FORWARD=1` turns the traced path off.
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from typing import Any

import torch

EAGER_ENV = "RECARE_EAGER_FORWARD"
MAX_SIGNATURES = 16          # signatures traced per module; later ones run eagerly
TRACE_AFTER = 50             # eager calls of a signature before it is traced (a trace costs about 20-40 forwards)


class _UNetForward(torch.nn.Module):
    """(sample, timestep, hidden) -> the predicted noise, as one tensor."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0]


class _Traces:
    """One module's traces by input signature (None: that signature runs eagerly; an int: eager calls so far), and
    the parameters they hold.

    A trace holds the module's Parameter objects themselves, so in-place updates (an optimizer step, `copy_`,
    a `.data` swap) reach it; a Parameter replaced by another object would not, and `current` notices that.
    """

    def __init__(self, module: torch.nn.Module):
        self.by_signature: dict[tuple, Any] = {}
        self._slots = [(m._parameters, name, p) for m in module.modules() for name, p in m._parameters.items()
                       if p is not None]

    def current(self) -> bool:
        """Whether every traced parameter is still the one the module holds (about 15 us for the mini world)."""
        return all(params.get(name) is p for params, name, p in self._slots)


_TRACES: "weakref.WeakKeyDictionary[torch.nn.Module, _Traces]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def predict_noise(unet: torch.nn.Module, sample: torch.Tensor, timestep: Any, hidden: torch.Tensor) -> torch.Tensor:
    """`unet(sample, timestep, encoder_hidden_states=hidden).sample`, traced where that is exact (module docstring).

    Args:
        unet: the UNet.
        sample: the noisy latents, (B, C, h, w).
        timestep: an int, a float or a tensor (0-d or (B,)), as the UNet takes it.
        hidden: the text embeddings, (B, 77, D).
    """
    if _traceable(unet, sample, timestep, hidden):
        args = (sample, _as_tensor(timestep), hidden)
        traced = _trace_for(unet, args)
        if traced is not None:
            with torch.jit.optimized_execution(False):
                return traced(*args)
    return unet(sample, timestep, encoder_hidden_states=hidden).sample


def _trace_for(module, args: tuple):
    """The trace for this call's signature, made and checked after `TRACE_AFTER` eager calls; None for eager."""
    signature = (module.training, *[_describe(a) for a in args])
    with _LOCK:
        traces = _TRACES.get(module)
        if traces is None or not traces.current():
            traces = _TRACES[module] = _Traces(module)     # new or replaced parameters: earlier traces hold old ones
        seen = traces.by_signature.get(signature, 0)
        if not isinstance(seen, int):       # a trace, or None: decided
            return seen
        if seen == 0 and len(traces.by_signature) >= MAX_SIGNATURES:
            return None
        if seen < TRACE_AFTER:
            traces.by_signature[signature] = seen + 1
            return None
        traced = _checked_trace(_UNetForward(module), args) if _module_traceable(module) else None
        traces.by_signature[signature] = traced
        return traced


def _traceable(unet, sample, timestep, hidden) -> bool:
    """The per-call checks: no opt-out, a diffusers UNet2DConditionModel, CPU tensors, float32, no autocast."""
    if os.environ.get(EAGER_ENV, "").strip() not in ("", "0"):
        return False
    if type(unet).__name__ != "UNet2DConditionModel" or not type(unet).__module__.startswith("diffusers."):
        return False
    if unet._forward_hooks or unet._forward_pre_hooks or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    floats = (sample, hidden)
    tensors = [*floats, *([timestep] if isinstance(timestep, torch.Tensor) else [])]
    if not all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors) or \
            any(t.dtype != torch.float32 for t in floats):
        return False
    first = next(unet.parameters(), None)
    return first is not None and first.device.type == "cpu" and first.dtype == torch.float32


def _module_traceable(module) -> bool:
    """The checks that walk every submodule, made once per signature (a trace made before gradient
    checkpointing was turned on would give the same numbers, only without its memory saving)."""
    if getattr(module, "is_gradient_checkpointing", False):
        return False
    return not any(hasattr(m, "_hf_hook") or m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _checked_trace(forward: torch.nn.Module, args: tuple):
    """A trace of `forward` whose output equals the eager forward's on this call's inputs, or None."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")     # the tracer's notes on Python values it recorded as constants
            traced = torch.jit.trace(forward, args, check_trace=False)
            with torch.jit.optimized_execution(False):
                same = torch.equal(traced(*args), forward(*args))
    except Exception:     # noqa: BLE001 - any failure of the tracer only means the eager forward
        return None
    return traced if same else None


def _as_tensor(timestep: Any) -> torch.Tensor:
    """A Python timestep as the tensor diffusers makes of it ((1,), int64 or float64); a tensor as it is."""
    if isinstance(timestep, torch.Tensor):
        return timestep
    return torch.tensor([timestep], dtype=torch.float64 if isinstance(timestep, float) else torch.int64)


def _describe(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.stride(), t.dtype
