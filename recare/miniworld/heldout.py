"""The mini world's held-out caption set and its own CLIP-score range (utility axis of RATIO).

The paper measures utility as the CLIP score on COCO captions and maps it to [0, 1] with the range
(0.25, 0.32) (Appendix M). Neither COCO nor that range means anything for a 64x64 world seen by a
small CLIP, so the mini world brings both:

- **Held-out captions**: `heldout_captions(n)` renders `n` scenes with `world.sample_dataset` from
  `HELDOUT_SEED`, a seed no training stage uses (the generator renders from 1000 + seed, the
  oracle from seed * 1000 + 1 and + 999, the mini CLIP's zero-shot check from 777), and returns
  their captions. They are generated at evaluation time, deterministically; no file is stored.
- **CLIP range**: `measure_clip_range(encoder)` scores the same held-out renders with the mini CLIP:
  the *ceiling* is the mean cosine of each real render with its own caption (what a perfect
  generator would reach), the *floor* the mean cosine of every render with every other render's
  caption (what an image unrelated to its prompt scores). Both are `recare.metrics.clip_score`
  values (mean cosine), so a model's CLIP score maps into them exactly as SD's does into
  (0.25, 0.32). `python -m recare.miniworld.heldout` prints the numbers recorded in recare.json.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

import numpy as np

from recare.miniworld import world

if TYPE_CHECKING:
    from recare.encoders import Encoder

HELDOUT_SEED = 20_251_124     # held-out renders and captions; distinct from every training seed
DEFAULT_CAPTIONS = 64         # captions an evaluation scores by default (the paper: COCO-30K)
RANGE_RENDERS = 512           # renders the CLIP range is measured on
RANGE_METHOD = ("floor = mean cosine of each held-out render with every other render's caption; ceiling = mean "
                "cosine of each held-out render with its own caption; renders and captions from "
                "world.sample_dataset(n, seed); the mini CLIP's features (recare.models.load_encoder('mini-world'))")


def heldout_renders(n: int = RANGE_RENDERS, seed: int = HELDOUT_SEED) -> tuple[np.ndarray, list[str]]:
    """Held-out real renders and their captions (never seen in training).

    Args:
        n: how many.
        seed: the world seed (default `HELDOUT_SEED`).

    Returns:
        (uint8 images (n, 64, 64, 3), captions).
    """
    images, captions, _ = world.sample_dataset(n, seed)
    return images, captions


def heldout_captions(n: int = DEFAULT_CAPTIONS, seed: int = HELDOUT_SEED) -> list[str]:
    """The first `n` held-out captions: the mini world's prompt set for the CLIP score.

    Caption i is the caption of held-out render i, so the set is a prefix of `heldout_renders`.

    Args:
        n: how many captions.
        seed: the world seed (default `HELDOUT_SEED`).
    """
    return heldout_renders(n, seed)[1]


def measure_clip_range(encoder: Encoder, n: int = RANGE_RENDERS, seed: int = HELDOUT_SEED) -> dict[str, Any]:
    """Measure the mini world's CLIP-score range (floor, ceiling) on held-out renders.

    Args:
        encoder: the CLIP the evaluation uses (the mini CLIP: `recare.models.load_encoder("mini-world")`).
        n: renders (at least 2).
        seed: the world seed.

    Returns:
        {"floor", "ceiling", "n", "seed", "encoder", "method"}; floor and ceiling are mean cosines.
    """
    if n < 2:
        raise ValueError("the CLIP range needs at least 2 renders (the floor pairs each with another's caption).")
    from PIL import Image

    images, captions = heldout_renders(n, seed)
    image_features = encoder.encode_images([Image.fromarray(im) for im in images]).astype(np.float64)
    text_features = encoder.encode_texts(captions).astype(np.float64)
    cosines = image_features @ text_features.T   # unit rows: cosine of render i with caption j
    ceiling = float(np.mean(np.diag(cosines)))
    floor = float((cosines.sum() - np.trace(cosines)) / (n * (n - 1)))
    return {"floor": round(floor, 4), "ceiling": round(ceiling, 4), "n": n, "seed": seed,
            "encoder": encoder.identity, "method": RANGE_METHOD}


def main(argv: list[str] | None = None) -> int:
    """`python -m recare.miniworld.heldout [--n 512]`: print the measured range as JSON."""
    from recare.models.encoders import load_encoder
    from recare.runtime import set_process_defaults

    set_process_defaults()
    parser = argparse.ArgumentParser(description="Measure the mini world's CLIP-score range for RATIO.")
    parser.add_argument("--n", type=int, default=RANGE_RENDERS, help=f"held-out renders (default {RANGE_RENDERS})")
    parser.add_argument("--seed", type=int, default=HELDOUT_SEED, help=f"world seed (default {HELDOUT_SEED})")
    args = parser.parse_args(argv)
    print(json.dumps(measure_clip_range(load_encoder("mini-world", device="cpu"), args.n, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
