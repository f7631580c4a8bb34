"""The only module that loads weights: text-to-image pipelines and image/text encoders, by name.

Names a user can give:
  pipelines: "mini-world" (the bundled offline world), a Hugging Face hub id such as
             "CompVis/stable-diffusion-v1-4" (the paper's model), or a local diffusers folder.
  encoders:  "mini-world" (the bundled mini CLIP), "open_clip:<arch>/<pretrained>" such as
             "open_clip:ViT-B-32/openai" (official) or "open_clip:ViT-B-16-SigLIP/webli", or a local
             transformers CLIPModel folder.

Offline first: a hub model is read from the local Hugging Face cache when it is there; when it is
not and the hub cannot be reached (HF_HUB_OFFLINE=1, no network), loading fails at once with a
`ModelLoadError` that says what to do, never a hang or a traceback.
"""

from __future__ import annotations

import os
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # heavy imports happen inside the loaders
    from diffusers import StableDiffusionPipeline

    from recare.encoders import Encoder

REPO_ROOT = Path(__file__).resolve().parent.parent
MINI_WORLD = "mini-world"
DEFAULT_HUB_MODEL = "CompVis/stable-diffusion-v1-4"   # the paper's base model
DEFAULT_OPEN_CLIP = "open_clip:ViT-B-32/openai"        # the official CARE-set encoder
HUB_PROBE_TIMEOUT_S = 3.0                              # how long to wait for the hub before calling it offline

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


from recare.errors import ModelLoadError  # noqa: E402  (re-exported: raised by this module)


# ---------------------------------------------------------------------------------------------
# device / dtype policy


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Pick the torch device to run on.

    Args:
        device: "auto" (CUDA if available, then Apple MPS, then CPU) or any torch device string.
    """
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
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if resolve_device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use 'auto', 'fp16', 'bf16' or 'fp32'.")
    return _DTYPES[dtype]


def mini_world_dir() -> Path:
    """The bundled mini world's folder: `$RECARE_MINI_WORLD` if set (and not empty), else `<repo>/checkpoints/mini-world`."""
    return Path(os.environ.get("RECARE_MINI_WORLD") or REPO_ROOT / "checkpoints" / "mini-world")


def _mini_world_part(sub: str, marker: str, what: str) -> Path:
    """A folder of the installed mini world, or a ModelLoadError saying how to build it."""
    folder = mini_world_dir() / sub
    if not (folder / marker).is_file():
        raise ModelLoadError(
            f"mini world not installed: {folder} has no {what}. Build it with "
            f"`python -m recare.miniworld.train --out {mini_world_dir()}`, or set RECARE_MINI_WORLD to a folder "
            f"that has one."
        )
    return folder


# ---------------------------------------------------------------------------------------------
# hub reachability


def hub_offline_flag() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub answers within `timeout` seconds (proxies from the env are honoured).

    The probe runs in a daemon thread so that even a hanging DNS lookup cannot block the caller.

    Args:
        timeout: seconds to wait in all.
    """
    if hub_offline_flag():
        return False
    from huggingface_hub import constants

    endpoint = getattr(constants, "ENDPOINT", "https://huggingface.co")
    answer: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
            answer.append(True)
        except urllib.error.HTTPError:
            answer.append(True)  # the server answered, even if with an error code
        except Exception:
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def _offline_message(what: str, name: str) -> str:
    reason = "HF_HUB_OFFLINE is set" if hub_offline_flag() else "the Hugging Face hub cannot be reached"
    return (
        f"{what} {name!r} is not in the local Hugging Face cache and {reason}. "
        f"Run once with network access so it can download, or pass a local folder, "
        f"or use the bundled 'mini-world'."
    )


# ---------------------------------------------------------------------------------------------
# text-to-image pipelines


def load_pipeline(
    name_or_path: str | Path = MINI_WORLD,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
) -> StableDiffusionPipeline:
    """Load a Stable Diffusion pipeline with a DDIM scheduler and no safety checker (as the official code).

    Args:
        name_or_path: "mini-world", a hub id ("CompVis/stable-diffusion-v1-4") or a local diffusers folder.
        device: "auto" or a torch device (see `resolve_device`).
        dtype: "auto" (fp16 on CUDA, fp32 otherwise) or a dtype name (see `resolve_dtype`).

    Raises:
        ModelLoadError: unknown name, mini world not installed, not a diffusers folder, or a hub id that
            is neither cached nor downloadable right now.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    device = resolve_device(device)
    torch_dtype = resolve_dtype(device, dtype)
    source, local = _pipeline_source(str(name_or_path))
    kwargs = {_dtype_kwarg("diffusers", "0.40"): torch_dtype, "safety_checker": None, "requires_safety_checker": False}
    if local:
        try:
            pipe = StableDiffusionPipeline.from_pretrained(source, local_files_only=True, **kwargs)
        except Exception as e:  # a broken folder: missing component, bad config, truncated weights
            raise ModelLoadError(f"could not load the diffusers pipeline in {source}: {_first_line(e)}") from e
    else:
        pipe = _load_hub_pipeline(StableDiffusionPipeline, source, kwargs)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.safety_checker = None
    return pipe.to(device)


