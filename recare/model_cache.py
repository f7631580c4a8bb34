"""A per-process cache of loaded pipelines and encoders, shared read-only by every caller.

Loading a pipeline takes seconds to minutes, so each is loaded once per process and kept under a
key: (model name, device, dtype, weight variant) for a base pipeline, plus the identity of the
trained weights and learned tokens for a derived one. Loads of different keys run at the same
time and never block a hit: the cache's lock is held only to look up or store an entry, and a
load runs outside it. Two callers asking for the same key at once share one load (the second
waits for the first, and sees its error if it fails). The least recently used entries beyond the
bounds are dropped (a caller still holding one keeps it alive; the cache only forgets it).

A pipeline with trained weights is derived from the cached base without changing it (see
`recare.models.derive_pipeline`): its UNet is a fresh copy with the trained tensors applied, its
scheduler a fresh instance; the VAE, text encoder, tokenizer and feature extractor are the base's
own objects, shared read-only. Every model from the cache is for inference: never train or change
one in place.

The app creates one cache (`ui.shell.create_app`) and hands it to its tabs; it is not a module global.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

from recare import models


@dataclasses.dataclass(frozen=True)
class PipelineKey:
    """What makes two cached pipelines the same.

    Attributes:
        name: the model name as loaded ("mini-world", a hub id, or a local folder's absolute path).
        device: the torch device, as a string ("cpu", "cuda").
        dtype: the weight dtype, as a string ("torch.float32").
        variant: the diffusers weight variant read (None: the default files).
        trained: the trained weights' `TrainedWeights.signature()` (None: the base UNet).
        tokens: the learned-token files with their sizes and times (None: no learned tokens).
    """

    name: str
    device: str
    dtype: str
    variant: str | None = None
    trained: tuple | None = None
    tokens: tuple | None = None

    @property
    def base(self) -> PipelineKey:
        """The key of the base pipeline this one is derived from (itself for a base)."""
        return dataclasses.replace(self, trained=None, tokens=None)


PipelineLoader = Callable[..., Any]   # load_pipeline(name, device=, dtype=, variant=) -> pipeline
EncoderLoader = Callable[..., Any]    # load_encoder(name, device=) -> Encoder


class ModelCache:
    """Load-once, least-recently-used cache of pipelines and encoders.

    Args:
        device: "auto" or a torch device: the default for every model.
        dtype: "auto" or a dtype name (see `recare.models.resolve_dtype`): the default for pipelines.
        max_pipelines: how many pipelines to keep, base and derived together (the least recently used goes first).
        max_encoders: how many encoders to keep.
        pipeline_loader: loads a base pipeline; default `recare.models.load_pipeline` (tests pass a fake).
        encoder_loader: loads an encoder; default `recare.models.load_encoder`.
        policy: which names may be loaded (`recare.models.ModelPolicy`; default any): checked before
            a key is made, so a refused name never reaches a loader or the file system.
    """

    def __init__(self, device: str = "auto", dtype: str = "auto", max_pipelines: int = 3, max_encoders: int = 3,
                 pipeline_loader: PipelineLoader | None = None, encoder_loader: EncoderLoader | None = None,
                 policy: models.ModelPolicy | None = None):
        if max_pipelines < 1 or max_encoders < 1:
            raise ValueError("max_pipelines and max_encoders must be at least 1")
        self.device = models.resolve_device(device)
        self.dtype = dtype
        self.max_pipelines = max_pipelines
        self.max_encoders = max_encoders
        self.policy = policy or models.LOCAL_USE
        self._load_pipeline = pipeline_loader or functools.partial(models.load_pipeline, policy=self.policy)
        self._load_encoder = encoder_loader or functools.partial(models.load_encoder, policy=self.policy)
        self._lock = threading.Lock()  # guards the dicts below; never held during a load
        self._pipelines: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self._encoders: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self._loading: dict[Any, Future] = {}

    # -- public ------------------------------------------------------------------------------

    def pipeline(self, name: str | Path, *, device: str | None = None, dtype: str | None = None,
                 variant: str | None = None, trained: str | Path | None = None,
                 learned_tokens: str | Path | None = None):
        """The pipeline `name`, optionally with trained weights and learned tokens. Raises ModelLoadError.

        Args:
            name: "mini-world", a hub id or a local diffusers folder (see `recare.models.load_pipeline`).
            device: a torch device; default the cache's.
            dtype: a dtype name; default the cache's.
            variant: a diffusers weight variant (e.g. "fp16"); default the standard files.
            trained: a training run folder or one of its weight formats (see
                `recare.models.find_trained_weights`): the result's UNet is a copy with them applied.
            learned_tokens: a training run folder (or its tokens/ folder): the result's tokenizer and text
                encoder are copies with those tokens added.

        Returns:
            A cached pipeline: use it for inference only (its shared parts belong to the base as well).
        """
        key = self.pipeline_key(name, device=device, dtype=dtype, variant=variant, trained=trained,
                                learned_tokens=learned_tokens)
        if key == key.base:
            dev = self._device_for(device)
            torch_dtype = models.resolve_dtype(dev, self._dtype_for(dtype))
            return self._get(self._pipelines, key, lambda: self._load_pipeline(
                key.name, device=dev, dtype=torch_dtype, variant=key.variant), self.max_pipelines)
        base = self.pipeline(name, device=device, dtype=dtype, variant=variant)
        return self._get(self._pipelines, key, lambda: models.derive_pipeline(
            base, trained=trained, learned_tokens=learned_tokens), self.max_pipelines)

    def encoder(self, name: str | Path, *, device: str | None = None):
        """The encoder `name` (see `recare.models.load_encoder`). Raises ModelLoadError.

        Args:
            name: "mini-world", "open_clip:<arch>/<pretrained>" or a local CLIPModel folder.
            device: a torch device; default the cache's.
        """
        dev = self._device_for(device)
        key = (_normalized_name(name, self.policy, "encoder"), str(dev))
        return self._get(self._encoders, key, lambda: self._load_encoder(key[0], device=dev), self.max_encoders)

    def pipeline_key(self, name: str | Path, *, device: str | None = None, dtype: str | None = None,
                     variant: str | None = None, trained: str | Path | None = None,
                     learned_tokens: str | Path | None = None) -> PipelineKey:
        """The key `pipeline` would use for these arguments (arguments as in `pipeline`)."""
        dev = self._device_for(device)
        return PipelineKey(
            name=_normalized_name(name, self.policy, "model"),
            device=str(dev),
            dtype=str(models.resolve_dtype(dev, self._dtype_for(dtype))),
            variant=variant or None,
            trained=None if trained is None else models.find_trained_weights(trained).signature(),
            tokens=None if learned_tokens is None else _files_signature(models.find_token_files(learned_tokens)),
        )

    def cached_pipelines(self) -> list[PipelineKey]:
        """Keys of the cached pipelines, least recently used first."""
        with self._lock:
            return list(self._pipelines)

    def cached_encoders(self) -> list[tuple[str, str]]:
        """(name, device) of the cached encoders, least recently used first."""
        with self._lock:
            return list(self._encoders)

    def clear(self) -> None:
        """Forget every cached model (loads in flight finish and are stored)."""
        with self._lock:
            self._pipelines.clear()
            self._encoders.clear()

    # -- internals ---------------------------------------------------------------------------

    def _device_for(self, device: str | None):
        return self.device if device is None else models.resolve_device(device)

    def _dtype_for(self, dtype: str | None):
        return self.dtype if dtype is None else dtype

    def _get(self, store: collections.OrderedDict, key: Any, load: Callable[[], Any], limit: int):
        """The entry `key` of `store`: a hit, a wait on the same key's load in flight, or a load by this caller."""
        with self._lock:
            if key in store:
                store.move_to_end(key)
                return store[key]
            pending = self._loading.get(key)
            owner = pending is None
            if owner:
                pending = self._loading[key] = Future()
        if not owner:
            return pending.result()  # raises the loader's error, if it failed
        try:
            value = load()
        except BaseException as error:
            with self._lock:
                del self._loading[key]
            pending.set_exception(error)
            raise
        with self._lock:
            store[key] = value
            store.move_to_end(key)
            while len(store) > limit:
                store.popitem(last=False)
            del self._loading[key]
        pending.set_result(value)
        return value


def _normalized_name(name: str | Path, policy: models.ModelPolicy = models.LOCAL_USE, kind: str = "model") -> str:
    """A local folder by its absolute path (so "./x" and "x" share an entry); other names as given.

    The policy is applied first: a name it refuses raises ModelLoadError here, before any loader runs.
    """
    text = policy.check_name(name, kind)
    if text == models.MINI_WORLD or (kind == "encoder" and text.startswith("open_clip:")):
        return text
    path = policy.local_folder(text)
    if path is None:
        if kind == "model" and models.is_hub_id(text):
            return text
        raise policy.refuse(kind)
    try:
        return str(path.resolve()) if path.is_dir() else text
    except (OSError, RuntimeError, ValueError):  # a name the file system cannot look up: the loader says so
        return text


def _files_signature(files: list[Path]) -> tuple:
    return tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
