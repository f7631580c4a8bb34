"""recare.hashing: the one place the project hashes files, folders, texts and weights."""

from __future__ import annotations

import hashlib

import torch

from recare import hashing


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path):
    data = bytes(range(256)) * 9000  # > 2 MiB: several blocks
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert hashing.file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_file_fingerprint_sees_both_ends_and_the_size(tmp_path):
    path = tmp_path / "w.bin"
    data = bytearray(3 << 20)
    path.write_bytes(data)
    first = hashing.file_fingerprint(path)
    data[-1] = 1
    path.write_bytes(data)
    last_changed = hashing.file_fingerprint(path)
    data[(3 << 20) // 2] = 7  # the middle is not read: the fingerprint is an id, not a checksum
    path.write_bytes(data)
    assert len({first, last_changed}) == 2 and hashing.file_fingerprint(path) == last_changed
    path.write_bytes(bytes(data) + b"\0")
    assert hashing.file_fingerprint(path) != last_changed


def test_folder_fingerprint_changes_with_names_and_contents(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(b"x" * 100)
    before = hashing.folder_fingerprint(tmp_path)
    (tmp_path / "sub" / "w.bin").write_bytes(b"y" * 100)
    changed = hashing.folder_fingerprint(tmp_path)
    (tmp_path / "sub" / "w.bin").rename(tmp_path / "sub" / "v.bin")
    assert len({before, changed, hashing.folder_fingerprint(tmp_path)}) == 3


def test_text_hash_and_tensor_hashes():
    assert hashing.text_hash("tench", 8) == hashlib.sha256(b"tench").hexdigest()[:8]
    assert hashing.text_hash("\ud800") == hashing.text_hash("?")  # a lone surrogate hashes, as "?"
    state = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4)}
    same_order = {"a": torch.ones(4), "b": torch.arange(6.0).reshape(2, 3)}
    assert hashing.tensors_sha256(state) == hashing.tensors_sha256(same_order)
    assert hashing.model_fingerprint(state) == hashing.model_fingerprint({k: v.half() for k, v in state.items()})
    moved = {**state, "a": torch.ones(4) * 2}
    assert hashing.tensors_sha256(moved) != hashing.tensors_sha256(state)
    assert hashing.model_fingerprint(moved) != hashing.model_fingerprint(state)
