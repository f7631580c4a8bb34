"""Trained UNet weights and learned tokens, the reading side of what `recare.train.export` writes.

Formats (see `find_trained_weights`): `trained_params.safetensors` (only the changed UNet tensors), a
diffusers `unet/` folder, or the official `ReCARE-Diffusers-UNet.pt` (the full UNet state dict); learned
textual-inversion tokens are `tokens/<name>.safetensors` files of {placeholder: embedding}.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from recare.errors import ModelLoadError
from recare.limits import Limits
from recare.models.hub import first_line

if TYPE_CHECKING:
    import torch

# trained-weight file names written by recare.train (the .pt name is the official code's)
TRAINED_PARAMS_FILE = "trained_params.safetensors"
OFFICIAL_UNET_FILE = "ReCARE-Diffusers-UNet.pt"
TOKENS_DIR = "tokens"
_UNET_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_UNET_INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")

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
                raise ModelLoadError(f"could not read the shard index {index}: {first_line(e)}") from e
            return (index, *(folder / shard for shard in shards))
    for name in _UNET_WEIGHT_FILES:
        if (folder / name).is_file():
            return (folder / name,)
    return ()


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
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
        state.update(read_tensor_file(f))
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
        state = read_tensor_file(f)
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
            raise ModelLoadError(f"could not load the learned token {placeholder!r} from {f}: {first_line(e)}") from e
    return [placeholder for _, placeholder in planned]
