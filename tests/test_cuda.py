"""The library on a CUDA GPU (marker `cuda`; skipped where torch sees none).

Run on a GPU machine with `python -m pytest -m cuda -s` (conftest.py then lifts the suite's
CUDA_VISIBLE_DEVICES=""). What is checked, on the tiny pipeline:
  - a short recipe run (stage 1 + 2) in fp32 on CUDA, TF32 off, matches the CPU run: per-step
    losses within 1e-3, the trained weights' change within 1 % (AdamW normalises each element's
    step, so elements whose gradient is rounding noise may step either way);
  - resume after cancel is bit-identical on CUDA, and so is a second uninterrupted run, inside
    `recare.train.determinism.deterministic()`;
  - images seeded 42 + i repeat bit for bit on the same GPU;
  - a real CUDA out-of-memory error becomes the advice message, keeps the last checkpoint, and its
    memory is freed once the error is dropped; a finished run leaves nothing allocated;
  - benchmarks/gpu_check.py's tiny mode runs on CUDA and reports peak memory per stage.
"""

from __future__ import annotations

import gc
import json
import warnings

import pytest
import torch
from PIL import Image

from recare.errors import Cancelled, TrainingError
from recare.progress import CancelToken
from recare.train import recipe
from recare.train.determinism import cublas_ready, deterministic
from recare.train.recipe import train
from tests.helpers_tiny import build_tiny_pipeline, cancel_after
from tests.test_train_recipe import careset, same_weights, tiny

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (python -m pytest -m cuda)")]

EVENTS = 15   # tiny(): 2 rounds of 3 erase + 3 TI steps, then 3 stage-2 iterations
DEVICE = "cuda"


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (16, 16), (40 * i, 100, 200 - 30 * i)) for i in range(4)]


