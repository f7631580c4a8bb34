"""Evaluation (METHOD.md section 4): detectors that judge attack images; the metrics are `recare.metrics`.

`recare.eval.detectors` holds the detectors behind one interface (`Detector.detect(images) ->
list[DetectorResult]`, each recording its name, version and thresholds) and `make_detector(name,
**options)`. Importing this package loads no model and does not import torch.
"""

from recare.eval.detectors import (
    DETECTORS,
    ClipZeroShotDetector,
    Detector,
    DetectorResult,
    HFClassifierDetector,
    NudeNetDetector,
    OracleDetector,
    TorchvisionClassifierDetector,
    make_detector,
)

__all__ = [
    "DETECTORS", "ClipZeroShotDetector", "Detector", "DetectorResult", "HFClassifierDetector", "NudeNetDetector",
    "OracleDetector", "TorchvisionClassifierDetector", "make_detector",
]
