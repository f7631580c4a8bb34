"""Utility: the CLIP score of a model over a prompt file (COCO captions, or the mini world's held-out captions).

The CLIP score is the mean cosine between each generated image and the caption it was generated
from (`recare.metrics.clip_score`; about 0.31 for SD v1.4 with CLIP ViT-B/32 on COCO, the scale of
Appendix M's range (0.25, 0.32)), not Hessel et al.'s 2.5 x max(cos, 0).

    prompts = read_prompt_file("coco_30k.csv", count=1000)      # or clip_prompts(config)
    score = clip_score_of_prompts(pipe, encoder, prompts, config)
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from recare.errors import EvaluationError

if TYPE_CHECKING:
    from recare.encoders import Encoder
    from recare.eval.config import EvaluationConfig

PROMPT_COLUMNS = ("prompt", "caption", "text")   # a CSV's prompt column, first match (COCO-30K: "prompt")


def read_prompt_file(path: str | Path, count: int | None = None) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or a CSV with a prompt column.

    Args:
        path: a .txt (or any text) file, or a .csv whose header has "prompt", "caption" or "text"
            (the official COCO-30K file: case_number,prompt,evaluation_seed).
        count: keep the first `count` prompts (None: all).

    Raises:
        EvaluationError: the file is missing, unreadable, has no prompt column, or holds no prompts.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise EvaluationError(f"cannot read the prompt file {path}: {e}") from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        header = [h.strip().lower() for h in (rows[0].keys() if rows else [])]
        column = next((c for c in PROMPT_COLUMNS if c in header), None)
        if rows and column is None:
            raise EvaluationError(f"{path.name} has no prompt column: its header must name one of {PROMPT_COLUMNS}.")
        prompts = [next(v for k, v in row.items() if k.strip().lower() == column).strip() for row in rows] if rows else []
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise EvaluationError(f"the prompt file {path} is empty: put one prompt per line (or a CSV with a prompt column).")
    return prompts[:count] if count is not None else prompts


def clip_prompts(config: EvaluationConfig) -> list[str]:
    """The CLIP-score prompts of an evaluation: `config.clip_prompts`, or the mini world's held-out captions.

    Args:
        config: resolved settings (clip_prompts, clip_count, model).

    Returns:
        The prompts ([] when there is no prompt file and the model is not the mini world: no CLIP score).
    """
    if config.clip_prompts is not None:
        return read_prompt_file(config.clip_prompts, config.clip_count)
    if config.model == "mini-world":
        from recare.miniworld.heldout import DEFAULT_CAPTIONS, heldout_captions

        return heldout_captions(config.clip_count or DEFAULT_CAPTIONS)
    return []


def paired_cosines(image_features, text_features) -> np.ndarray:
    """Cosine of image i with text i, per pair (their mean is `recare.metrics.clip_score`).

    Args:
        image_features: (n, D) features.
        text_features: (n, D) features, row i = the prompt of image i.
    """
    img = np.asarray(image_features, dtype=np.float64)
    txt = np.asarray(text_features, dtype=np.float64)
    if img.shape != txt.shape:
        raise EvaluationError(f"{img.shape[0]} images but {txt.shape[0]} prompts to pair them with.")
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    return np.sum(img * txt, axis=1)


def clip_score_of_prompts(pipe, encoder: Encoder, prompts: Sequence[str], config: EvaluationConfig) -> float:
    """Generate one image per prompt (prompt i from seed base_seed + i) and return their CLIP score.

    Args:
        pipe: the model.
        encoder: the CLIP (`recare.models.load_encoder`).
        prompts: the captions.
        config: steps, guidance, size, batch size, base seed.
    """
    from recare.eval.attacks import render
    from recare.metrics import clip_score

    if not prompts:
        raise EvaluationError("no prompts to compute a CLIP score over.")
    images = []
    for start in range(0, len(prompts), config.batch_size):
        chunk = list(prompts[start:start + config.batch_size])
        images.extend(render(pipe, chunk, [config.base_seed + start + i for i in range(len(chunk))], config))
    return clip_score(encoder.encode_images(images), encoder.encode_texts(list(prompts)))


__all__ = ["read_prompt_file", "clip_prompts", "paired_cosines", "clip_score_of_prompts", "PROMPT_COLUMNS"]
