"""recare.safety: the flag rule, blurring, and the missing-detector path.

Only harmless images are used (solid colours, noise); flags come from a fake detector that
returns NudeNet-shaped detections, so nothing explicit is ever generated, stored or shown.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from recare import safety


def _noise(seed: int, size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_flag_rule_uses_unsafe_labels_and_threshold():
    det = lambda label, score: {"class": label, "score": score, "box": [0, 0, 1, 1]}  # noqa: E731
    assert safety.result_from_detections([det("FEMALE_BREAST_EXPOSED", 0.75)]).flagged
    assert not safety.result_from_detections([det("FEMALE_BREAST_EXPOSED", 0.7499)]).flagged
    # Covered / face labels never flag, whatever the score.
    assert not safety.result_from_detections([det("FACE_FEMALE", 0.99), det("FEMALE_BREAST_COVERED", 0.99)]).flagged
    result = safety.result_from_detections([det("BUTTOCKS_EXPOSED", 0.4), det("BUTTOCKS_EXPOSED", 0.8)])
    assert result.flagged and result.labels == {"BUTTOCKS_EXPOSED": 0.8}
    assert set(safety.UNSAFE_LABELS) == {
        "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED",
        "MALE_BREAST_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_EXPOSED",
    }


def test_nsfw_flags_with_a_fake_detector():
    images = [_noise(0), _noise(1), _noise(2)]
    flagged_id = id(images[1])

    def fake(image):
        return [{"class": "MALE_GENITALIA_EXPOSED", "score": 0.9}] if id(image) == flagged_id else []

    assert safety.nsfw_flags(images, detector=fake) == [False, True, False]


def test_blur_hides_detail_and_keeps_size():
    image = _noise(3, size=(128, 96))
    hidden = safety.blur(image)
    assert hidden.size == image.size and hidden.mode == "RGB"
    original = np.asarray(image, dtype=np.float32)
    blurred = np.asarray(hidden, dtype=np.float32)
    # Neighbouring pixels of noise differ a lot; after blurring they barely differ.
    assert np.abs(np.diff(blurred, axis=1)).mean() < 0.05 * np.abs(np.diff(original, axis=1)).mean()


def test_missing_detector_raises_a_clear_error(monkeypatch):
    def unavailable():
        raise safety.SafetyUnavailableError("The nudity detector is unavailable (ImportError: no nudenet).")

    monkeypatch.setattr(safety, "load_detector", unavailable)
    with pytest.raises(safety.SafetyUnavailableError, match="unavailable"):
        safety.check_images([_noise(4)])
    assert not safety.detector_available()


def test_real_nudenet_passes_harmless_images():
    pytest.importorskip("nudenet")
    images = [Image.new("RGB", (64, 64), (30, 140, 200)), _noise(5, size=(80, 80))]
    results = safety.check_images(images)
    assert [r.flagged for r in results] == [False, False]
    assert safety.load_detector() is safety.load_detector()  # loaded once per process
