"""Loading models by name: text-to-image pipelines, image/text encoders, and trained UNet weights.

This module loads what a user names (a pipeline, an encoder, a training run's weights or learned
tokens). A few bundled or optional models are loaded by their own modules, each from a fixed place:
  recare/miniworld/oracle.py     the mini world's judge (`load_oracle`: a small classifier, safetensors)
  recare/miniworld/clip.py       the mini CLIP as the world's scorer (`load_mini_clip`)
  recare/miniworld/generator.py  the world's own VAE/UNet parts while building the mini world
  recare/safety.py               NudeNet (ONNX, through the `nudenet` package) for the safety flags
Everything else receives models as arguments. `recare.model_cache.ModelCache` keeps loaded ones
per process.

Names a user can give:
  pipelines: "mini-world" (the bundled offline world), a Hugging Face hub id such as
             "CompVis/stable-diffusion-v1-4" (the paper's model), or a local diffusers folder.
  encoders:  "mini-world" (the bundled mini CLIP), "open_clip:<arch>/<pretrained>" such as
             "open_clip:ViT-B-32/openai" (official) or "open_clip:ViT-B-16-SigLIP/webli", or a local
             transformers CLIPModel folder.
  trained:   a training run folder, or one of its weight formats (see `find_trained_weights`):
             `trained_params.safetensors` (only the changed UNet tensors), a diffusers `unet/`
             folder, or the official `ReCARE-Diffusers-UNet.pt` (the full UNet state dict).

Offline first: a hub model is read from the local Hugging Face cache when it is there; when it is
not and the hub cannot be reached (HF_HUB_OFFLINE=1, no network), loading fails at once with a
`ModelLoadError` that says what to do, never a hang or a traceback.

Public deployments: a `ModelPolicy` says which names a caller may load. The default (local use)
allows everything above. `ModelPolicy.public(allowed_dirs)` (the app on a Space, with --share or
--public) allows the bundled mini world, hub ids and open_clip names, and local folders only inside
the listed folders; every other path is refused with one message that says nothing about the
server's file system (an existing file, a folder and a missing path read the same).

Imports: torch, diffusers, transformers, safetensors and open_clip are imported inside the
functions that need them, so `import recare.models` (names, device policy, offline checks) is cheap.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from recare.errors import ModelLoadError  # re-exported: raised by this module
from recare.limits import Limits

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

    from recare.encoders import Encoder

REPO_ROOT = Path(__file__).resolve().parent.parent
MINI_WORLD = "mini-world"
DEFAULT_HUB_MODEL = "CompVis/stable-diffusion-v1-4"   # the paper's base model
DEFAULT_OPEN_CLIP = "open_clip:ViT-B-32/openai"        # the official CARE-set encoder
HUB_PROBE_TIMEOUT_S = 3.0                              # how long to wait for the hub before calling it offline

# trained-weight file names written by recare.train (the .pt name is the official code's)
TRAINED_PARAMS_FILE = "trained_params.safetensors"
OFFICIAL_UNET_FILE = "ReCARE-Diffusers-UNet.pt"
TOKENS_DIR = "tokens"
_UNET_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_UNET_INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
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


def __getattr__(name: str):
    if name == "_DTYPES":  # the table under its old module-level name
        return _dtype_table()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# device / dtype policy


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


# ---------------------------------------------------------------------------------------------
# which names a caller may load


PUBLIC_REFUSAL = (
    "this public app loads only {examples}; local paths are turned off "
    "(whoever runs the app can allow model folders with --allow-model DIR or RECARE_ALLOWED_MODELS)."
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclasses.dataclass(frozen=True)
class ModelPolicy:
    """Which model and encoder names a caller may load.

    Attributes:
        local_paths: True (local use, the default): any local folder. False (a public deployment):
            only 'mini-world', hub ids, 'open_clip:...' names, and folders inside `allowed_dirs`.
        allowed_dirs: folders (resolved, absolute) whose contents may be loaded even when
            `local_paths` is False; the operator lists them.
        limits: `name_chars` bounds the length of a name (None: `Limits.from_env()` when checked).
    """

    local_paths: bool = True
    allowed_dirs: tuple[Path, ...] = ()
    limits: Limits | None = None

    @classmethod
    def public(cls, allowed_dirs: Iterable[str | Path] = (), limits: Limits | None = None) -> "ModelPolicy":
        """The policy of a public deployment: no local paths except inside `allowed_dirs`.

        Args:
            allowed_dirs: model folders (or folders of model folders) the operator allows.
            limits: the bounds (default `Limits.from_env()`).
        """
        dirs = tuple(Path(d).expanduser().resolve() for d in allowed_dirs if str(d).strip())
        return cls(local_paths=False, allowed_dirs=dirs, limits=limits)

    @property
    def public_mode(self) -> bool:
        """True when local paths are refused (except the allowed folders)."""
        return not self.local_paths

    def check_name(self, name: str, what: str = "model") -> str:
        """`name` stripped, or ModelLoadError when it is empty, too long, or holds control characters.

        Args:
            name: what the user typed.
            what: "model" or "encoder", for the message.
        """
        if not isinstance(name, (str, Path)):
            raise ModelLoadError(f"the {what} name must be text.")
        name = str(name).strip()
        if not name:
            raise ModelLoadError(f"the {what} name is empty: use 'mini-world' or a hub id such as {DEFAULT_HUB_MODEL}.")
        limits = self.limits or Limits.from_env()
        if len(name) > limits.name_chars:
            raise ModelLoadError(limits.exceeded("name_chars", f"the {what} name has {len(name):,} characters"))
        if _CONTROL.search(name):
            raise ModelLoadError(f"the {what} name holds control characters: retype it.")
        return name

    def local_folder(self, name: str) -> Path | None:
        """The folder `name` points at when this policy lets it be loaded from disk, else None.

        With `local_paths` every name may be a path (the caller then looks at the file system).
        Without, only a path inside an allowed folder is one; nothing else touches the disk.

        Args:
            name: a checked name (see `check_name`).
        """
        if self.local_paths:
            return Path(name).expanduser()
        if not self.allowed_dirs or not (os.path.isabs(name) or name.startswith(("~", "."))):
            return None  # relative names are hub ids here, never paths under the server's working folder
        try:
            resolved = Path(name).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        if any(resolved == d or d in resolved.parents for d in self.allowed_dirs):
            return resolved
        return None

    def refuse(self, kind: str) -> ModelLoadError:
        """The one error for a path this policy does not allow (the same for any path, existing or not)."""
        examples = (f"'{MINI_WORLD}' or a hub id such as {DEFAULT_HUB_MODEL}" if kind == "model"
                    else f"'{MINI_WORLD}' or '{DEFAULT_OPEN_CLIP}' (or another 'open_clip:<arch>/<pretrained>')")
        return ModelLoadError(PUBLIC_REFUSAL.format(examples=examples))


LOCAL_USE = ModelPolicy()  # the default: every name allowed (frozen, so sharing it is safe)


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
    import urllib.error
    import urllib.request

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
    kwargs = {_dtype_kwarg("diffusers", "0.40"): torch_dtype, "safety_checker": None, "requires_safety_checker": False}
    if variant:
        kwargs["variant"] = variant
    if local:
        try:
            pipe = StableDiffusionPipeline.from_pretrained(source, local_files_only=True, **kwargs)
        except Exception as e:  # a broken folder: missing component, bad config, truncated weights
            raise ModelLoadError(f"could not load the diffusers pipeline in {source}: {_first_line(e)}") from e
    else:
        pipe = _load_hub_pipeline(StableDiffusionPipeline, source, kwargs)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.safety_checker = None
    pipe = pipe.to(device)
    if trained is not None:
        apply_trained(pipe.unet, trained)
    return pipe


def is_hub_id(name: str) -> bool:
    """True when `name` has the form of a Hugging Face hub id ("owner/name").

    Args:
        name: a model name.
    """
    return bool(_HUB_ID.match(name))


def _is_dir_or_file(path: Path) -> tuple[bool, bool]:
    """(is a folder, is a file), False for names the file system cannot even look up (too long, ...)."""
    try:
        return path.is_dir(), path.is_file()
    except (OSError, ValueError):
        return False, False


def _pipeline_source(name: str, policy: ModelPolicy = LOCAL_USE) -> tuple[str, bool]:
    """Map a user-given name to (folder or hub id, is_local). Raises ModelLoadError for bad names."""
    if name == MINI_WORLD:
        return str(_mini_world_part("pipeline", "model_index.json", "diffusers pipeline")), True
    path = policy.local_folder(name)
    if path is None:  # a public app: a hub id or nothing
        if _HUB_ID.match(name):
            return name, False
        raise policy.refuse("model")
    is_dir, is_file = _is_dir_or_file(path)
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
# trained UNet weights and learned tokens (the formats recare.train writes)

TRAINED_PARAMS = "trained-params"   # a subset of the UNet state dict (safetensors), applied with strict=False
DIFFUSERS_UNET = "diffusers-unet"   # a full diffusers UNet folder (unet.save_pretrained)
STATE_DICT = "state-dict"           # a torch.save'd full UNet state dict (the official ReCARE-Diffusers-UNet.pt)


@dataclasses.dataclass(frozen=True)
class TrainedWeights:
    """Where a training result's UNet weights are, and in which format.

    Attributes:
        path: the file to read, or the diffusers `unet/` folder.
        format: TRAINED_PARAMS, DIFFUSERS_UNET or STATE_DICT.
        files: every file whose bytes are read (for a sharded UNet folder: the index and its shards).
    """

    path: Path
    format: str
    files: tuple[Path, ...]

    @property
    def full(self) -> bool:
        """True when the checkpoint must hold every UNet tensor (a full state dict), False for a subset."""
        return self.format != TRAINED_PARAMS

    def signature(self) -> tuple:
        """(format, path, (name, size, mtime) per file): stays equal while the weights on disk do not change."""
        stats = []
        for f in self.files:
            st = f.stat()
            stats.append((str(f), st.st_size, st.st_mtime_ns))
        return (self.format, str(self.path.resolve()), tuple(stats))


def find_trained_weights(path: str | Path | TrainedWeights) -> TrainedWeights:
    """Locate trained UNet weights and tell their format.

    A training run folder may hold several formats; the smallest is read: `trained_params.safetensors`,
    else a diffusers `unet/` folder, else the official `ReCARE-Diffusers-UNet.pt`.

    Args:
        path: a training run folder, a diffusers pipeline folder, a diffusers UNet folder, or one weights file
            (`*.safetensors` holding trained parameters, `diffusion_pytorch_model.*` of a UNet folder, or a
            `*.pt` / `*.pth` / `*.bin` full UNet state dict). A TrainedWeights is returned as it is.

    Raises:
        ModelLoadError: nothing there, or no weights in a format this library reads.
    """
    if isinstance(path, TrainedWeights):
        return path
    path = Path(path).expanduser()
    if path.is_file():
        return _trained_weights_file(path)
    if not path.is_dir():
        raise ModelLoadError(f"trained weights not found: {path} does not exist.")
    if (path / TRAINED_PARAMS_FILE).is_file():
        return TrainedWeights(path / TRAINED_PARAMS_FILE, TRAINED_PARAMS, (path / TRAINED_PARAMS_FILE,))
    for folder in (path, path / "unet"):
        files = _unet_folder_files(folder)
        if files:
            return TrainedWeights(folder, DIFFUSERS_UNET, files)
    if (path / OFFICIAL_UNET_FILE).is_file():
        return TrainedWeights(path / OFFICIAL_UNET_FILE, STATE_DICT, (path / OFFICIAL_UNET_FILE,))
    raise ModelLoadError(
        f"{path} holds no trained UNet weights: expected {TRAINED_PARAMS_FILE}, a diffusers unet/ folder, or "
        f"{OFFICIAL_UNET_FILE} (a finished training run folder has at least one of them)."
    )


def _trained_weights_file(path: Path) -> TrainedWeights:
    """The format of a single weights file, told by its name."""
    if path.name in _UNET_WEIGHT_FILES or path.name in _UNET_INDEX_FILES:
        return TrainedWeights(path.parent, DIFFUSERS_UNET, _unet_folder_files(path.parent))
    if path.suffix == ".safetensors":
        return TrainedWeights(path, TRAINED_PARAMS, (path,))
    if path.suffix in (".pt", ".pth", ".bin"):
        return TrainedWeights(path, STATE_DICT, (path,))
    raise ModelLoadError(
        f"{path.name} is not a trained-weights file this library reads: use {TRAINED_PARAMS_FILE} (or another "
        f"*.safetensors of UNet tensors), a diffusers unet/ folder, or a torch.save'd UNet state dict (*.pt)."
    )


def _unet_folder_files(folder: Path) -> tuple[Path, ...]:
    """The weight files of a diffusers UNet folder (index + shards, or one file); () when it is not one."""
    for index_name in _UNET_INDEX_FILES:
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except Exception as e:
                raise ModelLoadError(f"could not read the shard index {index}: {_first_line(e)}") from e
            return (index, *(folder / shard for shard in shards))
    for name in _UNET_WEIGHT_FILES:
        if (folder / name).is_file():
            return (folder / name,)
    return ()


def _read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """A {name: tensor} file on the CPU: safetensors, or torch.load with weights_only (no code runs)."""
    import torch

    if not path.is_file():
        raise ModelLoadError(f"trained weights incomplete: {path.name} is missing.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or corrupt files raise many types here
        raise ModelLoadError(
            f"could not read {path.name}: it is damaged or incomplete ({type(e).__name__}); export or copy it again."
        ) from e
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelLoadError(f"{path.name} is not a state dict (a mapping of tensor names to tensors).")
    return dict(state)


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise ModelLoadError(
            f"could not read {path.name}: it is damaged or incomplete ({type(e).__name__}); export or copy it again."
        ) from e


def load_trained_unet_state(path: str | Path | TrainedWeights, unet,
                            check_base: bool = True, limits: Limits | None = None) -> dict[str, torch.Tensor]:
    """Read trained UNet weights (any format of `find_trained_weights`) and check that they fit `unet`.

    Args:
        path: a training run folder or one of its weight formats (see `find_trained_weights`).
        unet: the base UNet the weights are meant for (only read: its tensor names, shapes and a few values).
        check_base: when a `trained_params.safetensors` header records its base model's fingerprint
            (`recare.hashing.model_fingerprint`), require `unet` to have the same one: two bases of one
            architecture (SD v1.4 and v1.5) have the same names and shapes, so only this tells them apart.
            The check runs for fp32 and fp16 UNets (the fingerprint is the same for both copies of a model).
        limits: bounds of the files' headers (`recare.weights_check.inspect_weights_file`, which looks at
            every file before it is read; default `Limits.from_env()`).

    Returns:
        {state-dict name: tensor on the CPU}; `unet.load_state_dict(state, strict=False)` applies it.

    Raises:
        ModelLoadError: unreadable or damaged files, or a checkpoint trained on another base model (a
            tensor the UNet lacks, a shape that differs, or, for a full state dict, a missing tensor;
            the message names the first such tensor), or another base fingerprint (see `check_base`).
    """
    from recare.weights_check import inspect_weights_file

    weights = find_trained_weights(path)
    shapes = {name: tuple(t.shape) for name, t in unet.state_dict().items()}
    tensor_files = [f for f in weights.files if not f.name.endswith(".json")]
    for f in tensor_files:  # what each file says about itself, before anything is inflated
        if f.is_file():
            inspect_weights_file(f, shapes, limits)
    metadata: dict[str, str] = {}
    if weights.format == TRAINED_PARAMS:
        metadata = _safetensors_metadata(weights.path)
    state: dict[str, torch.Tensor] = {}
    for f in tensor_files:
        state.update(_read_tensor_file(f))
    _check_fits(state, unet, weights, metadata)
    if check_base:
        _check_base_fingerprint(unet, weights, metadata)
    return state


def _check_fits(state: Mapping[str, torch.Tensor], unet, weights: TrainedWeights, metadata: Mapping[str, str]) -> None:
    """ModelLoadError naming the first tensor of `state` that does not fit `unet` (see load_trained_unet_state)."""
    shapes = {name: tuple(t.shape) for name, t in unet.state_dict().items()}

    from recare.weights_check import mismatch_error

    def mismatch(detail: str) -> ModelLoadError:
        return mismatch_error(weights.path.name, detail, metadata)

    for name, tensor in state.items():
        if name not in shapes:
            raise mismatch(f"its tensor {name!r} is not in the base UNet")
        if tuple(tensor.shape) != shapes[name]:
            raise mismatch(
                f"tensor {name!r} has shape {list(tensor.shape)} in the checkpoint but {list(shapes[name])} in the base UNet"
            )
    if weights.full:
        missing = [name for name in shapes if name not in state]
        if missing:
            raise mismatch(
                f"it lacks the base UNet's tensor {missing[0]!r} ({len(missing)} of {len(shapes)} tensors missing)"
            )


def _check_base_fingerprint(unet, weights: TrainedWeights, metadata: Mapping[str, str]) -> None:
    """ModelLoadError when the weights' header names another base UNet than `unet` (see load_trained_unet_state)."""
    import torch

    expected = metadata.get("base_fingerprint")
    dtype = next(unet.parameters()).dtype
    if not expected or dtype not in (torch.float32, torch.float16):  # it rounds values to fp16: bf16 copies differ
        return
    from recare.hashing import model_fingerprint

    actual = model_fingerprint(unet)
    if actual != expected:
        raise ModelLoadError(
            f"{weights.path} was trained from another base model: its header records the base UNet "
            f"{expected}, this model's UNet is {actual}. Load it onto the model it was trained from "
            f"(or pass check_base=False to apply it anyway)."
        )


