"""Image and text features, and the vocabulary-feature cache on disk.

An `Encoder` turns PIL images and strings into L2-normalised float32 feature rows. Two wrappers
cover every supported model: open_clip models (the official ViT-B/32, SigLIP) and transformers
`CLIPModel` folders (the bundled mini CLIP, or any local CLIP). Models are loaded by
`recare.models.load_encoder`; this module never reads weights itself.

The CARE-set needs the text feature of every vocabulary token (49,408 for the CLIP BPE); they are
computed once per encoder and cached as an fp16 `.npy`, keyed by the encoder's identity and a hash
of the vocabulary (METHOD.md section 2, step 1).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from recare.errors import ConfigError
from recare.limits import Limits, human_bytes
from recare.progress import CancelToken, ProgressCallback, check_cancel, emit
from recare.atomic import atomic_write_bytes, atomic_write_json
from recare.hashing import text_hash


class Encoder:
    """Image/text encoder: subclasses implement one batch of each; this class batches and normalises.

    Attributes:
        identity: a string naming the exact weights (cache key for vocabulary features).
        device: where the model runs.
    """

    def __init__(self, identity: str, device: torch.device | str = "cpu"):
        self.identity = identity
        self.device = torch.device(device)

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Features of `images`, shape (M, D), float32, each row L2-normalised.

        Args:
            images: PIL images (any mode; converted to RGB).
            batch_size: images per forward pass.
        """
        rgb = [im.convert("RGB") for im in images]
        return self._batched(rgb, self._image_batch, batch_size)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: ProgressCallback | None = None,
                     cancel: CancelToken | None = None, stage: str = "text features") -> np.ndarray:
        """Features of `texts`, shape (n, D), float32, each row L2-normalised.

        Args:
            texts: strings, encoded as they are (no prompt template).
            batch_size: strings per forward pass.
            progress: optional callback, called with a `recare.progress.ProgressEvent` after each
                batch (step = texts encoded).
            cancel: optional `recare.progress.CancelToken`, checked before each batch; when set,
                `recare.errors.Cancelled` is raised.
            stage: the events' stage name.
        """
        return self._batched(list(texts), self._text_batch, batch_size, progress, cancel, stage)

    def _batched(self, items: list, encode_batch, batch_size: int, progress: ProgressCallback | None = None,
                 cancel: CancelToken | None = None, stage: str = "encode") -> np.ndarray:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {batch_size}).")
        rows = []
        total = len(items)
        with torch.inference_mode():
            for start in range(0, total, batch_size):
                check_cancel(cancel, stage)
                features = encode_batch(items[start:start + batch_size]).float()
                rows.append(torch.nn.functional.normalize(features, dim=-1).cpu().numpy())
                done = min(start + batch_size, total)
                emit(progress, stage, done, total, f"{done:,} of {total:,}")
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(rows).astype(np.float32, copy=False)

    @functools.cached_property
    def dim(self) -> int:
        """Feature dimension D."""
        with torch.inference_mode():
            return int(self._text_batch(["a"]).shape[-1])

    def _image_batch(self, images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def _text_batch(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity!r}, device={self.device})"


class OpenClipEncoder(Encoder):
    """An open_clip model with its image preprocessing and tokenizer."""

    def __init__(self, model, preprocess, tokenizer, identity: str, device: torch.device | str = "cpu"):
        super().__init__(identity, device)
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer

    def _image_batch(self, images):
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        return self.model.encode_image(pixels)

    def _text_batch(self, texts):
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


class HFClipEncoder(Encoder):
    """A transformers `CLIPModel` with its `CLIPTokenizer` and `CLIPImageProcessor`."""

    def __init__(self, model, tokenizer, image_processor, identity: str, device: torch.device | str = "cpu"):
        super().__init__(identity, device)
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor

    def _image_batch(self, images):
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    def _text_batch(self, texts):
        max_len = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return _pooled(self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
        ))


