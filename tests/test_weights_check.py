"""recare.weights_check: a weights file is judged by what it says about itself, before anything is inflated."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from recare.errors import ModelLoadError
from recare.limits import Limits
from recare.weights_check import inspect_weights_file
from tests.helpers_hostile import deflated_torch_file, safetensors_with

SHAPES = {"conv_in.weight": (4, 4, 3, 3), "conv_in.bias": (4,)}


def test_honest_files_pass(tmp_path):
    tensors = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    save_file(tensors, tmp_path / "trained_params.safetensors", metadata={"base_model": "mini-world"})
    torch.save(tensors, tmp_path / "ReCARE-Diffusers-UNet.pt")
    inspect_weights_file(tmp_path / "trained_params.safetensors", SHAPES)
    inspect_weights_file(tmp_path / "ReCARE-Diffusers-UNet.pt", SHAPES)


def test_a_compressed_torch_member_is_refused_unread(tmp_path):
    bomb = deflated_torch_file(tmp_path / "ReCARE-Diffusers-UNet.pt", mib=64)
    assert bomb.stat().st_size < 1 << 20  # 64 MiB of zeros in well under 1 MiB
    with pytest.raises(ModelLoadError, match="is compressed, which torch.save never writes"):
        inspect_weights_file(bomb, SHAPES)


def test_safetensors_headers_are_bounded_and_checked_against_the_base(tmp_path):
    def entry(shape, begin, end, dtype="F32"):
        return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}

    cases = {
        "lists 3 tensors and the base UNet has 2": {f"conv_in.{i}": entry([0], 0, 0) for i in range(3)},
        "its tensor 'other.weight' is not in the base UNet": {"other.weight": entry([1], 0, 4)},
        r"tensor 'conv_in.bias' has shape \[5\] in the checkpoint but \[4\]": {"conv_in.bias": entry([5], 0, 20)},
        "lies outside the file": {"conv_in.bias": entry([4], 0, 8)},
        "is malformed": {"conv_in.bias": entry([4], 0, 16, dtype="F128")},
    }
    for i, (expected, header) in enumerate(cases.items()):
        path = safetensors_with(tmp_path / f"{i}.safetensors", header)
        if expected == "lies outside the file":
            path.write_bytes(path.read_bytes()[:-8])
        with pytest.raises(ModelLoadError, match=expected):
            inspect_weights_file(path, SHAPES)
    big = safetensors_with(tmp_path / "big.safetensors", {"conv_in.bias": entry([4], 0, 16)}, header_pad=2 << 20)
    with pytest.raises(ModelLoadError, match="RECARE_MAX_CHECKPOINT_HEADER_BYTES"):
        inspect_weights_file(big, SHAPES, Limits(checkpoint_header_bytes=1 << 20))
    liar = tmp_path / "liar.safetensors"
    liar.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelLoadError, match="damaged or incomplete: its header claims to be longer than the file"):
        inspect_weights_file(liar, SHAPES)
