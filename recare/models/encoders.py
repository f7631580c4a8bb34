"""Image/text encoders by name: the bundled mini CLIP, "open_clip:<arch>/<pretrained>" (weights from
the Hugging Face cache first) or a local transformers CLIPModel folder. The encoder classes themselves
live in `recare.encoders`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from recare.errors import ModelLoadError
from recare.models.construction import building_modules
from recare.models.device import check_device_available, resolve_device
from recare.models.hub import dtype_kwarg, first_line, hub_reachable, offline_message
from recare.models.policy import DEFAULT_OPEN_CLIP, LOCAL_USE, MINI_WORLD, ModelPolicy, is_dir_or_file, mini_world_part

if TYPE_CHECKING:
    import torch

    from recare.encoders import Encoder


def load_encoder(name: str | Path = MINI_WORLD, device: str | torch.device = "auto",
                 policy: ModelPolicy | None = None) -> Encoder:
    """Load an image/text encoder used for CARE-set construction and evaluation.

    Args:
        name: "mini-world" (bundled mini CLIP), "open_clip:<arch>/<pretrained>" (official:
            "open_clip:ViT-B-32/openai"; SigLIP: "open_clip:ViT-B-16-SigLIP/webli"), or a local
            transformers CLIPModel folder.
        device: "auto" or a torch device. Encoders run in fp32.
        policy: which names may be loaded (default: any, `LOCAL_USE`); a public app passes
            `ModelPolicy.public(...)`.

    Raises:
        ModelLoadError: unknown name, mini world not installed, not a CLIP folder, or open_clip weights
            neither cached nor downloadable right now.
    """
    policy = policy or LOCAL_USE
    name = policy.check_name(name, "encoder")
    device = resolve_device(device)
    check_device_available(device)
    if name == MINI_WORLD:
        return _load_hf_clip(mini_world_part("clip", "config.json", "CLIP model"), device, identity_name=MINI_WORLD)
    if name.startswith("open_clip:"):
        return _load_open_clip(name[len("open_clip:"):], device)
    path = policy.local_folder(name)
    if path is None:
        raise policy.refuse("encoder")
    if is_dir_or_file(path)[0]:
        return _load_hf_clip(path, device, identity_name=str(path.resolve()))
    raise ModelLoadError(
        f"unknown encoder {name!r}: use 'mini-world', '{DEFAULT_OPEN_CLIP}' (or another "
        f"'open_clip:<arch>/<pretrained>'), or the path of a local transformers CLIPModel folder."
    )


def _load_hf_clip(folder: Path, device: torch.device, identity_name: str) -> Encoder:
    """A transformers CLIPModel + CLIPTokenizer + CLIPImageProcessor saved with save_pretrained."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from recare.encoders import HFClipEncoder
    from recare.hashing import folder_fingerprint

    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} is not a transformers CLIPModel folder (no config.json). Save one with "
            f"model.save_pretrained(...) plus its tokenizer and image processor."
        )
    try:
        with building_modules():
            model = CLIPModel.from_pretrained(
                folder, local_files_only=True, **{dtype_kwarg("transformers", "4.56"): torch.float32}
            )
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"could not load a CLIP model from {folder}: {first_line(e)}") from e
    identity = f"hf-clip:{identity_name}:{folder_fingerprint(folder)}"
    return HFClipEncoder(model.to(device).eval(), tokenizer, processor, identity=identity, device=device)


def _load_open_clip(spec: str, device: torch.device) -> Encoder:
    """open_clip by "<arch>/<pretrained tag>", reading weights from the HF cache when present."""
    import open_clip

    from recare.encoders import OpenClipEncoder

    arch, _, tag = spec.partition("/")
    if not arch or not tag:
        raise ModelLoadError(f"open_clip encoder must be 'open_clip:<arch>/<pretrained>' (got 'open_clip:{spec}').")
    if open_clip.get_model_config(arch) is None:
        raise ModelLoadError(f"open_clip has no architecture {arch!r}; e.g. ViT-B-32, ViT-B-16-SigLIP.")
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ModelLoadError(f"open_clip has no pretrained weights {tag!r} for {arch}; available: {tags}.")

    weights = _open_clip_weights(cfg, f"open_clip:{arch}/{tag}")
    preprocess_keys = ("mean", "std", "interpolation", "resize_mode", "fill_color")
    try:
        with building_modules():
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch,
                pretrained=weights,                             # a local file: open_clip never touches the network
                force_quick_gelu=bool(cfg.get("quick_gelu", False)),  # OpenAI weights were trained with QuickGELU
                force_preprocess_cfg={k: cfg[k] for k in preprocess_keys if k in cfg},
                device=device,
            )
    except Exception as e:
        raise ModelLoadError(f"could not build open_clip {arch} from {weights}: {first_line(e)}") from e
    tokenizer = _open_clip_tokenizer(arch)
    return OpenClipEncoder(model.eval(), preprocess, tokenizer, identity=f"open_clip:{arch}/{tag}", device=device)


def _open_clip_weights(cfg: dict, label: str) -> str:
    """Local path of an open_clip checkpoint: cache first, download only if the hub answers."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    hub = cfg.get("hf_hub", "")
    if hub:
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        repo_id, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        candidates = [filename]  # open_clip prefers a safetensors copy when the hub has one
        if filename == HF_WEIGHTS_NAME:
            candidates.insert(0, HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        for candidate in candidates:
            cached = try_to_load_from_cache(repo_id, candidate)
            if isinstance(cached, str):
                return cached
        if not hub_reachable():
            raise ModelLoadError(offline_message("encoder", label))
        last: Exception | None = None
        for candidate in candidates:
            try:
                return hf_hub_download(repo_id, candidate)
            except Exception as e:  # e.g. no safetensors copy: try the next name
                last = e
        raise ModelLoadError(f"could not download {label} weights from {repo_id}: {first_line(last)}")
    url = cfg.get("url", "")
    if url:
        target = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if target.is_file():
            return str(target)
        if not hub_reachable():
            raise ModelLoadError(offline_message("encoder", label))
        import open_clip.pretrained

        try:
            return open_clip.pretrained.download_pretrained_from_url(url)
        except Exception as e:
            raise ModelLoadError(f"could not download {label} weights from {url}: {first_line(e)}") from e
    raise ModelLoadError(f"open_clip gives no download location for {label}.")


def _open_clip_tokenizer(arch: str):
    """open_clip's tokenizer for `arch`; HF tokenizers (SigLIP) are read from the local cache when present."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    text_cfg = (open_clip.get_model_config(arch) or {}).get("text_cfg", {})
    hf_name = text_cfg.get("hf_tokenizer_name", "")
    if not hf_name:
        return open_clip.get_tokenizer(arch)  # the bundled CLIP BPE: no network
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(hf_name, local_files_only=True)
    except Exception:
        if not hub_reachable():
            raise ModelLoadError(offline_message("tokenizer", hf_name)) from None
        local = snapshot_download(hf_name, allow_patterns=["*.json", "*.model", "*.txt"])
    return HFTokenizer(
        local,
        context_length=text_cfg.get("context_length", 77),
        tokenizer_mode=text_cfg.get("tokenizer_mode"),
        **text_cfg.get("tokenizer_kwargs", {}),
    )