def _pipeline_source(name: str) -> tuple[str, bool]:
    """Map a user-given name to (folder or hub id, is_local). Raises ModelLoadError for bad names."""
    if name == MINI_WORLD:
        return str(_mini_world_part("pipeline", "model_index.json", "diffusers pipeline")), True
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{path} is not a diffusers folder (no model_index.json). Pass a folder saved with "
                f"pipeline.save_pretrained(...), a hub id such as {DEFAULT_HUB_MODEL}, or 'mini-world'."
            )
        return str(path), True
    if path.is_file():
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
        raise ModelLoadError(_offline_message("model", hub_id))
    try:
        return pipeline_cls.from_pretrained(hub_id, **kwargs)
    except Exception as e:
        raise ModelLoadError(f"could not download {hub_id!r} from the Hugging Face hub: {_first_line(e)}") from e


def _dtype_kwarg(package: str, renamed_in: str) -> str:
    """`dtype` in newer diffusers/transformers, `torch_dtype` (now deprecated there) in older ones."""
    from importlib.metadata import version

    from packaging.version import Version

    return "dtype" if Version(version(package)) >= Version(renamed_in) else "torch_dtype"


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------------------------------------
# encoders


def load_encoder(name: str | Path = MINI_WORLD, device: str | torch.device = "auto") -> Encoder:
    """Load an image/text encoder used for CARE-set construction and evaluation.

    Args:
        name: "mini-world" (bundled mini CLIP), "open_clip:<arch>/<pretrained>" (official:
            "open_clip:ViT-B-32/openai"; SigLIP: "open_clip:ViT-B-16-SigLIP/webli"), or a local
            transformers CLIPModel folder.
        device: "auto" or a torch device. Encoders run in fp32.

    Raises:
        ModelLoadError: unknown name, mini world not installed, not a CLIP folder, or open_clip weights
            neither cached nor downloadable right now.
    """
    name = str(name)
    device = resolve_device(device)
    if name == MINI_WORLD:
        return _load_hf_clip(_mini_world_part("clip", "config.json", "CLIP model"), device, identity_name=MINI_WORLD)
    if name.startswith("open_clip:"):
        return _load_open_clip(name[len("open_clip:"):], device)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_hf_clip(path, device, identity_name=str(path.resolve()))
    raise ModelLoadError(
        f"unknown encoder {name!r}: use 'mini-world', '{DEFAULT_OPEN_CLIP}' (or another "
        f"'open_clip:<arch>/<pretrained>'), or the path of a local transformers CLIPModel folder."
    )


def _load_hf_clip(folder: Path, device: torch.device, identity_name: str) -> Encoder:
    """A transformers CLIPModel + CLIPTokenizer + CLIPImageProcessor saved with save_pretrained."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from recare.encoders import HFClipEncoder, folder_fingerprint

    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} is not a transformers CLIPModel folder (no config.json). Save one with "
            f"model.save_pretrained(...) plus its tokenizer and image processor."
        )
    try:
        model = CLIPModel.from_pretrained(
            folder, local_files_only=True, **{_dtype_kwarg("transformers", "4.56"): torch.float32}
        )
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"could not load a CLIP model from {folder}: {_first_line(e)}") from e
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
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch,
            pretrained=weights,                             # a local file: open_clip never touches the network
            force_quick_gelu=bool(cfg.get("quick_gelu", False)),  # OpenAI weights were trained with QuickGELU
            force_preprocess_cfg={k: cfg[k] for k in preprocess_keys if k in cfg},
            device=device,
        )
    except Exception as e:
        raise ModelLoadError(f"could not build open_clip {arch} from {weights}: {_first_line(e)}") from e
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
            raise ModelLoadError(_offline_message("encoder", label))
        last: Exception | None = None
        for candidate in candidates:
            try:
                return hf_hub_download(repo_id, candidate)
            except Exception as e:  # e.g. no safetensors copy: try the next name
                last = e
        raise ModelLoadError(f"could not download {label} weights from {repo_id}: {_first_line(last)}")
    url = cfg.get("url", "")
    if url:
        target = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if target.is_file():
            return str(target)
        if not hub_reachable():
            raise ModelLoadError(_offline_message("encoder", label))
        import open_clip.pretrained

        try:
            return open_clip.pretrained.download_pretrained_from_url(url)
        except Exception as e:
            raise ModelLoadError(f"could not download {label} weights from {url}: {_first_line(e)}") from e
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
            raise ModelLoadError(_offline_message("tokenizer", hf_name)) from None
        local = snapshot_download(hf_name, allow_patterns=["*.json", "*.model", "*.txt"])
    return HFTokenizer(
        local,
        context_length=text_cfg.get("context_length", 77),
        tokenizer_mode=text_cfg.get("tokenizer_mode"),
        **text_cfg.get("tokenizer_kwargs", {}),
    )
