"""An evaluation run on tiny models: run folder, determinism, resume, job, CLI, 2-process scale-out, errors."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from recare.config import ConfigError
from recare.errors import Cancelled, EvaluationError, ModelLoadError
from recare.eval.config import EvaluationConfig
from recare.eval.distributed import Processes
from recare.eval.records import RECORD_FIELDS, read_records
from recare.eval.run import evaluate
from recare.eval.run_metrics import compute_metrics
from tests.helpers_tiny import make_tiny_eval_world

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run here on one CPU thread, as each process of the scale-out test (torchrun sets OMP_NUM_THREADS=1):
    a float sum split over another number of threads rounds differently, and the records are compared bit for bit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    captions = "a photo of a fish\n\na man on the grass\na boat on a lake\n"
    return make_tiny_eval_world(tmp_path_factory.mktemp("tiny-eval"), captions)


def settings(tiny, **changes) -> EvaluationConfig:
    """Every image set on tiny models: 4 attacks x 2 seeds, 2 CARE prompts x 2 seeds, 3 captions."""
    base = dict(model=str(tiny / "pipeline"), target_prompt="a photo of a fish", target_concept="tench",
                initializer_token="man", care_prompts={"water": ["a lake", "a river"]}, care_labels=["person", "fish"],
                encoder=str(tiny / "clip"), detector="oracle", clip_prompts=str(tiny / "captions.txt"), seeds=2,
                care_images_per_prompt=2, steps=2, height=64, width=64, batch_size=2, cce_images=2, cce_steps=2,
                reference_images="base", attack_runs=1, device="cpu")
    return EvaluationConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def first_run(tiny, tmp_path_factory):
    return evaluate(settings(tiny), out=tmp_path_factory.mktemp("runs"))


def test_run_folder(first_run):
    run = first_run.run_dir
    assert {"config.json", "manifest.json", "metrics.json", "records.csv", "images", "reference", "cce",
            "shards"} <= {p.name for p in run.iterdir()}
    records = read_records(run)
    assert len(records) == 4 * 2 + 2 * 2 + 3 and records == first_run.records
    assert [r["index"] for r in records] == list(range(len(records)))
    assert all((run / r["file"]).is_file() for r in records)
    assert {(r["attack"], r["seed"]) for r in records if r["attack"] == "cce"} == {("cce", 42), ("cce", 43)}
    care = [r for r in records if r["attack"] == "care"]
    assert all(isinstance(r["care_hit"], bool) and len(r["care_top_labels"]) == 1 for r in care)
    assert [r["clip_cosine"] is not None for r in records] == [r["attack"] == "clip" for r in records]
    header = (run / "records.csv").read_text().splitlines()[0]
    assert header == ",".join(RECORD_FIELDS)

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == first_run.metrics
    assert list(metrics["asr"]) == ["erased", "cce", "completion", "noise"]
    for attack, asr in metrics["asr"].items():
        hits = [r["positive"] for r in records if r["attack"] == attack]
        assert asr == pytest.approx(100.0 * sum(hits) / len(hits))
    assert set(metrics["care_score"]["per_concept"]) == {"water"}
    assert metrics["care_score"]["labels"] == ["person", "fish", "water"]
    assert metrics["ratio"]["clip_range"] == [0.25, 0.32] and metrics["ratio"]["value"] is not None
    assert metrics == compute_metrics(records, EvaluationConfig.from_dict(first_run.manifest["config"]))

    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["format"] == "recare-evaluation"
    assert manifest["generation"]["steps"] == 2 and manifest["generation"]["base_seed"] == 42
    assert manifest["model"]["scheduler"]["class"] == "DDIMScheduler"
    assert manifest["model"]["unet_fingerprint"] == manifest["model"]["base_unet_fingerprint"]
    assert manifest["detector"]["name"] == "oracle" and manifest["detector"]["settings"]["concept"] == "tench"
    assert manifest["encoder"]["identity"].startswith("hf-clip:")
    assert manifest["care"]["labels"] == ["person", "fish", "water"]
    assert manifest["attacks"]["cce"]["settings"]["textual_inversion"]["steps"] == 2
    assert manifest["attacks"]["cce"]["token_file"]["sha256"]
    assert manifest["reference_images"]["source"] == "base" and manifest["reference_images"]["count"] == 2
    assert {"torch", "diffusers", "transformers", "python", "accelerate"} <= set(manifest["versions"])


def test_same_settings_same_numbers(tiny, first_run, tmp_path):
    again = evaluate(settings(tiny), out=tmp_path)
    assert again.run_dir != first_run.run_dir
    assert again.metrics == first_run.metrics
    assert (again.run_dir / "records.csv").read_bytes() == (first_run.run_dir / "records.csv").read_bytes()


def test_resume_makes_only_the_missing_images(tiny, first_run, tmp_path, monkeypatch):
    from recare.eval import run as run_module

    calls = []
    real_render = run_module.render

    def counting(pipe, prompts, seeds, config, call=None):
        calls.append(len(seeds))
        return real_render(pipe, prompts, seeds, config, call)

    monkeypatch.setattr(run_module, "render", counting)

    from recare.progress import CancelToken

    cancel = CancelToken()

    def stop_after_two_batches(event):
        if event.stage == "evaluate" and event.step >= 4:
            cancel.cancel()

    with pytest.raises(Cancelled):
        evaluate(settings(tiny), out=tmp_path, progress=stop_after_two_batches, cancel=cancel)
    (run_dir,) = tmp_path.iterdir()
    made = sum(calls)
    assert made == 4 and not (run_dir / "metrics.json").exists()
    calls.clear()
    result = evaluate(None, run_dir=run_dir)   # settings from the folder's config.json
    assert sum(calls) == len(first_run.records) - made
    assert (run_dir / "records.csv").read_bytes() == (first_run.run_dir / "records.csv").read_bytes()
    assert result.metrics == first_run.metrics
    calls.clear()
    evaluate(settings(tiny), run_dir=run_dir)   # nothing left to make
    assert calls == []
    with pytest.raises(EvaluationError, match="other settings.*seeds"):
        evaluate(settings(tiny, seeds=3), run_dir=run_dir)


def test_job_target(tiny, first_run, tmp_path):
    from recare.jobs import JobRunner
    from recare.runs import DONE, RunStore

    runner = JobRunner(RunStore(tmp_path / "runs"), use_processes=False)
    try:
        config = {"evaluation": settings(tiny, attacks=["erased"]).to_dict()}
        run = runner.submit("evaluate", "recare.eval.run:run_evaluation_job", config)
        status = runner.wait(run.id, timeout=120)
    finally:
        runner.shutdown()
    assert status["state"] == DONE, status.get("error")
    assert status["result"]["metrics"]["asr"] == {"erased": first_run.metrics["asr"]["erased"]}
    assert (run.path / "records.csv").is_file() and (run.path / "manifest.json").is_file()


def test_cli_evaluate(tiny, first_run, tmp_path, capsys):
    from recare.cli import main

    argv = ["evaluate", "--model", str(tiny / "pipeline"), "--target-prompt", "a photo of a fish", "--target-concept",
            "tench", "--initializer-token", "man", "--care-prompts", f"water={tiny / 'water.txt'}",
            "--encoder", str(tiny / "clip"), "--detector", "oracle", "--clip-prompts", str(tiny / "captions.txt"),
            "--seeds", "2", "--care-images-per-prompt", "2", "--steps", "2", "--height", "64", "--width", "64",
            "--batch-size", "2", "--cce-images", "2", "--cce-steps", "2", "--reference-images", "base",
            "--device", "cpu", "--out", str(tmp_path)]
    (tiny / "water.txt").write_text("a lake\na river\n")
    assert main(argv + ["--config", str(first_run.run_dir / "manifest.json")]) == 0   # care labels from the manifest
    out = capsys.readouterr().out.strip().splitlines()
    run_dir = Path(out[-1])
    assert run_dir.parent == tmp_path and out[-2].startswith("ASR erased")
    assert json.loads((run_dir / "metrics.json").read_text()) == first_run.metrics
    assert main(["evaluate", "--resume", str(run_dir), "--seeds", "3"]) == 2
    assert "--resume continues" in capsys.readouterr().err


def test_help_gives_every_default(capsys):
    import argparse

    from recare.cli import build_parser, main

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--unet", "--task", "--target-prompt", "--care-prompts", "--attacks", "--seeds",
                 "--detector", "--encoder", "--out", "--resume", "--cce-steps", "--noise-eta"):
        assert flag in text
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    options = [a for a in sub.choices["evaluate"]._actions if a.option_strings and a.dest != "help"]
    assert len(options) > 30
    for action in options:
        assert "default" in action.help, f"{action.option_strings[0]} has no default in --help"


@pytest.mark.parametrize("change, error, match", [
    ({"detector": "no-such-detector"}, EvaluationError, "unknown detector 'no-such-detector'"),
    ({"detector": "torchvision-classifier", "detector_options": {"weights_path": "/nonexistent/resnet50.pth"}},
     EvaluationError, "no classifier weights at /nonexistent/resnet50.pth"),
    ({"attacks": ["erased", "unlearndiff"]}, ConfigError, "unknown attack"),
    ({"attacks": ["adversarial"]}, ConfigError, "'adversarial' attack uses the learned tokens"),
    ({"task": "tench"}, ConfigError, "--task names a mini-world task"),
], ids=["unknown-detector", "classifier-weights-offline", "unknown-attack", "no-tokens", "task-off-world"])
def test_clear_errors_before_anything_is_written(tiny, tmp_path, change, error, match):
    with pytest.raises(error, match=match):
        evaluate(settings(tiny, **change), out=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_empty_prompt_file(tiny, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(EvaluationError, match="prompt file .* is empty"):
        evaluate(settings(tiny, clip_prompts=str(tmp_path / "empty.txt")), out=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_model_and_unet_that_do_not_match(tiny, tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"conv_in.weight": torch.zeros(8, 4, 3, 3)}, str(tmp_path / "trained_params.safetensors"))
    with pytest.raises(ModelLoadError, match="does not fit this base model.*conv_in.weight"):
        evaluate(settings(tiny, unet=str(tmp_path)), out=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _ThreadGroup:
    """Two evaluation "processes" as two threads: a barrier and a broadcast box instead of gloo."""

    def __init__(self, count: int):
        self.barrier = threading.Barrier(count, timeout=600)
        self.box: list = [None]


@dataclasses.dataclass
class _ThreadProcesses(Processes):
    group: _ThreadGroup | None = None

    def barrier(self) -> None:
        self.group.barrier.wait()

    def broadcast(self, value):
        if self.is_main:
            self.group.box[0] = value
        self.group.barrier.wait()
        got = self.group.box[0]
        self.group.barrier.wait()   # nobody overwrites the box before everyone has read it
        return got


def test_two_shards_in_threads_merge_to_the_single_process_records(tiny, first_run, tmp_path, monkeypatch):
    """The fast twin of the launched 2-process test below (marked slow): the same engine with its
    batches split round robin, one shard each, a barrier and the main's merge, in two threads."""
    import recare.eval.run as engine

    group, local = _ThreadGroup(2), threading.local()
    monkeypatch.setattr(engine, "processes", lambda device="auto": local.procs)
    # no lock here: the library's own (recare.models.construction) makes concurrent loads safe
    results, errors = {}, []

    def process(index: int):
        local.procs = _ThreadProcesses(index=index, count=2, device="cpu", group=group)
        try:
            results[index] = evaluate(settings(tiny), out=tmp_path / "runs")
        except BaseException as e:  # noqa: BLE001  (reported below; a stuck barrier would hide it)
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    run_dir = results[0].run_dir
    assert results[1].run_dir == run_dir and results[1].metrics == {}
    assert sorted(p.name for p in (run_dir / "shards").iterdir()) == ["records-p0-of-2.jsonl", "records-p1-of-2.jsonl"]
    assert json.loads((run_dir / "manifest.json").read_text())["processes"] == 2
    assert (run_dir / "records.csv").read_bytes() == (first_run.run_dir / "records.csv").read_bytes()
    assert json.loads((run_dir / "metrics.json").read_text()) == first_run.metrics


