"""Image-classifier detectors, top-k: the target class among a classifier's k best (the paper: ResNet-50
top-3 for objects, a WikiArt ViT top-3 for styles). Weights come from a local file, the torch hub cache
or a local transformers folder; nothing is downloaded here.
"""

from __future__ import annotations

import abc
import difflib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from recare.errors import EvaluationError
from recare.eval.detector_api import DEFAULT_TOP_K, Detector, DetectorResult
from recare.hashing import file_fingerprint
from recare.versions import package_version


def _resolve_targets(targets, categories: Sequence[str]) -> list[int]:
    """Target class names (case-insensitive) or indices -> indices into `categories`."""
    items = [targets] if isinstance(targets, (str, int, np.integer)) else list(targets)
    if not items:
        raise EvaluationError("name at least one target class for the classifier detector.")
    lower = [c.lower() for c in categories]
    out = []
    for item in items:
        if isinstance(item, str):
            if item.lower() not in lower:
                near = difflib.get_close_matches(item.lower(), lower, n=5)
                raise EvaluationError(f"the classifier has no class {item!r}"
                                      + (f"; close: {[categories[lower.index(n)] for n in near]}" if near else "")
                                      + f" ({len(categories)} classes).")
            out.append(lower.index(item.lower()))
        else:
            if not 0 <= int(item) < len(categories):
                raise EvaluationError(f"class index {item} out of range for {len(categories)} classes.")
            out.append(int(item))
    return list(dict.fromkeys(out))


class ClassifierTopKDetector(Detector):
    """Positive when any target class is among the classifier's top-k classes (the paper: top 3).

    `score` is the highest target-class probability; `labels` the top-k classes and probabilities.
    Subclasses give `categories` and `_probabilities(images) -> (n, C)`.
    """

    def __init__(self, categories: Sequence[str], targets, top_k: int = DEFAULT_TOP_K, batch_size: int = 32):
        if not 1 <= int(top_k) <= len(categories):
            raise EvaluationError(f"top_k must be in [1, {len(categories)}]; got {top_k}.")
        if int(batch_size) < 1:
            raise EvaluationError(f"batch_size must be at least 1; got {batch_size}.")
        self.categories = list(categories)
        self.target_indices = _resolve_targets(targets, self.categories)
        self.top_k, self.batch_size = int(top_k), int(batch_size)

    @property
    def targets(self) -> list[str]:
        return [self.categories[i] for i in self.target_indices]

    @property
    def settings(self) -> dict[str, Any]:
        return {"targets": self.targets, "target_indices": self.target_indices, "top_k": self.top_k}

    @abc.abstractmethod
    def _probabilities(self, images: list[Image.Image]) -> np.ndarray:
        """(n, C) class probabilities."""

    def _detect(self, images):
        probs = np.concatenate([self._probabilities(images[i:i + self.batch_size])
                                for i in range(0, len(images), self.batch_size)])
        results = []
        for p in probs:
            top = np.argsort(-p, kind="stable")[:self.top_k]  # ties: the lower class index first
            results.append(DetectorResult(
                positive=bool(set(top.tolist()) & set(self.target_indices)),
                score=float(max(p[i] for i in self.target_indices)),
                labels={self.categories[i]: float(p[i]) for i in top},
            ))
        return results


