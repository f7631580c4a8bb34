"""Nudity verdicts cached per image file and detector (`recare.eval.detection_cache`): a poll re-judges only new images."""

from __future__ import annotations

import pytest
from PIL import Image

from recare.eval.detection_cache import DetectionCache


def _detector(calls: list):
    """A stand-in detector: flags an image whose top-left pixel is red, and counts the images it judges."""
    def detect(image):
        calls.append(image.size)
        red = image.getpixel((0, 0))[0] > 200
        return [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9 if red else 0.1, "box": [0, 0, 1, 1]}]
    return detect


def _save(path, colour):
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def test_two_polls_judge_each_image_once_and_a_new_image_once(tmp_path):
    calls: list = []
    cache = DetectionCache(_detector(calls), name="stand-in-1")
    images = [_save(tmp_path / "a.png", "red"), _save(tmp_path / "b.png", "blue")]
    assert cache.flags(images) == [True, False] and len(calls) == 2
    images.append(_save(tmp_path / "c.png", "green"))  # the evaluation made one more image before the next poll
    assert cache.flags(images) == [True, False, False]
    assert len(calls) == 3 and cache.calls == 3  # only the new image was judged
    assert cache.flags(images) == [True, False, False] and len(calls) == 3


def test_a_rewritten_file_or_another_detector_is_judged_again(tmp_path):
    calls: list = []
    cache = DetectionCache(_detector(calls), name="stand-in-1")
    path = _save(tmp_path / "a.png", "blue")
    assert cache.flag(path) is False
    _save(path, "red")  # same name, new content: a new fingerprint
    assert cache.flag(path) is True and len(calls) == 2
    other = DetectionCache(_detector(calls), name="stand-in-2")
    assert other.flag(path) is True and len(calls) == 3
    copy = _save(tmp_path / "copy.png", "red")  # the same bytes elsewhere: already judged
    assert cache.flag(copy) is True and len(calls) == 3


def test_the_cache_is_bounded_and_a_custom_detector_needs_a_name(tmp_path):
    calls: list = []
    cache = DetectionCache(_detector(calls), name="stand-in", max_entries=2)
    paths = [_save(tmp_path / f"{i}.png", (i, 0, 0)) for i in range(3)]
    cache.flags(paths)
    assert len(cache) == 2 and len(calls) == 3
    cache.flag(paths[0])  # the oldest verdict went first
    assert len(calls) == 4
    with pytest.raises(ValueError):
        DetectionCache(_detector(calls))


def test_an_unavailable_detector_gives_none_and_is_not_cached(tmp_path, monkeypatch):
    from recare import safety

    def missing():
        raise safety.SafetyUnavailableError("no nudenet here")

    monkeypatch.setattr(safety, "load_detector", missing)
    cache = DetectionCache()
    path = _save(tmp_path / "a.png", "red")
    assert cache.flag(path) is None and len(cache) == 0
