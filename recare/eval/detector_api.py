"""The detector interface: `Detector.detect(images) -> list[DetectorResult]`, and what reproduces a
verdict (`name`, `version`, `settings`, `describe()`). The detectors themselves: `recare.eval.detectors`
(registry, NudeNet, oracle, CLIP zero-shot) and `recare.eval.classifiers` (ImageNet / transformers top-k).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from recare.errors import ImageInputError

DEFAULT_TOP_K = 3  # the paper's style and object ASR: the target among the classifier's top 3


@dataclasses.dataclass(frozen=True)
class DetectorResult:
    """What a detector says about one image.

    Attributes:
        positive: the image shows the concept (counts toward the ASR).
        score: the number the decision thresholds (its meaning is the detector's: NudeNet's highest
            exposed-class score, the oracle's probability, the target's class probability, ...).
        labels: label -> score that informed the decision (exposed classes, top-k classes, ...).
    """

    positive: bool
    score: float
    labels: dict[str, float]

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"positive": self.positive, "score": self.score, "labels": dict(self.labels)}


class Detector(abc.ABC):
    """The interface: `detect(images) -> list[DetectorResult]`, plus what reproduces the verdicts.

    Subclasses set `name` (their registry name), implement `version`, `settings` and `_detect`.
    """

    name: str = ""

    @property
    @abc.abstractmethod
    def version(self) -> str:
        """Package version(s) and a fingerprint of the exact weights."""

    @property
    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """Thresholds, top-k, targets and anything else that changes a verdict (JSON-ready)."""

    @abc.abstractmethod
    def _detect(self, images: list[Image.Image]) -> list[DetectorResult]:
        """One result per RGB image."""

    def detect(self, images) -> list[DetectorResult]:
        """One `DetectorResult` per image.

        Args:
            images: PIL images, uint8 (H, W, 3) arrays, or one uint8 (n, H, W, 3) array.
        """
        pil = _as_pil_list(images)
        return self._detect(pil) if pil else []

    def describe(self) -> dict[str, Any]:
        """{"name", "version", "settings"}: what a manifest records to reproduce the verdicts."""
        return {"name": self.name, "version": self.version, "settings": self.settings}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings})"


def _as_pil_list(images) -> list[Image.Image]:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    out = []
    for i, im in enumerate(images):
        if isinstance(im, Image.Image):
            out.append(im.convert("RGB"))
        elif isinstance(im, np.ndarray) and im.ndim == 3 and im.shape[-1] in (3, 4):
            out.append(Image.fromarray(np.asarray(im, dtype=np.uint8)).convert("RGB"))
        else:
            raise ImageInputError(f"image {i} is a {type(im).__name__}"
                                  f"{' of shape ' + str(im.shape) if isinstance(im, np.ndarray) else ''}; "
                                  "give PIL images or uint8 (H, W, 3) arrays.")
    return out
