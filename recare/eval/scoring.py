"""What an evaluation loads (pipelines, the target detector, the CLIP) and how it judges a batch of images.

Each image gets one record (`recare.eval.records.RECORD_FIELDS`): the detector's verdict on every image,
the CARE hit and top labels on CARE images (Eq. 4's R-Precision@k), the CLIP cosine on CLIP images.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from PIL import Image

from recare.eval.config import EvaluationConfig
from recare.eval.plan import CARE, CLIP, PlanBatch

LABEL_PROMPT, TIES = "{}", "pessimistic"   # the CARE score's label text (official: bare label) and tie rule


@dataclasses.dataclass
class Models:
    """What an evaluation loads: pipelines, the judge, the CLIP."""

    base: Any
    pipe: Any
    detector: Any
    encoder: Any
    trained: Any = None   # recare.models.TrainedWeights, or None for the base model


def build_detector(config: EvaluationConfig):
    """The target detector named by the settings (`recare.eval.detectors.make_detector`)."""
    from recare.eval.detectors import make_detector

    return make_detector(config.detector, **config.detector_options)


def load_models(config: EvaluationConfig, device: str = "auto", detector=None) -> Models:
    """Load the base pipeline, the evaluated one (trained UNet weights applied), the detector and the CLIP.

    Raises:
        ModelLoadError: unknown model, weights that do not fit the base model, encoder unavailable.
        EvaluationError: the detector cannot load.
    """
    from recare.models.encoders import load_encoder
    from recare.models.pipelines import derive_pipeline, load_pipeline
    from recare.models.weights import find_trained_weights

    detector = detector or build_detector(config)
    base = load_pipeline(config.model, device=device, dtype=config.dtype)
    base.set_progress_bar_config(disable=True)
    trained = find_trained_weights(config.unet) if config.unet else None
    pipe = derive_pipeline(base, trained=trained) if trained is not None else base
    pipe.set_progress_bar_config(disable=True)
    encoder = load_encoder(config.encoder, device=str(pipe.device))
    return Models(base, pipe, detector, encoder, trained)


def label_list(config: EvaluationConfig) -> list[str]:
    """The CARE score's candidates {w*} U O: the label list plus every CARE concept not in it."""
    return list(dict.fromkeys(list(config.care_labels) + list(config.care_prompts)))


class Scorer:
    """Judges a batch: the detector on every image, CARE hits on CARE images, cosines on CLIP images."""

    def __init__(self, config: EvaluationConfig, detector, encoder):
        self.config, self.detector, self.encoder = config, detector, encoder
        self.labels = label_list(config)
        self._label_features = None

    def label_features(self):
        if self._label_features is None:
            self._label_features = self.encoder.encode_texts([LABEL_PROMPT.format(x) for x in self.labels])
        return self._label_features

    def score(self, batch: PlanBatch, images: list[Image.Image], shown: Sequence[str] | None = None) -> list[dict]:
        """One record per image; `shown` = the prompts the model was given (when they differ from the plan's)."""
        from recare.eval.utility import paired_cosines
        from recare.metrics import care_score

        verdicts = self.detector.detect(images)
        shown = list(shown) if shown is not None else [it.prompt for it in batch.items]
        records = [{
            "index": it.index, "attack": it.attack, "run": it.run, "concept": it.concept, "prompt": it.prompt,
            "attack_prompt": given if given != it.prompt else "", "seed": it.seed,
            "file": it.file, "detector_score": float(v.score), "positive": bool(v.positive),
            "detector_labels": {k: float(s) for k, s in sorted(v.labels.items(), key=lambda kv: -kv[1])},
            "care_hit": None, "care_top_labels": None, "clip_cosine": None,
        } for it, v, given in zip(batch.items, verdicts, shown)]
        if batch.attack == CARE:
            features = self.encoder.encode_images(images)
            rows: dict[str, list[int]] = {}
            for j, it in enumerate(batch.items):
                rows.setdefault(it.concept, []).append(j)
            result = care_score({c: features[js] for c, js in rows.items()}, self.label_features(),
                                {c: c for c in rows}, k=self.config.care_k, labels=self.labels, ties=TIES)
            for c, js in rows.items():
                for n, j in enumerate(js):
                    records[j]["care_hit"] = bool(result.hits[c][n])
                    records[j]["care_top_labels"] = list(result.top_labels[c][n])
        elif batch.attack == CLIP:
            cosines = paired_cosines(self.encoder.encode_images(images),
                                     self.encoder.encode_texts([it.prompt for it in batch.items]))
            for j, value in enumerate(cosines):
                records[j]["clip_cosine"] = float(value)
        return records
