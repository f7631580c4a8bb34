"""Seeded, batched generation through a tiny pipeline loaded from disk; reading user images."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image

from tests.helpers_tiny import make_tiny_pipeline
from recare.config import ConfigError, GenerateConfig
from recare.generate import (
    MANIFEST_NAME,
    ImageInputError,
    generate_images,
    generation_metadata,
    iter_generation,
    load_image_folder,
    load_images,
    save_generation,
    write_manifest,
)
from recare.models import load_pipeline
from recare.progress import CancelToken

PROMPT = "a photo of a tench"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = make_tiny_pipeline(tmp_path_factory.mktemp("tiny-pipeline"))
    pipe = load_pipeline(folder, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def arrays(result):
    return [np.asarray(im, dtype=np.int16) for im in result.images]


def max_diff(a, b):
    return int(np.abs(a - b).max())


def test_same_seed_same_images_and_seed_per_image(pipe):
    config = GenerateConfig(prompt=PROMPT, num_images=2, base_seed=7, steps=2, batch_size=2)
    first, second = generate_images(pipe, config), generate_images(pipe, config)
    assert first.seeds == [7, 8] and first.metadata["seeds"] == [7, 8]
    assert all(np.array_equal(a, b) for a, b in zip(arrays(first), arrays(second)))
    assert max_diff(*arrays(first)) > 20, "different seeds must give different images"
    assert first.images[0].size == (64, 64)


def test_batch_size_does_not_change_images(pipe):
    one = generate_images(pipe, GenerateConfig(prompt=PROMPT, num_images=3, base_seed=42, steps=2, batch_size=1))
    three = generate_images(pipe, GenerateConfig(prompt=PROMPT, num_images=3, base_seed=42, steps=2, batch_size=3))
    shifted = generate_images(pipe, GenerateConfig(prompt=PROMPT, num_images=1, base_seed=44, steps=2, batch_size=1))
    # Same starting noise per image; only float rounding of batched matmuls may differ (<= 1/255).
    for a, b in zip(arrays(one), arrays(three)):
        assert max_diff(a, b) <= 1
        assert np.mean(a != b) < 0.01
    assert np.array_equal(arrays(one)[2], arrays(shifted)[0]), "image i must use seed base_seed + i"


def test_steps_and_guidance_follow_config(pipe):
    result = generate_images(pipe, GenerateConfig(prompt=PROMPT, num_images=1, steps=3, guidance=1.0, batch_size=1))
    assert result.metadata["settings"]["steps"] == 3
    fewer = generate_images(pipe, GenerateConfig(prompt=PROMPT, num_images=1, steps=2, guidance=1.0, batch_size=1))
    assert not np.array_equal(arrays(result)[0], arrays(fewer)[0])  # the steps reach the call's own scheduler
    other = generate_images(pipe, GenerateConfig(prompt=PROMPT, num_images=1, steps=3, guidance=9.0, batch_size=1))
    assert not np.array_equal(arrays(result)[0], arrays(other)[0])
    assert result.metadata["settings"]["steps"] == 3 and other.metadata["settings"]["guidance"] == 9.0


def test_progress_and_metadata(pipe, tmp_path):
    events = []
    config = GenerateConfig(prompt=PROMPT, num_images=3, base_seed=1, steps=1, batch_size=2)
    result = generate_images(pipe, config, progress=events.append)
    assert [(e.stage, e.step, e.total) for e in events] == [("generate", 0, 3), ("generate", 2, 3), ("generate", 3, 3)]
    assert events[0].message == "image 1-2 of 3" and events[1].message == "image 3-3 of 3"
    meta = result.metadata
    assert meta["prompt"] == PROMPT and meta["cancelled"] is False and meta["num_images"] == 3
    assert meta["scheduler"] == "DDIMScheduler"
    assert meta["model"] == pipe.config._name_or_path


def test_iter_generation_yields_batches_equal_to_one_call(pipe):
    config = GenerateConfig(prompt=PROMPT, num_images=3, base_seed=11, steps=1, batch_size=2)
    batches = list(iter_generation(pipe, config))
    assert [(b.start, b.end, b.seeds, b.total) for b in batches] == [(0, 2, [11, 12], 3), (2, 3, [13], 3)]
    whole = generate_images(pipe, config)
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip([im for b in batches for im in b.images], whole.images))


def test_cancel_keeps_images_made(pipe):
    cancel = CancelToken()
    config = GenerateConfig(prompt=PROMPT, num_images=5, base_seed=3, steps=1, batch_size=2)
    # set once the first batch is done (the event before the second batch)
    result = generate_images(pipe, config, progress=lambda e: e.step >= 2 and cancel.cancel(), cancel=cancel)
    assert len(result.images) == 2 and result.seeds == [3, 4]
    assert result.metadata["cancelled"] is True
    assert "cancelled after 2 of 5" in result.metadata["note"]


def test_cancel_file_and_threading_event_both_stop_the_iterator(pipe, tmp_path):
    config = GenerateConfig(prompt=PROMPT, num_images=4, base_seed=3, steps=1, batch_size=1)
    token = CancelToken(path=tmp_path / "cancel")
    made = []
    for batch in iter_generation(pipe, config, cancel=token):
        made.extend(batch.seeds)
        (tmp_path / "cancel").touch()  # another process asks to stop
    assert made == [3]
    event = threading.Event()
    event.set()
    assert list(iter_generation(pipe, config, cancel=event)) == []


def test_invalid_config_rejected(pipe):
    with pytest.raises(ConfigError):
        generate_images(pipe, GenerateConfig(prompt="  ", num_images=1))


def test_save_generation_round_trip(pipe, tmp_path):
    result = generate_images(pipe, GenerateConfig(prompt=PROMPT, num_images=2, steps=1, batch_size=2))
    out = save_generation(result, tmp_path / "run")
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "001.png", "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == ["000.png", "001.png"] and manifest["seeds"] == result.seeds
    assert "safety" not in manifest
    loaded = load_image_folder(out)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(loaded, result.images))


def test_write_manifest_one_schema_with_optional_safety(pipe, tmp_path):
    config = GenerateConfig(prompt=PROMPT, num_images=4, base_seed=9, steps=1, batch_size=2)
    meta = generation_metadata(pipe, config, [9, 10], model="mini-world", seconds=1.23456)
    path = write_manifest(tmp_path, meta, ["0000.png", "0001.png"], safety={"flagged": [False, True], "checked": True})
    manifest = json.loads(path.read_text())
    assert path.name == MANIFEST_NAME
    assert manifest["model"] == "mini-world" and manifest["seeds"] == [9, 10] and manifest["num_images"] == 2
    assert manifest["num_requested"] == 4 and manifest["seconds"] == 1.235 and manifest["settings"]["base_seed"] == 9
    assert manifest["safety"] == {"flagged": [False, True], "checked": True}
    with pytest.raises(ValueError, match="1 files but 2 seeds"):
        write_manifest(tmp_path, meta, ["0000.png"])


# --- the app's Generate tab runs the same iterator ----------------------------------------------


class _CountingPipe:
    """The tiny pipeline, counting its calls (one call = one batch)."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.pipe(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def test_app_generate_streams_batches_writes_the_library_manifest_and_cancel_stops_the_library(
        pipe, tmp_path, monkeypatch):
    import gradio as gr

    from recare import safety
    from ui.common import AppContext
    from ui.generate_tab import _cancelled, _generate
    from ui.session import new_session

    monkeypatch.setattr(safety, "load_detector", lambda: (lambda image: []))  # nothing flagged
    counting = _CountingPipe(pipe)
    ctx = AppContext(models=type("Models", (), {"pipeline": lambda self, name: counting})(), session=None,
                     model_name=None)
    base = GenerateConfig(prompt=PROMPT, batch_size=2)
    shown = []
    session = new_session(tmp_path / "workspace")
    run = _generate(ctx, base, PROMPT, 6, 5, 1, 7.5, "tiny", session,
                    lambda fraction, desc=None: shown.append((fraction, desc)))
    session, gallery, status = next(run)
    assert gallery == gr.skip() and status.startswith("Generating 6")  # the old set stays until the first batch
    session, gallery, status = next(run)  # the first batch, as soon as it is made
    assert len(gallery) == 2 and "Generated 2 of 6" in status
    manifest = json.loads((session.image_dir / MANIFEST_NAME).read_text())
    assert manifest["seeds"] == [5, 6] and manifest["files"] == ["0000.png", "0001.png"]
    assert manifest["model"] == "tiny" and manifest["num_requested"] == 6 and manifest["settings"]["steps"] == 1
    assert manifest["safety"] == {"flagged": [False, False], "checked": True}
    assert shown[-1] == (0.0, "generate: image 1-2 of 6")  # the library's event, drawn on the bar

    assert _cancelled(session) == "Cancelled. The 2 images made so far are kept."
    assert list(run) == []  # no "Done." after a cancel
    assert counting.calls == 1, "the token stops the library before the next batch"
    assert shown[-1] == (2 / 6, "generate: image 3-4 of 6")
    assert len(session.images) == 2
    assert not list(session.folder.glob(".cancel-generate-*"))  # the run removed its cancel file


