"""recare.train.determinism and the recipe's device-dependent settings, on the CPU (tests/test_cuda.py runs
the GPU side: bit-identical resume inside `deterministic()`)."""

from __future__ import annotations

import pytest
import torch

from recare.config import TrainConfig
from recare.train import recipe
from recare.train.determinism import cublas_ready, deterministic


@pytest.fixture
def restore_torch_flags():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield before
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


@pytest.mark.parametrize("warn_only", [False, True])
def test_deterministic_switches_on_for_the_block_and_restores(restore_torch_flags, warn_only):
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    with deterministic(warn_only=warn_only):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled() is warn_only
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        with deterministic(warn_only=not warn_only):   # nested: the outer block's settings come back
            assert torch.is_deterministic_algorithms_warn_only_enabled() is not warn_only
        assert torch.is_deterministic_algorithms_warn_only_enabled() is warn_only
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark


def test_deterministic_restores_after_an_error_and_can_be_off(restore_torch_flags):
    torch.use_deterministic_algorithms(False)
    with pytest.raises(ValueError), deterministic():
        raise ValueError("boom")
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic(enabled=False):
        assert not torch.are_deterministic_algorithms_enabled()


def test_cublas_setting_is_recognised(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    assert cublas_ready()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":1024:2")
    assert not cublas_ready()


@pytest.mark.parametrize("dtype, expected", [("auto", None), ("fp32", None), ("bf16", torch.bfloat16)])
def test_job_target_images_are_generated_under_the_training_autocast(monkeypatch, tmp_path, dtype, expected):
    seen = []

    def generated_images(pipe, config, folder, progress, cancel):
        enabled = torch.is_autocast_enabled("cpu")
        seen.append(torch.get_autocast_dtype("cpu") if enabled else None)
        return ["image"] * config.num_images

    monkeypatch.setattr("recare.generate.generated_images", generated_images)
    pipe = type("Pipe", (), {"unet": type("UNet", (), {"device": torch.device("cpu")})()})()
    config = TrainConfig.for_method("recare", reference_word="tench", num_images=3, dtype=dtype)
    assert recipe._job_images(config, pipe, tmp_path, None, None) == ["image"] * 3
    assert seen == [expected] and not torch.is_autocast_enabled("cpu")
