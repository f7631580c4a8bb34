"""Loading pipelines and encoders by name: tiny local folders load as hub models would; bad names fail fast."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re
import socket
import time

import pytest
import torch

from tests.helpers_tiny import make_tiny_clip, make_tiny_pipeline
from recare import models
from recare.models import ModelLoadError, load_encoder, load_pipeline, resolve_device, resolve_dtype

NOT_CACHED_HUB_ID = "recare-tests/definitely-not-a-cached-model"


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny-pipeline"))


@pytest.mark.parametrize("cuda, mps, expected", [
    (True, True, "cuda"),   # CUDA first, even where MPS exists too
    (False, True, "mps"),
    (False, False, "cpu"),
])
def test_resolve_device_auto_prefers_cuda_then_mps_then_cpu(cuda, mps, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto") == torch.device(expected)


def test_resolve_device_explicit_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # named devices are taken as given, not probed
    assert resolve_device(torch.device("mps")) == torch.device("mps")
    with pytest.raises(ModelLoadError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


def test_resolve_dtype_policy():
    assert resolve_dtype(torch.device("cuda"), "auto") == torch.float16
    assert resolve_dtype("cpu", "auto") == torch.float32
    assert resolve_dtype("cpu", "fp16") == torch.float16
    assert resolve_dtype("cpu", torch.bfloat16) == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("cpu", "fp8-ish")


def test_load_pipeline_from_local_folder(tiny_pipeline_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = load_pipeline(tiny_pipeline_dir, device="cpu")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.safety_checker is None
    assert pipe.device.type == "cpu"
    assert pipe.unet.dtype == torch.float32
    assert tuple(pipe.unet.config.block_out_channels) == (4, 8)


def test_load_pipeline_explicit_dtype(tiny_pipeline_dir):
    pipe = load_pipeline(str(tiny_pipeline_dir), device="cpu", dtype="fp16")
    assert pipe.unet.dtype == torch.float16
    assert pipe.text_encoder.dtype == torch.float16


def test_unknown_model_name():
    with pytest.raises(ModelLoadError, match="unknown model 'no such model'"):
        load_pipeline("no such model", device="cpu")


def test_folder_that_is_not_diffusers(tmp_path):
    (tmp_path / "readme.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a diffusers folder"):
        load_pipeline(tmp_path, device="cpu")


def test_broken_diffusers_folder(tmp_path, tiny_pipeline_dir):
    (tmp_path / "model_index.json").write_text((tiny_pipeline_dir / "model_index.json").read_text())
    with pytest.raises(ModelLoadError, match="could not load the diffusers pipeline"):
        load_pipeline(tmp_path, device="cpu")


def test_mini_world_not_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("RECARE_MINI_WORLD", str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="mini world not installed"):
        load_pipeline("mini-world", device="cpu")
    with pytest.raises(ModelLoadError, match="mini world not installed"):
        load_encoder("mini-world", device="cpu")


def test_mini_world_loads_from_env_folder(tmp_path, monkeypatch):
    make_tiny_pipeline(tmp_path / "pipeline")
    make_tiny_clip(tmp_path / "clip")
    monkeypatch.setenv("RECARE_MINI_WORLD", str(tmp_path))
    assert tuple(load_pipeline("mini-world", device="cpu").unet.config.block_out_channels) == (4, 8)
    assert load_encoder("mini-world", device="cpu").identity.startswith("hf-clip:mini-world:")


def test_mini_world_folder_is_one_setting_for_every_loader(tmp_path, monkeypatch):
    from recare.miniworld.clip import MiniClipError, load_mini_clip
    from recare.miniworld.oracle import OracleError, load_oracle

    monkeypatch.setenv("RECARE_MINI_WORLD", "")  # empty means unset, not the working directory
    assert models.mini_world_dir() == models.REPO_ROOT / "checkpoints" / "mini-world"
    monkeypatch.setenv("RECARE_MINI_WORLD", str(tmp_path))
    assert models.mini_world_dir() == tmp_path
    with pytest.raises(OracleError, match=re.escape(str(tmp_path / "oracle"))):
        load_oracle()
    with pytest.raises(MiniClipError, match=re.escape(str(tmp_path / "clip"))):
        load_mini_clip()


def test_hub_id_offline_not_cached_fails_fast(monkeypatch):
    from diffusers import StableDiffusionPipeline  # noqa: F401  (import time is not what this test measures)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set") as info:
        load_pipeline(NOT_CACHED_HUB_ID, device="cpu")
    assert time.perf_counter() - start < 5
    assert "run once with network" in str(info.value).lower()


def test_hub_id_unreachable_hub_fails_within_probe_timeout(monkeypatch):
    """Not flagged offline, but the hub accepts the connection and never answers: the probe gives up."""
    from huggingface_hub import constants

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    host, port = silent.getsockname()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://{host}:{port}")
    monkeypatch.setattr(models.hub, "HUB_PROBE_TIMEOUT_S", 1.0)  # read by hub_reachable at call time
    try:
        start = time.perf_counter()
        assert models.hub_reachable(timeout=1.0) is False
        with pytest.raises(ModelLoadError, match="the Hugging Face hub cannot be reached"):
            load_pipeline(NOT_CACHED_HUB_ID, device="cpu")
        assert time.perf_counter() - start < 10
    finally:
        silent.close()


def test_open_clip_offline_not_cached_fails_fast(monkeypatch):
    import open_clip  # noqa: F401  (import time is not what this test measures)
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors"), str):
        pytest.skip("the real ViT-B-32 weights are cached here; this test checks the not-cached path")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_encoder("open_clip:ViT-B-32/openai", device="cpu")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("name, message", [
    ("open_clip:NoSuchArch/openai", "no architecture"),
    ("open_clip:ViT-B-32/no-such-tag", "no pretrained weights"),
    ("open_clip:ViT-B-32", "must be 'open_clip:<arch>/<pretrained>'"),
    ("no-such-encoder", "unknown encoder"),
])
def test_bad_encoder_names(name, message):
    with pytest.raises(ModelLoadError, match=message):
        load_encoder(name, device="cpu")


def test_encoder_folder_without_config(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="not a transformers CLIPModel folder"):
        load_encoder(tmp_path, device="cpu")
