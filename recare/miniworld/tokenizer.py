"""The real CLIP BPE tokenizer, built offline from the vocabulary file open_clip ships.

OpenAI CLIP's tokenizer (and Stable Diffusion's) is a byte-level BPE with 49,408 tokens:
256 byte symbols, the same 256 with the end-of-word marker ``</w>``, 48,894 merges and the two
specials ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407). open_clip bundles the merge
list as ``bpe_simple_vocab_16e6.txt.gz``; this module rebuilds ``vocab.json`` and
``merges.txt`` from it exactly as ``clip/simple_tokenizer.py`` does, so no hub download is needed
and the ids match ``open_clip.tokenize`` and ``openai/clip-vit-base-patch32`` one for one.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from recare.errors import RecareError
from recare.atomic import atomic_write_text

CONTEXT_LENGTH = 77  # CLIP's text context (max_position_embeddings)
VOCAB_SIZE = 49408  # 256 bytes + 256 bytes</w> + 48,894 merges + 2 specials
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


class TokenizerBuildError(RecareError, RuntimeError):
    """Raised when the CLIP BPE vocabulary cannot be found or is malformed."""


def bpe_vocab_path() -> Path:
    """Path of the BPE merge file bundled with open_clip.

    Raises:
        TokenizerBuildError: open_clip is not installed or ships no vocabulary file.
    """
    import importlib.util

    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it (fast)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerBuildError(
            "open_clip is not installed; install open_clip_torch (see requirements.txt) to build "
            "the CLIP tokenizer offline."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise TokenizerBuildError(f"open_clip ships no BPE vocabulary at {path}; reinstall open_clip_torch.")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode table (same order as clip/simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab_and_merges(path: str | os.PathLike | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Rebuild CLIP's token -> id table and merge list from the bundled BPE file.

    Args:
        path: the ``bpe_simple_vocab_16e6.txt.gz`` file; default: the one open_clip ships.

    Returns:
        ``(vocab, merges)``: 49,408 tokens with their ids, and the 48,894 merges in rank order.
    """
    path = Path(path) if path is not None else bpe_vocab_path()
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_symbols = list(_bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    if len(tokens) != VOCAB_SIZE or any(len(m) != 2 for m in merges):
        raise TokenizerBuildError(f"{path} does not look like CLIP's BPE file ({len(tokens)} tokens, expected {VOCAB_SIZE}).")
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_vocab_files(out_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (the files of any HF CLIP tokenizer folder).

    Args:
        out_dir: folder to write into (created if missing); files are written atomically.
        path: the BPE file; default: the one open_clip ships.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(path)
    texts = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
    }
    for name, text in texts.items():
        atomic_write_text(out / name, text)
    return out / "vocab.json", out / "merges.txt"


def build_clip_tokenizer(out_dir: str | os.PathLike | None = None):
    """Build OpenAI CLIP's tokenizer as a ``transformers.CLIPTokenizer``, fully offline.

    Args:
        out_dir: if given, also ``save_pretrained`` the tokenizer there (plus vocab.json and
            merges.txt), so the folder loads with ``CLIPTokenizer.from_pretrained(out_dir)``.

    Returns:
        A ``CLIPTokenizer`` with 49,408 tokens, ``model_max_length`` 77, ids equal to open_clip's.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=CONTEXT_LENGTH)
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
        write_vocab_files(out_dir)
    return tokenizer