_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TorchvisionClassifierDetector(ClassifierTopKDetector):
    """A torchvision classifier (default: ResNet-50, ImageNet weights IMAGENET1K_V2, as the official
    `metrics/object_asr_eval.py`'s `ResNet50_Weights.DEFAULT`), read from a local file only."""

    name = "torchvision-classifier"

    def __init__(self, targets=("tench",), weights_path: str | os.PathLike | None = None, arch: str = "resnet50",
                 weights_name: str | None = "IMAGENET1K_V2", categories: Sequence[str] | None = None,
                 top_k: int = DEFAULT_TOP_K, image_size: int = 224, batch_size: int = 32, device: str = "cpu"):
        """
        Args:
            targets: target class names (case-insensitive, e.g. "tench") or indices (tench = 0).
            weights_path: the state-dict file (.pth/.pt or .safetensors); None = the torch hub cache's
                file for `weights_name` (`$TORCH_HOME/hub/checkpoints/resnet50-11ad3fa6.pth`).
            arch: a torchvision model name (`torchvision.models.get_model`).
            weights_name: a torchvision weights enum member of `arch` (its categories and preprocessing
                are used); None for your own classifier (then give `categories`).
            categories: class names in output order; default the weights enum's.
            top_k: a target among the top k is positive.
            image_size: input side when `weights_name` is None (resize, ImageNet normalisation).
            batch_size: images per forward pass.
            device: torch device.

        Raises:
            EvaluationError: the weights file is missing (says where to put it), does not fit the
                architecture, or a target is not a class.
        """
        import torch
        import torchvision
        from torchvision import transforms as T

        enum = None
        if weights_name is not None:
            try:
                enum = torchvision.models.get_model_weights(arch)[weights_name]
            except (KeyError, ValueError) as e:
                raise EvaluationError(f"torchvision has no weights {weights_name!r} for {arch!r}: {e}") from e
            categories = list(categories) if categories is not None else list(enum.meta["categories"])
            self._preprocess = enum.transforms()
        else:
            if not categories:
                raise EvaluationError("a classifier without a torchvision weights name needs its categories.")
            self._preprocess = T.Compose([T.Resize((image_size, image_size)), T.ToTensor(),
                                          T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)])
        super().__init__(categories, targets, top_k, batch_size)
        if weights_path is None:
            if enum is None:
                raise EvaluationError("give weights_path for a classifier without a torchvision weights name.")
            weights_path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
        path = Path(weights_path).expanduser()
        if not path.is_file():
            how = (f" Evaluation never downloads: on a machine with network run `python -c \"import torchvision; "
                   f"torchvision.models.get_model('{arch}', weights='{weights_name}')\"` (it saves the file to "
                   f"{Path(torch.hub.get_dir()) / 'checkpoints'}) or fetch {enum.url}, then copy it to {path} "
                   "or pass weights_path=FILE." if enum is not None else " Pass weights_path=FILE of a saved state dict.")
            raise EvaluationError(f"no classifier weights at {path}.{how}")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            model = torchvision.models.get_model(arch, weights=None, num_classes=len(self.categories))
            model.load_state_dict(state)
        except Exception as e:  # unreadable file or a state dict of another architecture / class count
            raise EvaluationError(f"the weights at {path} do not load into {arch} with {len(self.categories)} "
                                  f"classes: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
        self.model = model.to(device).eval()
        self.arch, self.weights_name, self.weights_path, self.device = arch, weights_name, path, torch.device(device)
        self._version = (f"torchvision {package_version('torchvision')}; {arch} {weights_name or 'custom'}; "
                         f"{path.name} {file_fingerprint(path)}")

    @property
    def version(self) -> str:
        return self._version

    @property
    def settings(self) -> dict[str, Any]:
        return {**super().settings, "arch": self.arch, "weights": self.weights_name, "weights_file": str(self.weights_path)}

    def _probabilities(self, images):
        import torch

        with torch.inference_mode():
            x = torch.stack([self._preprocess(im) for im in images]).to(self.device)
            return self.model(x).float().softmax(dim=1).cpu().numpy()


class HFClassifierDetector(ClassifierTopKDetector):
    """A local transformers image-classification folder (e.g. the paper's WikiArt style ViT), top-k.

    Probabilities are the softmax of the logits, as transformers' image-classification pipeline
    gives for a single-label model (the official `metrics/style_asr_eval.py` uses that pipeline).
    """

    name = "hf-classifier"

    def __init__(self, folder: str | os.PathLike, targets, top_k: int = DEFAULT_TOP_K, batch_size: int = 32,
                 device: str = "cpu"):
        """
        Args:
            folder: a folder saved with `save_pretrained` (model config with id2label, weights,
                image processor config).
            targets: class names (the config's id2label, case-insensitive; e.g. "vincent-van-gogh") or indices.
            top_k: a target among the top k is positive (paper: 3).
            batch_size: images per forward pass.
            device: torch device.

        Raises:
            EvaluationError: the folder is missing or not an image classifier, or a target is not a class.
        """
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        path = Path(folder).expanduser()
        if not (path / "config.json").is_file():
            raise EvaluationError(f"no image classifier at {path} (needs config.json, the weights and "
                                  "preprocessor_config.json, as written by save_pretrained).")
        try:
            model = AutoModelForImageClassification.from_pretrained(path, local_files_only=True)
            processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise EvaluationError(f"could not load an image classifier from {path}: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
        id2label = model.config.id2label
        super().__init__([str(id2label[i]) for i in range(len(id2label))], targets, top_k, batch_size)
        self.model, self.processor, self.folder = model.to(device).eval(), processor, path
        self.device = torch.device(device)
        from recare.hashing import folder_fingerprint

        self._version = f"transformers {package_version('transformers')}; {path.name} {folder_fingerprint(path)}"

    @property
    def version(self) -> str:
        return self._version

    @property
    def settings(self) -> dict[str, Any]:
        return {**super().settings, "folder": str(self.folder)}

    def _probabilities(self, images):
        import torch

        with torch.inference_mode():
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
            logits = self.model(pixel_values=pixels).logits.float()
            if getattr(self.model.config, "problem_type", None) == "multi_label_classification":
                return torch.sigmoid(logits).cpu().numpy()
            return logits.softmax(dim=1).cpu().numpy()
