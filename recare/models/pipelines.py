"""Text-to-image pipelines by name: the mini world, a hub id (cache first, download only when the hub
answers) or a local diffusers folder; and pipelines derived from a loaded base (trained weights,
learned tokens) without changing it.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import TYPE_CHECKING

from recare.errors import ModelLoadError
from recare.models.construction import building_modules
from recare.models.device import check_device_available, resolve_device, resolve_dtype
from recare.models.hub import dtype_kwarg, first_line, hub_reachable, offline_message
from recare.models.policy import (
    _HUB_ID, DEFAULT_HUB_MODEL, LOCAL_USE, MINI_WORLD, ModelPolicy, is_dir_or_file, mini_world_part,
)
from recare.models.weights import TrainedWeights, apply_trained, load_learned_tokens

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline


def load_pipeline(
    name_or_path: str | Path = MINI_WORLD,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    trained: str | Path | None = None,
    variant: str | None = None,
    policy: ModelPolicy | None = None,
) -> StableDiffusionPipeline:
    """Load a Stable Diffusion pipeline with a DDIM scheduler and no safety checker (as the official code).

    Args:
        name_or_path: "mini-world", a hub id ("CompVis/stable-diffusion-v1-4") or a local diffusers folder.
        device: "auto" or a torch device (see `resolve_device`).
        dtype: "auto" (fp16 on CUDA, fp32 otherwise) or a dtype name (see `resolve_dtype`).
        trained: trained UNet weights to apply after loading: a training run folder or one of its
            weight formats (see `find_trained_weights`). None loads the base model as it is.
        variant: a diffusers weight variant to read (e.g. "fp16" reads `*.fp16.safetensors`); None reads
            the default files.
        policy: which names may be loaded (default: any, `LOCAL_USE`); a public app passes
            `ModelPolicy.public(...)`.

    Raises:
        ModelLoadError: unknown name, mini world not installed, not a diffusers folder, a hub id that
            is neither cached nor downloadable right now, or trained weights that do not fit this model.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    policy = policy or LOCAL_USE
    source, local = _pipeline_source(policy.check_name(name_or_path, "model"), policy)
    device = resolve_device(device)
    check_device_available(device)
    torch_dtype = resolve_dtype(device, dtype)
    kwargs = {dtype_kwarg("diffusers", "0.40"): torch_dtype, "safety_checker": None, "requires_safety_checker": False}
    if variant:
        kwargs["variant"] = variant
    if local:
        try:
            with building_modules():
                pipe = StableDiffusionPipeline.from_pretrained(source, local_files_only=True, **kwargs)
        except Exception as e:  # a broken folder: missing component, bad config, truncated weights
            raise ModelLoadError(f"could not load the diffusers pipeline in {source}: {first_line(e)}") from e
    else:
        with building_modules():
            pipe = _load_hub_pipeline(StableDiffusionPipeline, source, kwargs)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.safety_checker = None
    pipe = pipe.to(device)
    if trained is not None:
        apply_trained(pipe.unet, trained)
    return pipe



def _pipeline_source(name: str, policy: ModelPolicy = LOCAL_USE) -> tuple[str, bool]:
    """Map a user-given name to (folder or hub id, is_local). Raises ModelLoadError for bad names."""
    if name == MINI_WORLD:
        return str(mini_world_part("pipeline", "model_index.json", "diffusers pipeline")), True
    path = policy.local_folder(name)
    if path is None:  # a public app: a hub id or nothing
        if _HUB_ID.match(name):
            return name, False
        raise policy.refuse("model")
    is_dir, is_file = is_dir_or_file(path)
    if is_dir:
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{path} is not a diffusers folder (no model_index.json). Pass a folder saved with "
                f"pipeline.save_pretrained(...), a hub id such as {DEFAULT_HUB_MODEL}, or 'mini-world'."
            )
        return str(path), True
    if is_file:
        raise ModelLoadError(
            f"{path} is a file; a pipeline is loaded from a diffusers folder (with model_index.json), "
            f"a hub id such as {DEFAULT_HUB_MODEL}, or 'mini-world'."
        )
    if _HUB_ID.match(name):
        return name, False
    raise ModelLoadError(
        f"unknown model {name!r}: use 'mini-world', a hub id such as {DEFAULT_HUB_MODEL}, "
        f"or the path of a local diffusers folder (no folder of that name exists)."
    )


def _load_hub_pipeline(pipeline_cls, hub_id: str, kwargs: dict):
    """Cached copy first (no network at all); else download if the hub answers; else fail at once."""
    try:
        return pipeline_cls.from_pretrained(hub_id, local_files_only=True, **kwargs)
    except Exception:
        pass  # not (fully) cached
    if not hub_reachable():
        raise ModelLoadError(offline_message("model", hub_id))
    try:
        return pipeline_cls.from_pretrained(hub_id, **kwargs)
    except Exception as e:
        raise ModelLoadError(f"could not download {hub_id!r} from the Hugging Face hub: {first_line(e)}") from e



def derive_pipeline(base, trained: str | Path | TrainedWeights | None = None,
                    learned_tokens: str | Path | None = None) -> StableDiffusionPipeline:
    """A new pipeline over `base`'s components with trained weights and/or learned tokens; `base` is not changed.

    The new pipeline's own parts: the scheduler (always a fresh instance from the base's config: schedulers
    keep per-call state such as their timesteps); the UNet when `trained` is given (a deep copy of the base
    UNet with the trained tensors applied); the tokenizer and text encoder when `learned_tokens` is given
    (copies, since loading tokens adds vocabulary and embedding rows). Everything else (the VAE, the text
    encoder and tokenizer otherwise, the feature extractor) is the base's own object, shared read-only:
    never train or change a shared component in place, or every pipeline over that base sees it.

    Args:
        base: a loaded pipeline (e.g. from `load_pipeline` or `ModelCache.pipeline`).
        trained: trained UNet weights (see `find_trained_weights`), or None to share the base UNet.
        learned_tokens: a training run folder (or its tokens/ folder) whose tokens to add, or None.

    Raises:
        ModelLoadError: see `apply_trained` and `load_learned_tokens`.
    """
    components = dict(base.components)
    components["scheduler"] = type(base.scheduler).from_config(base.scheduler.config)
    if trained is not None:
        unet = copy.deepcopy(base.unet)
        apply_trained(unet, trained)
        components["unet"] = unet
    if learned_tokens is not None:
        components["tokenizer"] = copy.deepcopy(base.tokenizer)
        components["text_encoder"] = copy.deepcopy(base.text_encoder)
    if "requires_safety_checker" in inspect.signature(type(base).__init__).parameters:
        components["requires_safety_checker"] = getattr(base.config, "requires_safety_checker", False)
    pipe = type(base)(**components)
    if getattr(base, "_progress_bar_config", None) is not None:
        pipe.set_progress_bar_config(**base._progress_bar_config)
    if learned_tokens is not None:
        with building_modules():  # adds embedding rows: a new nn.Embedding
            load_learned_tokens(pipe, learned_tokens)
    return pipe