# --- images the user brings ------------------------------------------------------------------


def _image(color, mode="RGB", size=(8, 6)):
    return Image.new(mode, size, color)


def test_load_folder_mixed_formats(tmp_path):
    _image((255, 0, 0)).save(tmp_path / "b.png")
    _image((0, 255, 0)).save(tmp_path / "a.jpg")
    _image((0, 0, 255, 128), mode="RGBA").save(tmp_path / "c.webp")
    (tmp_path / "notes.txt").write_text("ignored")
    images = load_images(tmp_path)
    assert len(images) == 3 and all(im.mode == "RGB" for im in images)
    assert images[0].getpixel((0, 0))[1] > 200  # a.jpg first (sorted by name)


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no images")
    with pytest.raises(ImageInputError, match="has no images"):
        load_images(tmp_path)


def test_corrupt_image_is_named(tmp_path):
    _image((1, 2, 3)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageInputError, match="broken.png"):
        load_image_folder(tmp_path)


def test_zip_of_images(tmp_path):
    archive = tmp_path / "imgs.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(2):
            path = tmp_path / f"{i}.png"
            _image((i * 100, 0, 0)).save(path)
            z.write(path, f"inner/{i}.png")
        z.writestr("__MACOSX/inner/._0.png", b"junk")
        z.writestr("readme.txt", "text")
    images = load_images(archive)
    assert [im.getpixel((0, 0))[0] for im in images] == [0, 100]


def test_broken_zip(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(ImageInputError, match="not a readable zip"):
        load_images(bad)


def test_zip_without_images(tmp_path):
    archive = tmp_path / "empty.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme.txt", "text")
    with pytest.raises(ImageInputError, match="has no images"):
        load_images(archive)


def test_list_of_files_and_images(tmp_path):
    _image((5, 5, 5)).save(tmp_path / "x.png")
    images = load_images([tmp_path / "x.png", _image((9, 9, 9, 9), mode="RGBA")])
    assert len(images) == 2 and images[1].mode == "RGB"
    with pytest.raises(ImageInputError, match="does not exist"):
        load_images([tmp_path / "missing.png"])
    with pytest.raises(ImageInputError, match="no images were given"):
        load_images([])
