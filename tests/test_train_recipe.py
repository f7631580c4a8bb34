"""The recipe end to end on the tiny pipeline: outputs, determinism, resume after cancel (bit-identical
on the CPU), NaN keeping the last good state, out-of-memory advice, methods as configs, the job."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from recare.careset_io import OfficialCareSet, parse_official
from recare.config import (
    ESDConfig, RolloutConfig, Stage1Config, Stage2Config, TextualInversionConfig, TrainConfig,
)
from recare.errors import Cancelled, TrainingError
from recare.progress import CancelToken
from recare.train import recipe
from recare.train.params import trainable_parameter_names
from recare.train.recipe import round_images, round_placeholder, train
from tests.helpers_tiny import build_tiny_pipeline, cancel_after, make_tiny_pipeline

CARESET = {"tench_care_word": ["A river", "A lake"], "tench_care_word_photo": ["A photo of river", "A photo of lake"]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (16, 16), (40 * i, 100, 200 - 30 * i)) for i in range(4)]


def careset():
    return parse_official(CARESET)


def tiny(method: str = "recare", **fields) -> TrainConfig:
    """Every stage at a few iterations, 8x8 latents, k in [1, 8]."""
    stages = {
        "stage1": Stage1Config(n_iterations=2, esd=ESDConfig(iterations=3, learning_rate=1e-3),
                               textual_inversion=TextualInversionConfig(steps=3, resolution=16), probe_seeds=0),
        "stage2": Stage2Config(iterations=3, learning_rate=1e-3),
        "esd": ESDConfig(iterations=4, learning_rate=1e-3),
    }
    preset = TrainConfig.for_method(method)
    chosen = {k: v for k, v in stages.items() if getattr(preset, k) is not None}
    if method == "recare-no-retain":
        chosen["stage2"] = Stage2Config(iterations=3, learning_rate=1e-3, retain_weight=0.0)
    return TrainConfig.for_method(method, reference_word="tench", initializer_token="a", save_every=2,
                                  rollout=RolloutConfig(steps=10, resolution=16), **{**chosen, **fields})


@pytest.fixture(scope="module")
def straight(pipe, images, tmp_path_factory):
    """An uninterrupted recare run with every output format."""
    out = tmp_path_factory.mktemp("straight")
    events = []
    before = {n: (p.clone(), p.requires_grad) for n, p in [*pipe.unet.named_parameters(),
                                                         *pipe.text_encoder.named_parameters()]}
    vocabulary = len(pipe.tokenizer)
    result = train(tiny(outputs=["trained_params", "unet_folder", "official_pt"]), pipe, images, careset(), out,
                   progress=events.append)
    after = dict([*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()])
    assert all(torch.equal(after[n], v) and after[n].requires_grad == flag for n, (v, flag) in before.items())
    assert len(pipe.tokenizer) == vocabulary    # the caller's pipeline is left exactly as it was
    return result, events


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---- configs --------------------------------------------------------------------------------------

def test_methods_are_config_values_with_official_defaults():
    recare_cfg = TrainConfig()
    assert recare_cfg.method == "recare" and recare_cfg.esd is None
    assert (recare_cfg.stage1.n_iterations, recare_cfg.stage1.esd.iterations, recare_cfg.stage1.esd.learning_rate,
            recare_cfg.stage1.esd.eta) == (2, 200, 0.5e-5, 2.0)
    ti = recare_cfg.stage1.textual_inversion
    assert (ti.steps, ti.learning_rate) == (3000, 5e-3)
    s2 = recare_cfg.stage2
    assert (s2.iterations, s2.learning_rate, s2.retain_weight, s2.guidance_scale, s2.projection_weight) == \
        (200, 2e-5, 1, 2, 1)
    assert (recare_cfg.rollout.steps, recare_cfg.rollout.guidance, recare_cfg.rollout.batch) == (50, 3.0, 1)
    assert (recare_cfg.train_method, recare_cfg.seed) == ("noxattn", 42)
    esd = TrainConfig.for_method("esd")
    assert esd.stage1 is None and esd.stage2 is None and (esd.esd.iterations, esd.esd.learning_rate) == (1000, 1e-5)
    assert TrainConfig.for_method("recare-no-adv").stage1 is None
    assert TrainConfig.for_method("recare-no-retain").stage2.retain_weight == 0
    for method in ("recare", "esd", "recare-no-adv", "recare-no-retain"):
        config = TrainConfig.for_method(method, seed=3)
        assert TrainConfig.from_json(config.to_json()) == config
    # the top-level initializer is what stage 1's textual inversion uses, and what config.json shows
    assert TrainConfig(initializer_token="art").stage1.textual_inversion.initializer_token == "art"


@pytest.mark.parametrize("build,message", [
    (lambda: TrainConfig(esd=ESDConfig()), "exactly one of stage2"),
    (lambda: TrainConfig(stage2=None), "exactly one of stage2"),
    (lambda: TrainConfig(stage2=None, esd=ESDConfig()), "needs stage2 set"),
    (lambda: TrainConfig(train_method="attn"), "train_method"),
    (lambda: TrainConfig(outputs=["weights"]), "outputs"),
    (lambda: TrainConfig(outputs=[]), "outputs"),
    (lambda: TrainConfig(dtype="int8"), "dtype"),
    (lambda: TrainConfig(num_images=1), "slice of the images"),
    (lambda: TrainConfig(reference_word=" "), "reference_word is empty"),
    (lambda: RolloutConfig(steps=2), "at least 3"),
    (lambda: RolloutConfig(batch=0), "batch"),
    (lambda: Stage2Config(retain_weight=-1), "lambda"),
    (lambda: ESDConfig(learning_rate=0), "learning_rate"),
    (lambda: TrainConfig.for_method("stereo"), "unknown method"),
    (lambda: TrainConfig.from_dict({"stage2": {"lr": 1}}), "unknown field"),
])
def test_bad_settings_are_refused(build, message):
    from recare.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        build()


# ---- small pieces --------------------------------------------------------------------------------

def test_round_images_and_placeholders_follow_the_official_split():
    items = list(range(7))
    assert [round_images(items, r, 2) for r in range(2)] == [[0, 1, 2], [3, 4, 5]]
    assert round_images(items, 2, 3) == [4, 5]
    assert round_images([0], 1, 2) == [0]
    assert [round_placeholder("<v*>", r) for r in range(2)] == ["<v1*>", "<v2*>"]
    assert round_placeholder("<tok>", 0) == "<tok>1"


# ---- one full run ---------------------------------------------------------------------------------

def test_run_writes_every_output(straight, pipe):
    result, events = straight
    out = result.out_dir
    assert [t.placeholder for t in result.tokens] == ["<v1*>", "<v2*>"]
    stages = [(e.stage, e.total) for e in events if e.step == 1]
    assert stages == [("stage1.erase", 3), ("stage1.textual_inversion", 3), ("stage1.erase", 3),
                      ("stage1.textual_inversion", 3), ("stage2", 3)]
    assert events[-1].message == "H = ['tench', '<v1*>', '<v2*>']"
    # trained_params: only changed tensors, all trainable, applied by plain load_state_dict(strict=False)
    params = load_file(out / "trained_params.safetensors")
    assert params and set(params) <= set(trainable_parameter_names(pipe.unet, "noxattn"))
    applied = copy.deepcopy(pipe.unet)
    applied.load_state_dict(params, strict=False)
    assert same_weights(applied, result.unet) and not same_weights(pipe.unet, result.unet)
    # the full formats
    official = torch.load(out / "ReCARE-Diffusers-UNet.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(official[k], v) for k, v in result.unet.state_dict().items())
    from diffusers import UNet2DConditionModel

    assert same_weights(UNet2DConditionModel.from_pretrained(out / "unet"), result.unet)
    # tokens, config, CARE-set, metrics, result; no state left behind
    assert sorted(p.name for p in (out / "tokens").iterdir()) == ["v1.safetensors", "v2.safetensors"]
    assert torch.equal(load_file(out / "tokens" / "v1.safetensors")["<v1*>"], result.tokens[0].embedding)
    config = json.loads((out / "config.json").read_text())
    assert TrainConfig.from_dict(config["train"]) == tiny(outputs=["trained_params", "unet_folder", "official_pt"])
    assert config["base_model"]["unet_fingerprint"] and {"torch", "diffusers", "recare"} <= set(config["versions"])
    assert json.loads((out / "careset.json").read_text()) == CARESET
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 15 and {"stage", "step", "total", "loss", "lr"} <= set(lines[-1])
    assert {"erase", "retain", "seconds"} <= set(lines[-1])
    assert json.loads((out / "result.json").read_text())["tokens"] == ["<v1*>", "<v2*>"]
    assert not (out / "state").exists()


def test_same_config_and_seed_give_identical_weights(straight, pipe, images, tmp_path):
    again = train(tiny(), pipe, images, careset(), tmp_path)
    assert same_weights(again.unet, straight[0].unet)
    assert all(torch.equal(a.embedding, b.embedding) for a, b in zip(again.tokens, straight[0].tokens))
    other = train(tiny(seed=7), pipe, images, careset(), tmp_path / "other")
    assert not same_weights(other.unet, straight[0].unet)


# event numbers: 1-3 erase round 1, 4-6 inversion round 1, 7-9 erase round 2, 10-12 inversion 2, 13-15 stage 2
@pytest.mark.parametrize("stop_after", [1, 5, 8, 10, 12, 14])  # 10: inside round 2's inversion
def test_resume_after_cancel_is_bit_identical(straight, pipe, images, tmp_path, stop_after):
    token, seen = CancelToken(), []
    cancel_at = cancel_after(token, stop_after, seen)

    with pytest.raises(Cancelled):
        train(tiny(outputs=["trained_params", "unet_folder", "official_pt"]), pipe, images, careset(), tmp_path,
              progress=cancel_at, cancel=token)
    assert (tmp_path / "state" / "state.pt").is_file() and not (tmp_path / "result.json").exists()
    rest = []
    resumed = train(tiny(outputs=["trained_params", "unet_folder", "official_pt"]), pipe, images, careset(), tmp_path,
                    progress=rest.append)
    assert len(seen) + len(rest) == 15   # no iteration done twice or skipped
    assert same_weights(resumed.unet, straight[0].unet)
    assert all(torch.equal(a.embedding, b.embedding) for a, b in zip(resumed.tokens, straight[0].tokens))


def test_a_state_from_other_settings_is_refused(pipe, tmp_path):
    token = CancelToken()
    with pytest.raises(Cancelled):
        train(tiny("esd"), pipe, None, None, tmp_path, progress=lambda e: token.cancel(), cancel=token)
    with pytest.raises(TrainingError, match="other settings"):
        train(tiny("esd", seed=1), pipe, None, None, tmp_path)
    fresh = train(tiny("esd", seed=1), pipe, None, None, tmp_path, resume=False)
    assert fresh.summary["phases"]["esd"]["iterations"] == 4


# ---- methods are configs ---------------------------------------------------------------------------

def test_esd_and_ablations_run_the_stages_their_values_name(pipe, tmp_path):
    runs = {}
    for method in ("esd", "recare-no-adv", "recare-no-retain"):
        events = []
        images = [Image.new("RGB", (16, 16))] * 2 if method == "recare-no-retain" else None
        runs[method] = train(tiny(method), pipe, images, careset() if method != "esd" else None, tmp_path / method,
                             progress=events.append)
        runs[method].stages = sorted({e.stage for e in events})
        runs[method].last = events[-1]
    assert runs["esd"].stages == ["esd"] and runs["esd"].tokens == []
    assert runs["recare-no-adv"].stages == ["stage2"] and runs["recare-no-adv"].last.message == "H = ['tench']"
    assert runs["recare-no-retain"].stages == ["stage1.erase", "stage1.textual_inversion", "stage2"]
    assert runs["recare-no-retain"].last.metrics["loss"] == runs["recare-no-retain"].last.metrics["erase"]
    changed = set(load_file(tmp_path / "esd" / "trained_params.safetensors"))
    assert changed and not any(".attn2." in n for n in changed)


# ---- errors ----------------------------------------------------------------------------------------

def test_missing_or_empty_inputs_are_clear_errors(pipe, images, tmp_path):
    with pytest.raises(TrainingError, match="needs a CARE-set"):
        train(tiny("recare-no-adv"), pipe, None, None, tmp_path)
    with pytest.raises(TrainingError, match="needs target images"):
        train(tiny(), pipe, [], careset(), tmp_path)
    empty = OfficialCareSet("tench", "photo", [], [], [])
    with pytest.raises(TrainingError, match="CARE-set is empty"):
        train(tiny("recare-no-adv"), pipe, None, empty, tmp_path)


def test_nan_loss_stops_and_keeps_the_last_good_state(pipe, tmp_path, monkeypatch):
    straight_run = train(tiny("esd"), pipe, None, None, tmp_path / "straight")
    real, calls = recipe.ESDTrainer.losses, []

    def poisoned(self, i, rollout):
        parts = real(self, i, rollout)
        calls.append(i)
        return {k: v * float("nan") for k, v in parts.items()} if len(calls) == 3 else parts

    monkeypatch.setattr(recipe.ESDTrainer, "losses", poisoned)
    with pytest.raises(TrainingError, match="became nan at iteration 3 of 4"):
        train(tiny("esd"), pipe, None, None, tmp_path / "run")
    monkeypatch.undo()
    state = torch.load(tmp_path / "run" / "state" / "trainer.pt", weights_only=False)
    assert state["done"] == 2                             # the last good iteration
    resumed = train(tiny("esd"), pipe, None, None, tmp_path / "run")
    assert same_weights(resumed.unet, straight_run.unet)


def test_cuda_out_of_memory_becomes_advice(pipe, tmp_path, monkeypatch):
    def oom(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(recipe.ESDTrainer, "run", oom)
    with pytest.raises(TrainingError, match="ran out of memory during esd.*gradient_checkpointing"):
        train(tiny("esd"), pipe, None, None, tmp_path)


# ---- the job -----------------------------------------------------------------------------------------

def test_training_job_reads_its_run_and_writes_into_it(tmp_path):
    from recare.runs import RunStore

    model = make_tiny_pipeline(tmp_path / "model")
    (tmp_path / "careset.json").write_text(json.dumps(CARESET))
    config = tiny("recare-no-adv", model=str(model), careset=str(tmp_path / "careset.json"), device="cpu")
    run = RunStore(tmp_path / "runs").create("train", recipe.job_config(config))
    events = []
    result = recipe.run_training_job(run, events.append, run.cancel_token())
    assert result["phases"]["stage2"]["iterations"] == 3 and len(events) == 3
    saved = run.config()
    assert TrainConfig.from_dict(saved["train"]) == config and "versions" in saved
    assert (run.path / "trained_params.safetensors").is_file() and (run.path / "careset.json").is_file()
    assert not (run.path / "metrics.jsonl").exists()   # the runner's reporter writes it, not the recipe


# ---- the saved state is data, never code ----------------------------------------------------------------

class _Planted:
    """A pickle that would create a file when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_placed_in_the_state_runs_no_code_and_the_run_is_not_resumable(pipe, tmp_path):
    from recare.errors import StateError

    token = CancelToken()
    with pytest.raises(Cancelled):
        train(tiny("esd"), pipe, None, None, tmp_path, progress=lambda e: token.cancel(), cancel=token)
    marker = tmp_path / "code-ran"
    torch.save({"format": "x", "payload": _Planted(marker)}, tmp_path / "state" / "state.pt")
    with pytest.raises(StateError, match="damaged or was not written by a training run"):
        train(tiny("esd"), pipe, None, None, tmp_path)
    assert not marker.exists()


def test_a_truncated_state_fails_the_job_as_not_resumable_with_the_reason(tmp_path):
    from recare.errors import RunError
    from recare.jobs import JobRunner, run_job
    from recare.runs import FAILED, RunStore

    model = make_tiny_pipeline(tmp_path / "model")
    config = tiny("esd", model=str(model), device="cpu")
    store = RunStore(tmp_path / "runs")
    run = store.create("train", recipe.job_config(config), target="recare.train.recipe:run_training_job")
    run.request_cancel()  # stops at the first check: a state is saved
    assert run_job(run, "recare.train.recipe:run_training_job")["state"] == "cancelled"
    state = run.state_dir / "state.pt"
    state.write_bytes(state.read_bytes()[:40])  # a save cut short
    run.cancel_path.unlink()
    status = run_job(run, "recare.train.recipe:run_training_job")
    assert status["state"] == FAILED and status["resumable"] is False
    assert "cannot be resumed" in status["error"] and "PytorchStreamReader" not in status["error"]
    with pytest.raises(RunError, match="cannot be resumed: the run's saved state is damaged"):
        JobRunner(store).resume(run.id)