def apply_trained(unet, path: str | Path | TrainedWeights, check_base: bool = True) -> TrainedWeights:
    """Apply trained weights to `unet` in place (checked first: nothing changes when they do not fit).

    Args:
        unet: the UNet to change (a fresh copy if the base must stay as it is: see `derive_pipeline`).
        path: a training run folder or one of its weight formats (see `find_trained_weights`).
        check_base: require the base fingerprint recorded with the weights, if any (see `load_trained_unet_state`).

    Returns:
        What was applied (path and format).

    Raises:
        ModelLoadError: see `load_trained_unet_state`.
    """
    weights = find_trained_weights(path)
    unet.load_state_dict(load_trained_unet_state(weights, unet, check_base), strict=False)  # copies into the existing tensors
    return weights


def find_token_files(folder: str | Path) -> list[Path]:
    """The learned-token files of a training run: `<folder>/tokens/*.safetensors` (or `<folder>/*.safetensors`).

    Args:
        folder: a training run folder, or its `tokens/` folder.

    Raises:
        ModelLoadError: no such folder or no token files in it.
    """
    folder = Path(folder).expanduser()
    tokens_dir = folder / TOKENS_DIR if (folder / TOKENS_DIR).is_dir() else folder
    files = sorted(tokens_dir.glob("*.safetensors")) if tokens_dir.is_dir() else []
    if not files:
        raise ModelLoadError(
            f"no learned tokens in {folder}: expected {TOKENS_DIR}/<name>.safetensors files, each holding "
            f"{{placeholder: embedding}} (a ReCARE training run writes them)."
        )
    return files


