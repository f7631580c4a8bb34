"""Encoders (transformers CLIP folder, open_clip model), vocabularies, and the on-disk feature cache."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from recare.encoders import (
    Encoder,
    OpenClipEncoder,
    Vocabulary,
    clip_bpe_vocabulary,
    read_word_list,
    vocabulary_cache_path,
    vocabulary_features,
    word_list_vocabulary,
)
from recare.errors import Cancelled
from recare.models import load_encoder
from recare.progress import CancelToken
from tests.helpers_tiny import make_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def _images(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


def _assert_unit_rows(features):
    assert features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)


class CountingEncoder(Encoder):
    """A cheap deterministic text encoder that counts its forward passes."""

    def __init__(self, identity="counting-encoder", dim=8):
        super().__init__(identity)
        self.calls = 0
        self._dim = dim

    def _text_batch(self, texts):
        self.calls += 1
        rows = [np.random.default_rng(zlib.crc32(t.encode())).normal(size=self._dim) for t in texts]
        return torch.tensor(np.stack(rows), dtype=torch.float32)


def test_hf_clip_folder_encodes_normalised_features(tiny_clip_dir):
    encoder = load_encoder(tiny_clip_dir, device="cpu")
    images = _images(5)
    img = encoder.encode_images(images, batch_size=2)
    txt = encoder.encode_texts(["a photo of a tench", "person", "stars"], batch_size=2)
    assert img.shape == (5, 16) and txt.shape == (3, 16)
    _assert_unit_rows(img)
    _assert_unit_rows(txt)
    np.testing.assert_allclose(img, encoder.encode_images(images, batch_size=5), atol=1e-5)
    np.testing.assert_allclose(txt[1], encoder.encode_texts(["person"])[0], atol=1e-5)
    assert not np.allclose(txt[0], txt[1])
    assert encoder.encode_texts([]).shape == (0, 16)


def test_hf_clip_identity_tracks_weights(tiny_clip_dir, tmp_path):
    a = load_encoder(tiny_clip_dir, device="cpu").identity
    assert a == load_encoder(str(tiny_clip_dir), device="cpu").identity
    other = make_tiny_clip(tmp_path / "other", seed=1)
    assert load_encoder(other, device="cpu").identity.split(":")[-1] != a.split(":")[-1]


def test_open_clip_wrapper_with_a_tiny_model():
    import open_clip
    from open_clip.model import CLIP

    torch.manual_seed(0)
    model = CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    ).eval()
    preprocess = open_clip.image_transform(32, is_train=False)
    encoder = OpenClipEncoder(model, preprocess, open_clip.get_tokenizer("ViT-B-32"), identity="open_clip:tiny/test")
    img = encoder.encode_images(_images(3), batch_size=2)
    txt = encoder.encode_texts(["person", "stars"])
    assert img.shape == (3, 16) and txt.shape == (2, 16)
    _assert_unit_rows(img)
    _assert_unit_rows(txt)


def test_clip_bpe_vocabulary():
    vocab = clip_bpe_vocabulary()
    assert len(vocab) == 49408 and vocab.source == "clip-bpe"
    assert vocab.texts == vocab.tokens
    assert not any("</w>" in t for t in vocab.tokens)
    assert vocab.tokens[0] == "!" and vocab.tokens[-2:] == ["<start_of_text>", "<end_of_text>"]
    assert "person" in vocab.tokens and "freshwater" in vocab.tokens
    assert vocab.hash == clip_bpe_vocabulary().hash and len(vocab.hash) == 16


def test_word_lists(tmp_path):
    vocab = word_list_vocabulary([" person ", "stars", "", "person", "fresh water"])
    assert vocab.tokens == ["person", "stars", "fresh water"]
    assert vocab.hash != word_list_vocabulary(["person", "stars"]).hash
    with pytest.raises(ValueError, match="empty"):
        word_list_vocabulary(["", "  "])
    path = tmp_path / "words.txt"
    path.write_text("# my words\nperson\nstars\n\n")
    from_file = read_word_list(path)
    assert from_file.tokens == ["person", "stars"] and from_file.source == "words.txt"
    with pytest.raises(ValueError, match="tokens but"):
        Vocabulary(tokens=["a"], texts=[], source="x")


def test_vocabulary_features_cached_on_disk(tmp_path):
    vocab = word_list_vocabulary([f"word{i}" for i in range(10)])
    encoder = CountingEncoder()
    seen = []
    first = vocabulary_features(encoder, vocab, cache_dir=tmp_path, batch_size=4, progress=seen.append)
    assert first.dtype == np.float16 and first.shape == (10, 8)
    np.testing.assert_allclose(np.linalg.norm(first.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert encoder.calls == 3
    assert [(e.stage, e.step, e.total) for e in seen] == [("vocabulary", 4, 10), ("vocabulary", 8, 10), ("vocabulary", 10, 10)]
    path = vocabulary_cache_path(encoder, vocab, tmp_path)
    assert path.is_file() and path.with_suffix(".json").is_file()

    hit = []
    second = vocabulary_features(encoder, vocab, cache_dir=tmp_path, progress=hit.append)
    assert encoder.calls == 3, "a cache hit must not run the encoder again"
    assert np.array_equal(first, second)
    assert [(e.step, e.total) for e in hit] == [(10, 10)] and "cached" in hit[0].message

    vocabulary_features(CountingEncoder(identity="another-encoder"), vocab, cache_dir=tmp_path)
    vocabulary_features(encoder, word_list_vocabulary(["other"]), cache_dir=tmp_path)
    assert encoder.calls == 4
    assert len(list(tmp_path.glob("*.npy"))) == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_vocabulary_cache_default_dir_and_corrupt_file(tmp_path, monkeypatch):
    monkeypatch.setenv("RECARE_CACHE", str(tmp_path / "env-cache"))
    vocab = word_list_vocabulary(["a", "b"])
    encoder = CountingEncoder()
    path = vocabulary_cache_path(encoder, vocab)
    assert path.parent == tmp_path / "env-cache"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    features = vocabulary_features(encoder, vocab)
    assert encoder.calls == 1 and features.shape == (2, 8)
    assert np.array_equal(np.load(path), features)


def test_vocabulary_features_cancel_stops_between_batches_and_caches_nothing(tmp_path):
    vocab = word_list_vocabulary([f"word{i}" for i in range(10)])
    encoder = CountingEncoder()
    cancel = CancelToken()
    with pytest.raises(Cancelled, match="vocabulary was cancelled"):
        vocabulary_features(encoder, vocab, cache_dir=tmp_path, batch_size=4, cancel=cancel,
                            progress=lambda event: cancel.cancel())  # cancel after the first batch
    assert encoder.calls == 1
    assert not vocabulary_cache_path(encoder, vocab, tmp_path).exists()
    with pytest.raises(TypeError, match="TqdmProgress"):  # the old `progress=True` switch says what to use
        vocabulary_features(encoder, vocab, cache_dir=tmp_path, progress=True)


def test_vocabulary_features_with_tiny_clip(tiny_clip_dir, tmp_path):
    encoder = load_encoder(tiny_clip_dir, device="cpu")
    vocab = word_list_vocabulary(["person", "stars", "freshwater"])
    features = vocabulary_features(encoder, vocab, cache_dir=tmp_path)
    np.testing.assert_allclose(features.astype(np.float32), encoder.encode_texts(vocab.texts), atol=2e-3)
