"""A training run's weights files (`recare.train.downloads.weights_file`): the full UNet exported once, then served."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from recare import models
from recare.errors import ConfigError, RunError
from recare.models import OFFICIAL_UNET_FILE, TRAINED_PARAMS_FILE
from recare.train.downloads import RECORD, weights_file
from tests.helpers_tiny import make_tiny_pipeline

CHANGED = "conv_in.weight"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny-pipeline"))


def _run(tmp_path, tiny_dir, shift: float):
    """A finished training run folder: config.json naming the tiny base, trained parameters = base + shift."""
    run = tmp_path / "train-run"
    run.mkdir(exist_ok=True)
    (run / "config.json").write_text(json.dumps({"train": {"model": str(tiny_dir)}}))
    base = models.load_pipeline(tiny_dir, device="cpu", dtype="fp32").unet.state_dict()
    save_file({CHANGED: (base[CHANGED] + shift).contiguous()}, str(run / TRAINED_PARAMS_FILE),
              metadata={"format": "recare-trained-params"})
    return run, base[CHANGED]


@pytest.fixture
def loads(monkeypatch):
    """Counts the loads of a base model with a run's trained parameters (what an export makes)."""
    calls = []
    real = models.load_pipeline

    def counting(*args, **kwargs):
        if kwargs.get("trained") is not None:
            calls.append(kwargs["trained"])
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "load_pipeline", counting)
    return calls


def test_official_pt_is_exported_once_and_again_after_retraining(tmp_path, tiny_dir, loads):
    run, base = _run(tmp_path, tiny_dir, 1.0)
    path = weights_file(run, "official_pt")
    assert path == run / OFFICIAL_UNET_FILE and len(loads) == 1
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(state[CHANGED], base + 1.0)  # the base plus the trained parameters
    assert weights_file(run, "official_pt") == path and len(loads) == 1  # the second download serves the file
    assert json.loads((run / RECORD).read_text())["official_pt"]

    _run(tmp_path, tiny_dir, 2.0)  # trained again: new parameters, the old export is stale
    weights_file(run, "official_pt")
    assert len(loads) == 2
    assert torch.equal(torch.load(path, map_location="cpu", weights_only=True)[CHANGED], base + 2.0)


def test_unet_folder_zip_and_trained_params(tmp_path, tiny_dir, loads):
    run, _ = _run(tmp_path, tiny_dir, 1.0)
    assert weights_file(run, "trained_params") == run / TRAINED_PARAMS_FILE and not loads
    archive = weights_file(run, "unet_folder")
    with zipfile.ZipFile(archive) as z:
        assert "unet/config.json" in z.namelist()
    assert weights_file(run, "unet_folder") == archive and len(loads) == 1


def test_a_file_training_wrote_is_served_as_it_is(tmp_path, tiny_dir, loads):
    run, _ = _run(tmp_path, tiny_dir, 1.0)
    (run / OFFICIAL_UNET_FILE).write_bytes(b"written by training")
    assert weights_file(run, "official_pt").read_bytes() == b"written by training" and not loads


def test_unknown_format_and_missing_parameters_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown download format"):
        weights_file(tmp_path, "onnx")
    with pytest.raises(RunError, match=TRAINED_PARAMS_FILE):
        weights_file(tmp_path, "official_pt")