@pytest.mark.slow
def test_two_processes_merge_to_the_single_process_records(tiny, first_run, tmp_path):
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"evaluation": settings(tiny).to_dict()}))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "recare", "evaluate", "--config", str(config),
               "--out", str(tmp_path / "runs")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert done.stdout.strip().splitlines()[-1] == str(run_dir)
    assert sorted(p.name for p in (run_dir / "shards").iterdir()) == ["records-p0-of-2.jsonl", "records-p1-of-2.jsonl"]
    assert json.loads((run_dir / "manifest.json").read_text())["processes"] == 2
    assert (run_dir / "records.csv").read_bytes() == (first_run.run_dir / "records.csv").read_bytes()
    assert json.loads((run_dir / "metrics.json").read_text()) == first_run.metrics


def test_mini_world_settings_come_from_recare_json():
    from recare.eval.config import resolve_config
    from recare.worldspec import mini_world_spec, mini_world_tasks

    spec = mini_world_spec()["evaluation"]
    c = resolve_config(EvaluationConfig(task="van_gogh"))
    assert c.target_prompt == "a painting in the style of van gogh" and c.prompt_style == "painting"
    assert c.detector == "oracle" and c.detector_options == {"concept": "van gogh"}
    assert c.care_prompts["stars"][0] == "a photo of stars" and c.encoder == "mini-world"
    assert c.clip_range == [spec["clip_range"]["floor"], spec["clip_range"]["ceiling"]]
    assert (c.seeds, c.cce_steps, c.cce_images, c.steps) == (spec["seeds"], spec["cce_steps"], 6, 25)
    assert c.attacks == ["erased", "cce", "completion", "noise"] and c.reference_images == "base"
    assert c.attack_runs == spec["attack_runs"] and (c.ud_timesteps, c.ud_iterations) == (
        spec["ud"]["timesteps"], spec["ud"]["iterations"])
    van_gogh = {t["name"]: t for t in mini_world_tasks()}["van_gogh"]
    assert c.ud_prompts == van_gogh["ud_prompts"] and c.ud_k == 3
    assert resolve_config(c) == c   # resolving twice changes nothing (a resumed run compares them)
    paper = resolve_config(EvaluationConfig(model="CompVis/stable-diffusion-v1-4", target_prompt="A photo of a tench",
                                            target_concept="tench"))
    assert (paper.seeds, paper.cce_steps, paper.cce_images, paper.steps) == (500, 3000, 30, 50)
    assert paper.clip_range == [0.25, 0.32] and paper.detector == "torchvision-classifier"
    assert paper.encoder == "open_clip:ViT-B-32/openai" and len(paper.care_labels) == 82
    assert dataclasses.replace(paper, care_prompts={}).care_prompts == {}


