"""Every hash the project writes into a file: one helper per kind of thing hashed.

    file_sha256(path)            the full sha256 of a file (manifests: what exactly was used)
    file_fingerprint(path)       size + first and last MiB: cheap, changes with a weights file
    folder_fingerprint(folder)   names, sizes and both ends of every file of a model folder
    text_hash(text, digits)      a short id of a string (cache keys, client ids)
    tensors_sha256(state)        names and every value of a state dict
    model_fingerprint(model)     names, shapes and a few values per tensor: tells base models apart

The fingerprints are ids, not checksums: two inputs that differ only where they do not look get
the same id.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

import torch

FINGERPRINT_SAMPLES = 8   # values read from each tensor for model_fingerprint
_END_BYTES = 1 << 20      # file_fingerprint reads this much from each end
_FOLDER_END_BYTES = 1 << 16


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (64 hex digits), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_fingerprint(path: str | Path, digits: int = 12) -> str:
    """sha256 over a file's size and its first and last MiB: cheap, and changes with the weights."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(_END_BYTES))
        f.seek(max(size - _END_BYTES, 0))
        digest.update(f.read())
    return digest.hexdigest()[:digits]


def folder_fingerprint(folder: str | Path, digits: int = 12) -> str:
    """sha256 over a folder's file names, sizes and the ends of each file (cheap, changes on retraining)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder)}:{size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(_FOLDER_END_BYTES))
            if size > _FOLDER_END_BYTES:
                f.seek(max(size - _FOLDER_END_BYTES, _FOLDER_END_BYTES))
                digest.update(f.read())
    return digest.hexdigest()[:digits]


def text_hash(text: str | bytes, digits: int = 16) -> str:
    """The first `digits` hex digits of the sha256 of `text` (UTF-8, unpaired surrogates replaced)."""
    data = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
    return hashlib.sha256(data).hexdigest()[:digits]


def tensors_sha256(state: Mapping[str, torch.Tensor], digits: int = 12) -> str:
    """sha256 over a state dict's names and every value (exact; reads all of it)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:digits]


def model_fingerprint(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor],
                      samples: int = FINGERPRINT_SAMPLES) -> str:
    """A short id of a model's weights: sha256 over every tensor's name and shape and a few of its values.

    Cheap (a handful of values per tensor, one device-to-host copy) and the same for the fp32 and
    fp16 copies of one model (the sampled values are rounded to fp16 before hashing). Two models
    that differ only in values the sample misses get the same id: it tells base models apart, it
    is not a checksum.

    Args:
        model_or_state: a module (its state dict is read) or a state dict.
        samples: values read per tensor, evenly spaced over the flattened tensor.

    Returns:
        "sha256:" followed by 16 hex digits.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    digest = hashlib.sha256()
    picked = []
    for name in sorted(state):
        tensor = state[name]
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel():
            index = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel()), device=flat.device).long()
            picked.append(flat[index].to(torch.float16))
    if picked:
        digest.update(torch.cat(picked).cpu().numpy().tobytes())
    return f"sha256:{digest.hexdigest()[:16]}"