def load_learned_tokens(pipe, folder: str | Path) -> list[str]:
    """Add a training run's learned textual-inversion tokens to `pipe` (its tokenizer and text encoder change).

    Every file is checked before any is loaded, so a bad file leaves `pipe` as it was. Each file is a
    safetensors file holding {placeholder string: embedding [hidden]} and is loaded with
    `pipe.load_textual_inversion(file, token=placeholder)`, as plain diffusers would.

    Args:
        pipe: a diffusers pipeline whose tokenizer and text encoder are its own (not a shared cached base:
            use `derive_pipeline(base, learned_tokens=folder)` for that).
        folder: a training run folder, or its `tokens/` folder.

    Returns:
        The placeholder strings added (e.g. ["<v1*>", "<v2*>"]), in file-name order.

    Raises:
        ModelLoadError: no token files, a damaged file, a file with more than one tensor, an embedding of
            another width than the text encoder's (learned on another base model), or a placeholder the
            tokenizer already has.
    """
    hidden = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    vocab = pipe.tokenizer.get_vocab()
    planned: list[tuple[Path, str]] = []
    for f in find_token_files(folder):
        state = _read_tensor_file(f)
        if len(state) != 1:
            raise ModelLoadError(
                f"{f} holds {len(state)} tensors; a learned-token file holds exactly one: {{placeholder: embedding}}."
            )
        ((placeholder, embedding),) = state.items()
        if embedding.shape[-1] != hidden:
            raise ModelLoadError(
                f"{f}: the embedding of {placeholder!r} has width {embedding.shape[-1]} but this text encoder's is "
                f"{hidden}; the token was learned on another base model."
            )
        if placeholder in vocab or placeholder in (p for _, p in planned):
            raise ModelLoadError(
                f"{f}: the tokenizer already has {placeholder!r}; load learned tokens into a fresh pipeline "
                f"(e.g. derive_pipeline(base, learned_tokens=...))."
            )
        planned.append((f, placeholder))
    for f, placeholder in planned:
        try:
            pipe.load_textual_inversion(str(f), token=placeholder)
        except Exception as e:
            raise ModelLoadError(f"could not load the learned token {placeholder!r} from {f}: {_first_line(e)}") from e
    return [placeholder for _, placeholder in planned]


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
        load_learned_tokens(pipe, learned_tokens)
    return pipe


# ---------------------------------------------------------------------------------------------
# encoders


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
        return _load_hf_clip(_mini_world_part("clip", "config.json", "CLIP model"), device, identity_name=MINI_WORLD)
    if name.startswith("open_clip:"):
        return _load_open_clip(name[len("open_clip:"):], device)
    path = policy.local_folder(name)
    if path is None:
        raise policy.refuse("encoder")
    if _is_dir_or_file(path)[0]:
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