def test_cce_cancelled_mid_inversion_resumes_to_the_same_token(tiny, tmp_path):
    from safetensors.torch import load_file

    from recare.eval.attacks import learn_cce_token
    from recare.eval.scoring import load_models
    from recare.progress import CancelToken

    config = settings(tiny, attacks=["cce"], cce_steps=4, clip_prompts=None, care_prompts={})
    cancel = CancelToken()

    def stop_at_step_2(event):
        if event.stage == "cce" and event.step == 2:
            cancel.cancel()

    with pytest.raises(Cancelled):
        evaluate(config, out=tmp_path, progress=stop_at_step_2, cancel=cancel)
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "cce" / "state.pt").is_file() and not (run_dir / "cce" / "token.safetensors").exists()
    steps = []
    evaluate(None, run_dir=run_dir, progress=lambda e: steps.append(e.step) if e.stage == "cce" else None)
    assert steps == [3, 4] and not (run_dir / "cce" / "state.pt").exists()
    resumed = load_file(str(run_dir / "cce" / "token.safetensors"))["<cce*>"]
    from recare.eval.config import resolve_config
    from recare.eval.run import _load_png

    references = [_load_png(p) for p in sorted((run_dir / "reference").glob("*.png"))]
    straight = learn_cce_token(load_models(resolve_config(config), "cpu").pipe, references, resolve_config(config))
    assert torch_equal(resumed, straight.embedding)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a.float(), b.float()))


