"""Builders of hostile inputs shared by tests/test_hardening.py and tests/test_hostile.py (no tests here)."""

from __future__ import annotations

import contextlib
import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from recare.careset import CareSet
from recare.config import CareSetConfig


def toy_careset(n: int = 1000, clusters: int = 6) -> CareSet:
    """A CareSet built directly (no t-SNE): n candidates in `clusters` clusters, every third dropped."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(n, 8)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return CareSet(
        config=CareSetConfig(reference_word="cat", top_n=max(n, 1), n_clusters=clusters),
        tokens=[f"t{i}" for i in range(n)], vocab_indices=np.arange(n), counts=np.ones(n, dtype=np.int64),
        features=features, target_feature=features[0], similarity=np.zeros(n, np.float32),
        residuals=np.ones(n), points=np.zeros((n, 2), np.float32), labels=np.arange(n) % clusters,
        cluster_mean_residual=np.ones(clusters), auto_reasons=[None if i % 3 else "intra-cluster" for i in range(n)],
    )


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1 x 1 PNG whose header claims width x height (the CRC fixed, so the header reads as valid)."""
    data = bytearray(png_bytes(1, 1))
    ihdr = 8  # after the signature: length (4), b"IHDR" (4), width (4), height (4), ...
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4:ihdr + 8 + 13]))
    data[ihdr + 8 + 13:ihdr + 8 + 17] = struct.pack(">I", crc)
    return bytes(data)


def zip_with(path: Path, members: dict[str, bytes], flag: int | None = None, method: int | None = None) -> Path:
    """A zip of `members`; `flag` / `method` overwrite the first entry's general-purpose flags / method."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    data = bytearray(buffer.getvalue())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    if flag is not None:
        data[local + 6:local + 8] = data[central + 8:central + 10] = struct.pack("<H", flag)
    if method is not None:
        data[local + 8:local + 10] = data[central + 10:central + 12] = struct.pack("<H", method)
    path.write_bytes(bytes(data))
    return path


def deflated_torch_file(path: Path, mib: int = 64) -> Path:
    """A ReCARE-Diffusers-UNet.pt whose members are deflate-compressed: `mib` MiB of zeros in ~`mib` KiB.

    torch.save writes its zip members stored; this one inflates about 1000:1 when read.
    """
    import torch

    plain = path.with_suffix(".plain")
    torch.save({"conv_in.weight": torch.zeros(mib << 18)}, plain)  # float32: mib MiB
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for info in source.infolist():
            archive.writestr(info.filename, source.read(info.filename))
    plain.unlink()
    return path


def safetensors_with(path: Path, tensors: dict[str, dict], header_pad: int = 0) -> Path:
    """A .safetensors file written by hand: `tensors` is {name: {"dtype", "shape", "data_offsets"}} (the header),
    followed by as many zero bytes as the offsets need; `header_pad` spaces make the header longer."""
    import json as _json

    header = _json.dumps(tensors).encode() + b" " * header_pad
    end = max((t["data_offsets"][1] for t in tensors.values()), default=0)
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * end)
    return path


@contextlib.contextmanager
def launched(workspace: Path, runs: Path, policy=None, demo_dir: Path | None = None):
    """Create and launch the app on a free port (its own workspace and run store); yields its URL."""
    import ui

    demo = ui.create_app(workspace=workspace, device="cpu", runs_dir=runs, policy=policy, demo_dir=demo_dir)
    demo.queue(default_concurrency_limit=4)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **ui.launch_kwargs(workspace, runs_dir=runs))
    try:
        yield url
    finally:
        demo.close()