@pytest.fixture
def no_tf32():
    """fp32 means fp32: TF32 matrix products and convolutions off for the block (torch turns cuDNN's on)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def cuda_pipe():
    return build_tiny_pipeline(seed=0).to(DEVICE)


def allocated() -> int:
    return torch.cuda.memory_allocated() if DEVICE == "cuda" else 0


def fp32(**fields):
    return tiny(dtype="fp32", **fields)


def losses(out_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_short_training_on_cuda_matches_the_cpu(images, tmp_path, no_tf32):
    base = build_tiny_pipeline(seed=0)
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    cpu = train(fp32(), base, images, careset(), tmp_path / "cpu")
    gpu = train(fp32(), cuda_pipe(), images, careset(), tmp_path / "gpu")
    assert next(gpu.unet.parameters()).device.type == DEVICE
    cpu_losses, gpu_losses = losses(tmp_path / "cpu"), losses(tmp_path / "gpu")
    assert len(cpu_losses) == len(gpu_losses) == EVENTS
    worst_loss = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(cpu_losses, gpu_losses))
    gpu_state = {k: v.cpu() for k, v in gpu.unet.state_dict().items()}
    moved = sum(float((v - before[k]).square().sum()) for k, v in cpu.unet.state_dict().items()) ** 0.5
    apart = sum(float((gpu_state[k] - v).square().sum()) for k, v in cpu.unet.state_dict().items()) ** 0.5
    worst_weight = max(float((gpu_state[k] - v).abs().max()) for k, v in cpu.unet.state_dict().items())
    token_diff = max(float((a.embedding - b.embedding).abs().max()) for a, b in zip(cpu.tokens, gpu.tokens))
    print(f"\n[cuda vs cpu, fp32 without TF32] worst loss relative difference {worst_loss:.2e}; weights moved "
          f"{moved:.3e} (L2) and differ by {apart:.3e} ({apart / moved:.2e} of the move), worst element "
          f"{worst_weight:.2e}; learned tokens differ by at most {token_diff:.2e}")
    assert moved > 0
    assert worst_loss <= 1e-3
    assert apart <= 1e-2 * moved
    assert token_diff <= 1e-2 * max(float(t.embedding.abs().max()) for t in cpu.tokens)


@pytest.fixture(scope="module")
def straight_cuda(images, tmp_path_factory):
    """An uninterrupted fp32 run on CUDA inside deterministic(), and what it warned about."""
    with deterministic(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(fp32(), cuda_pipe(), images, careset(), tmp_path_factory.mktemp("straight-cuda"))
    nondeterministic = sorted({str(w.message).splitlines()[0][:160] for w in caught
                               if "deterministic" in str(w.message).lower()})
    print(f"\n[cuda determinism] cuBLAS workspace set: {cublas_ready()}; ops torch flagged: {nondeterministic or 'none'}")
    return result


def test_a_second_run_on_cuda_is_bit_identical(straight_cuda, images, tmp_path):
    with deterministic():
        again = train(fp32(), cuda_pipe(), images, careset(), tmp_path)
    assert same_weights(again.unet, straight_cuda.unet)
    assert all(torch.equal(a.embedding, b.embedding) for a, b in zip(again.tokens, straight_cuda.tokens))


@pytest.mark.parametrize("stop_after", [2, 5, 8, 14])   # inside: erase 1, TI 1, erase 2, stage 2
def test_resume_after_cancel_on_cuda_is_bit_identical(straight_cuda, images, tmp_path, stop_after):
    token, seen = CancelToken(), []
    cancel_at = cancel_after(token, stop_after, seen)

    pipe = cuda_pipe()
    with deterministic():
        with pytest.raises(Cancelled):
            train(fp32(), pipe, images, careset(), tmp_path, progress=cancel_at, cancel=token)
        rest = []
        resumed = train(fp32(), pipe, images, careset(), tmp_path, progress=rest.append)
    assert len(seen) + len(rest) == EVENTS
    assert same_weights(resumed.unet, straight_cuda.unet)
    assert all(torch.equal(a.embedding, b.embedding) for a, b in zip(resumed.tokens, straight_cuda.tokens))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_images_seeded_42_plus_i_repeat_on_the_gpu(dtype):
    from recare.config import GenerateConfig
    from recare.generate import generate_images

    pipe = build_tiny_pipeline(seed=0).to(DEVICE, dtype)
    pipe.set_progress_bar_config(disable=True)
    config = GenerateConfig(prompt="a photo of a tench", num_images=4, steps=5, batch_size=2)
    first, second = generate_images(pipe, config), generate_images(pipe, config)
    assert first.seeds == second.seeds == [42, 43, 44, 45]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first.images, second.images))
    assert len({im.tobytes() for im in first.images}) == 4     # each seed its own image


def test_real_out_of_memory_becomes_advice_and_is_freed(images, tmp_path, monkeypatch):
    pipe = cuda_pipe()
    warm = train(fp32(), pipe, images, careset(), tmp_path / "warm")   # cuBLAS / cuDNN workspaces now exist
    del warm
    gc.collect()
    baseline = allocated()
    real_step = recipe.ESDTrainer.step

    def step_then_oom(self):
        if self.done == 2:   # a real allocation no GPU can hold
            torch.empty(1 << 50, dtype=torch.uint8, device=DEVICE)
        return real_step(self)

    monkeypatch.setattr(recipe.ESDTrainer, "step", step_then_oom)
    with pytest.raises(TrainingError, match="ran out of memory during stage1.erase.*The last finished step was saved"):
        train(fp32(), pipe, images, careset(), tmp_path / "run")
    assert (tmp_path / "run" / "state" / "trainer.pt").is_file()
    gc.collect()
    assert allocated() == baseline    # the student and its optimizer went with the error
    monkeypatch.setattr(recipe.ESDTrainer, "step", real_step)
    result = train(fp32(), pipe, images, careset(), tmp_path / "run")   # resumes from the saved step
    assert len(result.tokens) == 2 and not (tmp_path / "run" / "state").exists()
    del result
    gc.collect()
    assert allocated() == baseline    # a finished run leaves only the pipeline


def test_gpu_check_tiny_runs_on_cuda(tmp_path):
    from benchmarks import gpu_check

    report = gpu_check.main([str(tmp_path), "--device", DEVICE, "--tiny", "--parts", "gen,train",
                             "--combos", "noxattn:bf16:gc,xattn:fp16"])
    assert "errors" not in report, report.get("errors")
    assert all(d["seeds_repeat_bit_identical"] for d in report["gen"]["dtypes"].values())
    rows = report["train"]["rows"]
    assert [r["train_method"] for r in rows] == ["noxattn", "xattn"]
    assert all(r["esd_peak_gb"] > 0 and r["stage2_peak_gb"] > 0 and r["left_allocated_gb"] == 0 for r in rows)
    assert json.loads((tmp_path / "gpu_check.json").read_text())["projection"]["rows"]