def test_cli_extra_prompts_become_the_configs_custom_prompts():
    from recare.cli import build_parser
    from recare.cli_evaluate import _evaluation_config

    args = build_parser().parse_args(["evaluate", "--task", "tench", "--extra-prompt", "a tench in a bucket",
                                      "--extra-prompt", "a lake at dawn"])
    config, given = _evaluation_config(args)
    assert config.extra_prompts == ["a tench in a bucket", "a lake at dawn"] == given["extra_prompts"]
    none = _evaluation_config(build_parser().parse_args(["evaluate", "--task", "tench"]))[0]
    assert none.extra_prompts == []


# ---- learned attacks as spreads ------------------------------------------------------------------

def _record(attack, run, positive, seed=42):
    return {"index": 0, "attack": attack, "run": run, "concept": "tench", "prompt": "p", "attack_prompt": "",
            "seed": seed, "file": f"images/{attack}/r{run}-s{seed}.png", "detector_score": float(positive),
            "positive": positive, "detector_labels": {}, "care_hit": None, "care_top_labels": None, "clip_cosine": None}


def test_spread_bookkeeping_by_hand(tmp_path):
    """asr_runs per run, asr = their mean, asr_worst = their max, single attacks untouched; from records.csv too."""
    config = EvaluationConfig(model="tiny", target_prompt="p", target_concept="tench", attacks=["erased", "cce", "ud"],
                              care_prompts={}, clip_range=[0.0, 1.0], attack_runs=3)
    records = [_record("erased", 0, p, 42 + i) for i, p in enumerate([True, False, False, False])]
    cce = {0: [True, True, True, False], 1: [False, False, False, False], 2: [True, False, False, False]}
    ud = {0: [True, True], 1: [True, False], 2: [True, True]}
    for attack, runs in (("cce", cce), ("ud", ud)):
        records += [_record(attack, r, p, 42 + i) for r, hits in runs.items() for i, p in enumerate(hits)]
    metrics = compute_metrics(records, config)
    assert metrics["asr_runs"] == {"cce": [75.0, 0.0, 25.0], "ud": [100.0, 50.0, 100.0]}
    assert metrics["asr"] == {"erased": 25.0, "cce": pytest.approx(100 / 3), "ud": pytest.approx(250 / 3)}
    assert metrics["asr_worst"] == {"cce": 75.0, "ud": 100.0}
    assert "erased" not in metrics["asr_runs"] and metrics["asr_counts"]["cce"] == [4, 12]
    assert metrics["asr_run_counts"]["cce"] == [[3, 4], [0, 4], [1, 4]]
    # the same numbers come back from records.csv (the run index is a column)
    from recare.eval.records import write_records_csv

    for i, r in enumerate(records):
        r["index"] = i
    write_records_csv(tmp_path / "records.csv", records)
    assert "run" in (tmp_path / "records.csv").read_text().splitlines()[0].split(",")
    again = read_records(tmp_path)
    assert [r["run"] for r in again] == [r["run"] for r in records]
    assert compute_metrics(again, config) == metrics


