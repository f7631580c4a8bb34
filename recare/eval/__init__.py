"""Evaluation (METHOD.md section 4): detectors that judge attack images; the metrics are `recare.metrics`.

`recare.eval.detectors` holds the detectors behind one interface (`Detector.detect(images) ->
list[DetectorResult]`, each recording its name, version and thresholds) and `make_detector(name,
**options)`. `recare.eval.attacks` is the table of attacks and probes, `recare.eval.config` the
evaluation's settings, `recare.eval.run` the evaluation run (`evaluate`, the job target
`run_evaluation_job`; its parts: `plan`, `scoring`, `records`, `run_metrics`, `manifest`), `recare.eval.utility` the CLIP score over a prompt file. Importing this
package loads no model and does not import torch (those modules are imported by name).
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
