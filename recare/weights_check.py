"""Trained-weights files inspected before a byte of them is inflated or a tensor allocated.

An uploaded checkpoint is small on the wire and may be huge in memory: a torch zip whose tensor
member is deflate-compressed 1000:1, or a safetensors header that lists a million tensors. So
`inspect_weights_file` reads only what a file says about itself and compares it with the base UNet
it is meant for (`shapes`: the base's state-dict names and shapes):

- safetensors: the header's length (`checkpoint_header_bytes`), then the header: at most as many
  tensors as the base has (and `checkpoint_tensors`), every name one of the base's, every shape the
  base's, every data range inside the file;
- a torch zip (`torch.save`'s format, `ReCARE-Diffusers-UNet.pt`): no compressed member (torch
  stores them as they are), and the members' declared sizes (the pickle within `checkpoint_header_bytes`, the tensor data at most what
  the base's tensors take in float64, members at most one per base tensor plus torch's few own);
- anything else torch reads (the legacy format) is bounded by its own size on disk.

Messages name the file by its name only, never by its folder.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Mapping

from recare.errors import ModelLoadError
from recare.limits import Limits, human_bytes

_SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                       "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_TORCH_OWN_MEMBERS = 16  # data.pkl, version, byteorder, .data/serialization_id, ... beside one member per tensor


def mismatch_error(file_name: str, detail: str, metadata: Mapping[str, str] | None = None) -> ModelLoadError:
    """The error for weights of another base model: the file, what differs, and the base its metadata names.

    Args:
        file_name: the weights file's name (never its folder).
        detail: the first difference, e.g. "its tensor 'x' is not in the base UNet".
        metadata: the file's metadata (safetensors); entries whose key mentions "base" are quoted.
    """
    said = ", ".join(f"{k}={v}" for k, v in sorted((metadata or {}).items()) if "base" in str(k).lower())
    return ModelLoadError(f"{file_name} does not fit this base model: {detail}. The checkpoint was trained on another "
                          f"base model{f' ({said})' if said else ''}; load it onto the model it was trained from.")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def inspect_weights_file(path: str | Path, shapes: Mapping[str, tuple], limits: Limits | None = None) -> None:
    """Refuse a weights file whose own description does not fit the base UNet or the limits.

    Args:
        path: a `.safetensors` file or a torch file (`.pt`, `.pth`, `.bin`).
        shapes: the base UNet's {state-dict name: shape}.
        limits: `checkpoint_tensors` and `checkpoint_header_bytes` (default `Limits.from_env()`).

    Raises:
        ModelLoadError: the header is too large, damaged, or lists tensors the base does not have
            or shapes it does not have; a zip declares more than the base's tensors can take.
    """
    path = Path(path)
    limits = limits or Limits.from_env()
    if path.suffix == ".safetensors":
        _inspect_safetensors(path, shapes, limits)
    elif zipfile.is_zipfile(path):
        _inspect_torch_zip(path, shapes, limits)


def _damaged(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(f"{path.name} is damaged or incomplete: {why}; export or copy it again.")


def _inspect_safetensors(path: Path, shapes: Mapping[str, tuple], limits: Limits) -> None:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _damaged(path, "it is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise _damaged(path, "its header claims to be longer than the file")
        if length > limits.checkpoint_header_bytes:
            raise ModelLoadError(limits.exceeded("checkpoint_header_bytes",
                                                 f"{path.name} has a {human_bytes(length)} header"))
        try:
            header = json.loads(fh.read(length))
        except (ValueError, RecursionError):
            raise _damaged(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _damaged(path, "its header is not a table of tensors")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    metadata = header.get("__metadata__") if isinstance(header.get("__metadata__"), dict) else {}
    most = min(limits.checkpoint_tensors, len(shapes))
    if len(tensors) > most:
        if len(tensors) > limits.checkpoint_tensors:
            raise ModelLoadError(limits.exceeded("checkpoint_tensors", f"{path.name} lists {len(tensors):,} tensors"))
        raise mismatch_error(path.name, f"it lists {len(tensors):,} tensors and the base UNet has {len(shapes):,}",
                             metadata)
    data = size - 8 - length
    for name, entry in tensors.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in _SAFETENSORS_DTYPES \
                or not isinstance(entry.get("shape"), list) or not isinstance(entry.get("data_offsets"), list):
            raise _damaged(path, f"the entry of tensor {str(name)[:80]!r} is malformed")
        if name not in shapes:
            raise mismatch_error(path.name, f"its tensor {str(name)[:80]!r} is not in the base UNet", metadata)
        if tuple(entry["shape"]) != tuple(shapes[name]):
            raise mismatch_error(path.name, f"tensor {name!r} has shape {list(entry['shape'])[:8]} in the checkpoint "
                                            f"but {list(shapes[name])} in the base UNet", metadata)
        begin, end = (entry["data_offsets"] + [None, None])[:2]
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data
                and end - begin == _numel(entry["shape"]) * _SAFETENSORS_DTYPES[entry["dtype"]]):
            raise _damaged(path, f"the data of tensor {name!r} lies outside the file (truncated or damaged)")


def _inspect_torch_zip(path: Path, shapes: Mapping[str, tuple], limits: Limits) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise _damaged(path, f"its zip directory is damaged ({type(e).__name__})") from None
    packed = next((m for m in members if m.compress_type != zipfile.ZIP_STORED), None)
    if packed is not None:  # torch.save stores its members as they are; a compressed one can inflate 1000:1
        raise ModelLoadError(f"{path.name} is refused unread: its entry {packed.filename[-60:]!r} is compressed, which "
                             "torch.save never writes (it could unpack to far more than it weighs); save the state "
                             "dict with torch.save and upload that file.")
    most = min(limits.checkpoint_tensors, len(shapes)) + _TORCH_OWN_MEMBERS
    if len(members) > most:
        raise ModelLoadError(f"{path.name} holds {len(members):,} entries; a state dict of this base UNet holds at "
                             f"most {most:,} ({len(shapes):,} tensors).")
    budget = sum(_numel(s) for s in shapes.values()) * 8  # every base tensor in float64: the largest honest file
    pickles = sum(m.file_size for m in members if m.filename.endswith(".pkl"))
    if pickles > limits.checkpoint_header_bytes:
        raise ModelLoadError(limits.exceeded("checkpoint_header_bytes",
                                             f"{path.name} declares a {human_bytes(pickles)} index (data.pkl)"))
    declared = sum(m.file_size for m in members)
    if declared > budget + limits.checkpoint_header_bytes:
        raise ModelLoadError(f"{path.name} declares {human_bytes(declared)} of data once unpacked; the base UNet's "
                             f"tensors take at most {human_bytes(budget)}, so it is not a checkpoint of this model.")


__all__ = ["inspect_weights_file", "mismatch_error"]