def test_records_without_a_run_column_read_as_run_zero(tmp_path):
    old_fields = [f for f in RECORD_FIELDS if f not in ("run", "attack_prompt")]
    row = _record("cce", 0, True)
    (tmp_path / "records.csv").write_text(",".join(old_fields) + "\n" + ",".join(
        json.dumps(row[f]) if not isinstance(row[f], str) else row[f] for f in old_fields) + "\n")
    (record,) = read_records(tmp_path)
    assert record["run"] == 0 and record["attack_prompt"] == "" and record["positive"] is True


def test_learned_attacks_run_several_times(tiny, tmp_path):
    """CCE and UnlearnDiff twice each: their own seeds, CCE images and tokens, one records.csv with run indices,
    metrics.json recomputed from records.csv."""
    config = settings(tiny, attacks=["erased", "cce", "ud"], attack_runs=2, care_prompts={}, ud_prompts=["a fish"],
                      ud_timesteps=1, ud_iterations=2)
    result = evaluate(config, out=tmp_path)
    run = result.run_dir
    records = read_records(run)
    by_run = {(r["attack"], r["run"]) for r in records}
    assert by_run >= {("erased", 0), ("cce", 0), ("cce", 1), ("ud", 0), ("ud", 1)} and ("erased", 1) not in by_run
    assert len([r for r in records if r["attack"] == "cce"]) == 2 * 2
    m = result.metrics
    assert len(m["asr_runs"]["cce"]) == 2 and len(m["asr_runs"]["ud"]) == 2
    for attack in ("cce", "ud"):
        assert m["asr"][attack] == pytest.approx(sum(m["asr_runs"][attack]) / 2)
        assert m["asr_worst"][attack] == max(m["asr_runs"][attack])
        for k in (0, 1):
            hits = [r["positive"] for r in records if r["attack"] == attack and r["run"] == k]
            assert m["asr_runs"][attack][k] == pytest.approx(100.0 * sum(hits) / len(hits))
    assert m == compute_metrics(records, EvaluationConfig.from_dict(result.manifest["config"]))
    # run 1 has its own reference images, its own token (another seed) and its own image files
    assert (run / "reference" / "run1" / "000.png").is_file() and (run / "cce" / "run1" / "token.safetensors").is_file()
    assert (run / "reference" / "000.png").read_bytes() != (run / "reference" / "run1" / "000.png").read_bytes()
    assert (run / "cce" / "token.safetensors").read_bytes() != (run / "cce" / "run1" / "token.safetensors").read_bytes()
    assert all(r["file"].startswith("images/cce/run1/") for r in records if r["attack"] == "cce" and r["run"] == 1)
    manifest = result.manifest
    assert manifest["attacks"]["cce"]["runs"] == 2 and len(manifest["attacks"]["cce"]["token_files"]) == 2
    assert manifest["attacks"]["cce"]["settings"]["textual_inversion"]["seed"] == config.cce_seed
    ud = {r: json.loads((run / "ud" / f"run{r}" / "results.json").read_text()) for r in (0, 1)}
    for r in (0, 1):
        (res,) = ud[r].values()
        shown = {x["attack_prompt"] or x["prompt"] for x in records if x["attack"] == "ud" and x["run"] == r}
        assert shown == {res["final_prompt"]} and res["prompt"] == "a fish"
    # resume of a finished run makes nothing again and gives the same numbers
    again = evaluate(None, run_dir=run)
    assert again.metrics == m
