"""Blur-by-default in the app, with harmless images and a monkeypatched detector result."""

from __future__ import annotations

import numpy as np
from gradio_client import Client, handle_file
from PIL import Image

from recare import safety


def _images(tmp_path):
    paths = []
    for name, colour in (("red", (230, 20, 20)), ("blue", (20, 40, 230))):
        path = tmp_path / f"{name}.png"
        rng = np.random.default_rng(len(paths))
        noisy = np.clip(np.array(colour) + rng.integers(-20, 20, (48, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(path)
        paths.append(path)
    return paths


def _red_is_flagged(image):
    """Fake NudeNet: 'detects' an exposed label on reddish images only (harmless stand-in)."""
    r, _, b = np.asarray(image.convert("RGB"), dtype=np.float32).mean(axis=(0, 1))
    return [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.93, "box": [0, 0, 4, 4]}] if r > b else []


def _sharpness(path) -> float:
    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return float(np.abs(np.diff(a, axis=1)).mean())


def test_flagged_images_are_blurred_until_revealed(app_url, tmp_path, monkeypatch):
    monkeypatch.setattr(safety, "load_detector", lambda: _red_is_flagged)
    client = Client(app_url["url"], verbose=False, download_files=str(tmp_path / "dl"))
    red, blue = _images(tmp_path)
    gallery, status = client.predict([handle_file(str(red)), handle_file(str(blue))], api_name="/upload_images")
    assert "1 flagged by NudeNet" in status and "1 shown blurred" in status
    assert "hidden: flagged by NudeNet" in gallery[0]["caption"]
    assert "hidden" not in gallery[1]["caption"]
    # What the browser receives for the flagged image is the blurred copy, not the original.
    assert _sharpness(gallery[0]["image"]) < 0.3 * _sharpness(red)
    assert _sharpness(gallery[1]["image"]) > 0.8 * _sharpness(blue)

    gallery, _ = client.predict(0, api_name="/toggle_reveal")
    assert "revealed" in gallery[0]["caption"] and _sharpness(gallery[0]["image"]) > 0.8 * _sharpness(red)
    gallery, _ = client.predict(0, api_name="/toggle_reveal")
    assert "hidden" in gallery[0]["caption"]
    _, status = client.predict(5, api_name="/toggle_reveal")
    assert "Select an image" in status


def test_without_a_detector_everything_is_blurred_unless_opted_in(app_url, tmp_path, monkeypatch):
    def unavailable():
        raise safety.SafetyUnavailableError("The nudity detector is unavailable (test).")

    monkeypatch.setattr(safety, "load_detector", unavailable)
    client = Client(app_url["url"], verbose=False, download_files=str(tmp_path / "dl"))
    gallery, status = client.predict([handle_file(str(p)) for p in _images(tmp_path)], api_name="/upload_images")
    assert "detector is unavailable" in status
    assert all("not checked" in item["caption"] for item in gallery)
    gallery, _ = client.predict(True, api_name="/show_unchecked")
    assert all("hidden" not in item["caption"] for item in gallery)
    gallery, _ = client.predict(False, api_name="/show_unchecked")
    assert all("hidden" in item["caption"] for item in gallery)