def _pooled(output) -> torch.Tensor:
    """transformers < 5 returns the projected features; >= 5 returns an output whose pooler_output they are."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ---------------------------------------------------------------------------------------------
# vocabularies


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Candidate tokens for the CARE-set.

    Attributes:
        tokens: what is shown to the user and written to careset.json (e.g. "person").
        texts: what the encoder encodes, row for row (for the CLIP BPE: the same as tokens).
        source: where it came from ("clip-bpe", a file name, "words").
    """

    tokens: list[str]
    texts: list[str]
    source: str

    def __post_init__(self):
        if len(self.tokens) != len(self.texts):
            raise ValueError(f"Vocabulary: {len(self.tokens)} tokens but {len(self.texts)} texts.")

    def __len__(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def hash(self) -> str:
        """16 hex digits over the encoded texts and display tokens (the cache key's vocabulary half)."""
        return text_hash(json.dumps([self.texts, self.tokens], ensure_ascii=False), 16)

    @property
    def source_slug(self) -> str:
        """`source` made safe for a file name."""
        return re.sub(r"[^A-Za-z0-9_-]+", "_", self.source)[:32] or "vocab"


def clip_bpe_vocabulary() -> Vocabulary:
    """The 49,408-token CLIP BPE vocabulary bundled with open_clip, ordered by token id.

    Subword pieces are included (as in the official code); the end-of-word marker `</w>` is stripped
    for display, and the display text is what gets encoded.
    """
    from open_clip.tokenizer import SimpleTokenizer

    by_id = sorted(SimpleTokenizer().encoder.items(), key=lambda item: item[1])
    tokens = [token.replace("</w>", "") for token, _ in by_id]
    return Vocabulary(tokens=tokens, texts=list(tokens), source="clip-bpe")


def word_list_vocabulary(words: Sequence[str], source: str = "words", limits: Limits | None = None) -> Vocabulary:
    """A vocabulary from a list of words or phrases (blank entries and repeats dropped, order kept).

    Args:
        words: the words; each is shown and encoded as it is (stripped).
        source: a label for where the words came from (e.g. the file name).
        limits: entries and characters per entry (default `Limits.from_env()`).
    """
    limits = limits or Limits.from_env()
    seen: dict[str, None] = {}
    for word in words:
        word = word.strip()
        if word and word not in seen:
            if len(word) > limits.token_chars:
                raise ConfigError(limits.exceeded("token_chars", f"the word list {source!r} has an entry of "
                                                                 f"{len(word):,} characters"))
            seen[word] = None
            if len(seen) > limits.word_list_words:
                raise ConfigError(limits.exceeded("word_list_words", f"the word list {source!r} has more than "
                                                                     f"{limits.word_list_words:,} entries"))
    if not seen:
        raise ConfigError(f"the word list {source!r} is empty: give at least one word, one per line.")
    tokens = list(seen)
    return Vocabulary(tokens=tokens, texts=list(tokens), source=source)


def read_word_list(path: str | Path, limits: Limits | None = None) -> Vocabulary:
    """A vocabulary from a text file with one word or phrase per line (lines starting with # skipped).

    Args:
        path: the file (UTF-8, a byte-order mark is fine).
        limits: file size, entries and characters per entry (default `Limits.from_env()`); the
            size is checked before the file is read.
    """
    path = Path(path)
    limits = limits or Limits.from_env()
    try:
        size = path.stat().st_size
        if size > limits.word_list_bytes:
            raise ConfigError(limits.exceeded("word_list_bytes", f"the word list {path.name} is {human_bytes(size)}"))
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the word list {path.name}: {e}") from e
    return word_list_vocabulary([ln for ln in lines if not ln.lstrip().startswith("#")], source=path.name,
                                limits=limits)


def default_cache_dir() -> Path:
    """`$RECARE_CACHE` if set, else `~/.cache/recare/vocab`."""
    env = os.environ.get("RECARE_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/recare/vocab").expanduser()


def vocabulary_cache_path(encoder: Encoder, vocab: Vocabulary, cache_dir: str | Path | None = None) -> Path:
    """Where `vocabulary_features` keeps the features of `vocab` under `encoder`.

    Args:
        encoder: the encoder (its `identity` is half of the key).
        vocab: the vocabulary (its `hash` is the other half).
        cache_dir: folder; default `default_cache_dir()`.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", encoder.identity)[-60:].strip("_")
    identity_hash = text_hash(encoder.identity, 8)
    return folder / f"{readable}-{identity_hash}-{vocab.source_slug}-{vocab.hash}.npy"


def vocabulary_features(
    encoder: Encoder,
    vocab: Vocabulary,
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    limits: Limits | None = None,
) -> np.ndarray:
    """Text features of every vocabulary entry, shape (V, D), float16, rows L2-normalised; cached on disk.

    The first call encodes and writes `<cache>/<...>.npy` plus a JSON note beside it; later calls
    with the same encoder identity and vocabulary only read the file. Progress events have stage
    "vocabulary" (step = tokens encoded; one event with step = total on a cache hit).

    Args:
        encoder: the text encoder.
        vocab: the vocabulary to encode.
        cache_dir: cache folder; default `$RECARE_CACHE` or `~/.cache/recare/vocab`.
        batch_size: texts per forward pass.
        progress: optional callback, called with a `recare.progress.ProgressEvent` per batch (the
            CLI passes `recare.progress.TqdmProgress()`, the app a `gr.Progress` adapter).
        cancel: optional `recare.progress.CancelToken`, checked before each batch; when set,
            `recare.errors.Cancelled` is raised and nothing is cached.
        limits: `limits.vocab_cache_bytes` bounds the cache folder (default `Limits.from_env()`):
            after a write, the least recently used cache files go until the folder fits.
    """
    if isinstance(progress, bool):  # the old switch: a bar is now the caller's choice of callback
        raise TypeError("progress takes a callback now, not True/False: pass recare.progress.TqdmProgress() "
                        "for a tqdm bar, or None.")
    path = vocabulary_cache_path(encoder, vocab, cache_dir)
    if path.is_file():
        try:
            cached = np.load(path, allow_pickle=False)
            _touch(path)  # recently used: the size bound evicts the others first
            if cached.ndim == 2 and cached.shape[0] == len(vocab):
                emit(progress, "vocabulary", len(vocab), len(vocab), f"{len(vocab):,} tokens (cached)")
                return cached.astype(np.float16, copy=False)
        except (OSError, ValueError):
            pass  # unreadable cache file: recompute and overwrite it

    features = encoder.encode_texts(vocab.texts, batch_size=batch_size, progress=progress, cancel=cancel,
                                    stage="vocabulary")
    features = features.astype(np.float16)
    atomic_write_bytes(path, _npy_bytes(features))
    atomic_write_json(path.with_suffix(".json"), {
        "encoder": encoder.identity, "vocabulary": vocab.source, "vocabulary_hash": vocab.hash,
        "size": len(vocab), "dim": int(features.shape[1]), "dtype": "float16",
    })
    prune_vocabulary_cache(path.parent, (limits or Limits.from_env()).vocab_cache_bytes, keep=path)
    return features


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves hits
        pass


def prune_vocabulary_cache(folder: str | Path, max_bytes: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used cached vocabularies until `folder` holds at most `max_bytes`.

    Each entry is a `.npy` with its `.json` note; `keep` (the entry just written) is never deleted.

    Args:
        folder: the cache folder.
        max_bytes: the size to get under.
        keep: a `.npy` to keep whatever its age.

    Returns:
        The `.npy` files deleted.
    """
    entries = []
    for npy in Path(folder).glob("*.npy"):
        try:
            st = npy.stat()
            note = npy.with_suffix(".json")
            entries.append((st.st_mtime, npy, st.st_size + (note.stat().st_size if note.is_file() else 0)))
        except OSError:
            continue  # deleted meanwhile by another process
    total = sum(size for _, _, size in entries)
    removed = []
    for _, npy, size in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if keep is not None and npy == keep:
            continue
        npy.unlink(missing_ok=True)
        npy.with_suffix(".json").unlink(missing_ok=True)
        total -= size
        removed.append(npy)
    return removed


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
