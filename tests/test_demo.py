"""The reviewer demo: packing evaluation runs into a bundle (size limit, checks, CLI), the re-run job on
tiny models (train, then evaluate; resumable), and the app listing the bundled results read-only for
every browser and drawing them at once."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from recare import demo
from recare.config import ConfigError, ESDConfig, RolloutConfig, TrainConfig
from recare.eval.config import EvaluationConfig
from recare.eval.run import evaluate
from recare.jobs import run_job
from recare.runs import CANCELLED, DONE, RunStore
from tests.helpers_tiny import make_tiny_eval_world

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_eval_world(tmp_path_factory.mktemp("tiny-demo"))


def eval_settings(tiny, **changes) -> EvaluationConfig:
    """The erased attack x 3 seeds, 2 CARE prompts x 2 seeds, 3 captions, on tiny models."""
    base = dict(model=str(tiny / "pipeline"), target_prompt="a photo of a fish", target_concept="tench",
                care_prompts={"water": ["a lake", "a river"]}, care_labels=["person", "fish"], attacks=["erased"],
                encoder=str(tiny / "clip"), detector="oracle", clip_prompts=str(tiny / "captions.txt"), seeds=3,
                care_images_per_prompt=2, steps=2, height=64, width=64, batch_size=4, device="cpu")
    return EvaluationConfig(**{**base, **changes})


def esd_settings(tiny) -> dict:
    """What `recare.demo.rerun_job` submits for a trained model, with a 2-iteration ESD on the tiny pipeline."""
    train = TrainConfig.for_method("esd", model=str(tiny / "pipeline"), target_prompt="a photo of a fish",
                                   reference_word="tench", esd=ESDConfig(iterations=2, learning_rate=1e-3),
                                   rollout=RolloutConfig(steps=10, resolution=16), save_every=1, device="cpu")
    return {"command": "demo-rerun", "train": train.to_dict(), "task": None,
            "evaluation": eval_settings(tiny).to_dict(), "compare": {"label": "tiny · ESD (re-run)"}}


@pytest.fixture(scope="module")
def base_run(tiny, tmp_path_factory):
    return evaluate(eval_settings(tiny), out=tmp_path_factory.mktemp("eval-runs")).run_dir


@pytest.fixture(scope="module")
def esd_run(tiny, tmp_path_factory):
    """A re-run job of a trained model, run to the end in this process."""
    store = RunStore(tmp_path_factory.mktemp("rerun-store"))
    run = store.create("evaluate", esd_settings(tiny), target=demo.RERUN_TARGET, device="cpu")
    status = run_job(run, demo.RERUN_TARGET)
    assert status["state"] == DONE, status
    return run


def test_rerun_job_trains_then_evaluates_into_its_own_folder(esd_run):
    path = esd_run.path
    metrics = json.loads((path / "metrics.json").read_text())
    assert set(metrics["asr"]) == {"erased"} and metrics["care_score"]["per_concept"].keys() == {"water"}
    assert (path / "train" / "trained_params.safetensors").is_file() and (path / "train" / "result.json").is_file()
    # the run folder says which UNet it evaluated, and the manifest shows it was not the base UNet
    assert esd_run.config()["evaluation"]["unet"] == str(path / "train")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["model"]["unet_fingerprint"] != manifest["model"]["base_unet_fingerprint"]
    result = esd_run.status()["result"]
    assert result["metrics"] == metrics and result["train"]["phases"]
    # Compare's training-speed estimate never reads it (kind "evaluate"), its metrics lines carry the training loss
    assert esd_run.kind == "evaluate" and any(r["stage"] == "esd" for r in esd_run.read_metrics())


def test_rerun_job_resumes_by_parts_to_the_same_result(tiny, esd_run, tmp_path):
    store = RunStore(tmp_path / "runs")
    run = store.create("evaluate", esd_settings(tiny), target=demo.RERUN_TARGET, device="cpu")
    # cancel in the training part, after its first iteration
    cancelled = run_job(run, demo.RERUN_TARGET, listener=lambda e: e.stage == "esd" and run.request_cancel())
    assert cancelled["state"] == CANCELLED and cancelled["resumable"], cancelled
    assert not (run.path / "metrics.json").exists() and (run.path / "train" / "state").is_dir()
    run.cancel_path.unlink()
    assert run_job(run, demo.RERUN_TARGET)["state"] == DONE
    resumed, straight = (load_file(r / "train" / "trained_params.safetensors") for r in (run.path, esd_run.path))
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    metrics = [json.loads((r / "metrics.json").read_text()) for r in (run.path, esd_run.path)]
    assert metrics[0] == metrics[1]
    # once trained, a rerun of the job does not train again: only the evaluation part runs (all its images exist)
    again = run_job(run, demo.RERUN_TARGET)
    assert again["state"] == DONE and again["result"]["train"] == {"reused": True}


@pytest.fixture(scope="module")
def bundle(base_run, esd_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "demo"
    return demo.pack_demo({"tiny": {"base": base_run, "esd": esd_run.path}}, out, grid_seeds=2,
                          command="python -m recare demo pack ...")


def test_pack_writes_trimmed_read_only_run_folders_and_an_index(bundle, base_run, esd_run):
    index = json.loads((bundle / "index.json").read_text())
    assert index["format"] == "recare-demo" and index["tasks"] == ["tiny"] and index["models"] == ["base", "esd"]
    assert index["pack_command"] == "python -m recare demo pack ..."
    assert [e["run"] for e in index["runs"]] == ["evaluate-demo-tiny-base", "evaluate-demo-tiny-esd"]
    total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert total <= demo.MAX_BYTES and abs(index["bytes"] - total) < 64
    for entry, source in zip(index["runs"], (base_run, esd_run.path)):
        folder = bundle / entry["run"]
        assert {p.name for p in folder.iterdir()} == {"config.json", "status.json", "manifest.json", "metrics.json",
                                                      "grid.png", "records.csv"}  # no images/, shards/, train/
        assert (folder / "metrics.json").read_bytes() == (source / "metrics.json").read_bytes()
        status = json.loads((folder / "status.json").read_text())
        assert status["state"] == DONE and status["kind"] == "evaluate" and status["id"] == entry["run"]
        config = json.loads((folder / "config.json").read_text())
        assert config["compare"]["label"] == entry["label"] and config["demo"]["source_run"] == source.name
        assert EvaluationConfig.from_dict(config["evaluation"]).seeds == 3
        # the grid: 2 seeds of the target prompt over 2 seeds of the first CARE prompt, 64 px cells
        with Image.open(folder / "grid.png") as grid:
            assert grid.size == (2 * 64 + 2, 2 * 64 + 2)
        assert [(r["attack"], r["prompt"], r["seeds"]) for r in entry["grid"]["rows"]] == [
            ("erased", "a photo of a fish", [42, 43]), ("care", "a lake", [42, 43])]
    base, esd = index["runs"]
    assert base["label"] == "tiny · base" and esd["label"] == "tiny · ESD"
    assert base["method"] is None and esd["method"] == "esd"
    config_file = bundle / "evaluate-demo-tiny-base" / "config.json"
    assert base["rerun"]["commands"] == [f"python -m recare evaluate --config {config_file}"]
    assert base["rerun"]["evaluation"]["unet"] is None and esd["rerun"]["evaluation"]["unet"] is None
    assert esd["made_by"]["train_run"] == "train" and esd["made_by"]["train"]["esd"]["iterations"] == 2
    assert esd["rerun"]["train"] is None  # "tiny" is no mini-world task: no recommended training to re-run
    assert demo.bundled_runs(bundle) == [bundle / "evaluate-demo-tiny-base", bundle / "evaluate-demo-tiny-esd"]


def test_pack_refuses_a_bundle_over_the_limit_and_keeps_the_previous_one(bundle, base_run, tmp_path):
    before = (bundle / "index.json").read_bytes()
    with pytest.raises(ConfigError, match=r"would be 0\.\d\d MiB, over its limit of 0\.01 MiB"):
        demo.pack_demo({"tiny": {"base": base_run}}, bundle, max_bytes=10_000)
    assert (bundle / "index.json").read_bytes() == before
    assert not any(p.name.startswith(".demo.") for p in bundle.parent.iterdir())  # no temporary folder left
    with pytest.raises(ConfigError, match="over its limit"):
        demo.pack_demo({"tiny": {"base": base_run}}, tmp_path / "new", max_bytes=10_000)
    assert not (tmp_path / "new").exists()


def test_pack_refuses_wrong_runs_with_a_clear_message(base_run, esd_run, tmp_path):
    cases = [({"tiny": {"esd": base_run}}, "evaluated the base model, but is given as tiny:esd"),
             ({"tiny": {"base": esd_run.path}}, "evaluated trained weights, but is given as tiny:base"),
             ({"tiny": {"recare": esd_run.path}}, "trained with the method 'esd' \\(train\\), but is given as "
                                                   "tiny:recare"),
             ({"tiny": {"sd": base_run}}, "unknown demo model 'sd'"),
             ({"tiny": {"base": tmp_path}}, "not a finished evaluation run: it has no config.json"),
             ({"ti/ny": {"base": base_run}}, "must be letters, digits"),
             ({}, "nothing to pack")]
    for evaluations, message in cases:
        with pytest.raises(ConfigError, match=message):
            demo.pack_demo(evaluations, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_cli_demo_pack(base_run, tmp_path, capsys):
    from recare.cli import main

    out = tmp_path / "assets" / "demo"
    assert main(["demo", "pack", "--eval", f"tiny:base={base_run}", "--out", str(out), "--grid-seeds", "3"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    index = json.loads((out / "index.json").read_text())
    assert index["pack_command"] == f"python -m recare demo pack --eval tiny:base={base_run} --out {out} --grid-seeds 3"
    assert index["runs"][0]["grid"]["rows"][0]["seeds"] == [42, 43, 44]
    assert main(["demo", "pack", "--eval", f"tiny-base={base_run}", "--out", str(out)]) == 2
    assert "--eval takes TASK:MODEL=RUN" in capsys.readouterr().err


def test_rerun_job_settings_use_the_worlds_recommended_training():
    """For a mini-world task the re-run trains with `task_train_config` (as `recare train --task T --method M`)."""
    from recare.workflows import mini_world_task, task_train_config

    try:
        expected = task_train_config(mini_world_task("tench"), "esd", device="cpu").to_dict()
    except ConfigError:
        pytest.skip("the mini world is not installed")
    evaluation = EvaluationConfig(task="tench", attacks=["erased"], seeds=2, unet="/elsewhere/train-1").to_dict()
    entry = {"run": "evaluate-demo-tench-esd", "task": "tench", "model": "esd", "method": "esd",
             "label": "tench · ESD", "rerun": {"task": "tench", "train": demo.rerun_train_config("tench", "esd"),
                                               "evaluation": {**evaluation, "unet": None}}}
    target, settings = demo.rerun_job(entry, "cpu")
    assert target == demo.RERUN_TARGET and settings["train"] == expected and settings["task"] == "tench"
    assert settings["evaluation"]["unet"] is None and settings["evaluation"]["device"] == "cpu"
    assert settings["compare"]["label"] == "tench · ESD (re-run)"
    base_target, base = demo.rerun_job({**entry, "model": "base", "method": None, "label": "tench · base",
                                        "rerun": {"train": None, "evaluation": evaluation}}, "cpu")
    assert base_target == demo.EVALUATE_TARGET and "train" not in base and base["evaluation"]["unet"] is None
    with pytest.raises(ConfigError, match="cannot be re-run"):
        demo.rerun_job({**entry, "rerun": {"train": None, "evaluation": evaluation}}, "cpu")


# ---------------------------------------------------------------------------------------------
# the app


@pytest.fixture(scope="module")
def demo_app(bundle, tmp_path_factory):
    """The app launched with the bundle (on the mini world, or the tiny stand-in world)."""
    import ui
    from tests.test_app_fixtures import runs_dir_of, world_env

    with world_env(tmp_path_factory.getbasetemp().parent / "recare-app-shared"):
        workspace = tmp_path_factory.mktemp("demo-workspace")
        runs = runs_dir_of(workspace)
        app = ui.create_app(workspace=workspace, device="cpu", runs_dir=runs, demo_dir=bundle)
        app.queue(default_concurrency_limit=4)
        _, url, _ = app.launch(prevent_thread_lock=True, quiet=True, **ui.launch_kwargs(workspace, runs_dir=runs))
        try:
            yield {"url": url, "app": app, "runs": runs, "workspace": workspace, "bundle": bundle}
        finally:
            app.close()


def _client(demo_app):
    from gradio_client import Client

    return Client(demo_app["url"], verbose=False, download_files=str(demo_app["workspace"].parent / "downloads"))


def test_app_opens_on_compare_with_the_bundled_results_selected(demo_app):
    config = demo_app["app"].config
    tabs = next(c for c in config["components"] if c["type"] == "tabs")
    assert tabs["props"]["selected"] == "compare"
    by_id = {c.get("props", {}).get("elem_id"): c for c in config["components"]}
    assert by_id["compare-evaluations"]["props"]["value"] == ["evaluate-demo-tiny-base", "evaluate-demo-tiny-esd"]
    assert by_id["demo-task"]["props"]["value"] == "tiny"
    # the demo panel is the first thing in the Compare tab
    def find(layout, wanted):
        if layout["id"] == wanted:
            return layout
        return next((f for child in layout.get("children", []) if (f := find(child, wanted))), None)

    compare_tab = next(c for c in config["components"] if c["type"] == "tabitem" and c["props"].get("id") == "compare")
    first = find(config["layout"], compare_tab["id"])["children"][0]["id"]
    assert first == by_id["demo-panel"]["id"]


def test_app_without_a_bundle_opens_as_before(tmp_path):
    import ui

    app = ui.create_app(workspace=tmp_path / "ws", device="cpu", runs_dir=tmp_path / "runs", demo_dir=tmp_path / "none")
    tabs = next(c for c in app.config["components"] if c["type"] == "tabs")
    assert tabs["props"].get("selected") is None
    assert not any(c.get("props", {}).get("elem_id") == "demo-panel" for c in app.config["components"])


def test_every_browser_lists_the_bundled_results_read_only(demo_app):
    from ui.common import new_browser_key

    client = _client(demo_app)
    bundled = {"evaluate-demo-tiny-base", "evaluate-demo-tiny-esd"}
    for key in (new_browser_key(), new_browser_key()):
        listed = client.predict([], key, api_name="/evaluate_list")
        assert bundled <= {v for _, v in listed["choices"]}
        out = client.predict(sorted(bundled), key, api_name="/evaluate_status")
        info = out[5]
        assert info["all_done"] and {r["id"] for r in info["runs"]} == bundled
        assert {n["model"] for n in info["ratio"]} == {"tiny · base", "tiny · ESD"}
        message = client.predict("evaluate-demo-tiny-esd", key, api_name="/train_delete")[0]
        assert "bundled with the app and cannot be deleted" in message
    assert all((demo_app["bundle"] / name / "metrics.json").is_file() for name in bundled)  # untouched


def test_demo_show_draws_the_task_with_the_librarys_numbers(demo_app, bundle):
    from recare import metrics

    client = _client(demo_app)
    out = client.predict("tiny", api_name="/demo_show")
    evaluations, status, ratio_plot, ratio_table, care_plot, care_table, info, grid, estimate, paper_task, head = out
    ids = evaluations["value"] if isinstance(evaluations, dict) else evaluations
    assert ids == ["evaluate-demo-tiny-base", "evaluate-demo-tiny-esd"]
    saved = json.loads((bundle / ids[1] / "metrics.json").read_text())
    number = next(n for n in info["ratio"] if n["run"] == ids[1])
    lo, hi = saved["ratio"]["clip_range"]
    assert (number["D"], number["U"], number["C"]) == pytest.approx(
        metrics.ratio_axes(saved["asr"]["erased"], saved["clip_score"], saved["care_score"]["mean"], (lo, hi)))
    assert len(json.loads(ratio_plot["plot"])["data"]) == 2 and len(json.loads(care_plot["plot"])["data"]) == 2
    # the labelled grid: each model's name in front of its images (embedded), no click needed
    assert re.findall(r'class="recare-grid-model">([^<]+)</th>', grid) == ["base", "ESD"]
    assert grid.count("<img ") == sum(len(r["seeds"]) for e in demo.task_entries(demo.read_index(bundle), "tiny")
                                      for r in e["grid"]["rows"])
    assert paper_task == {"__type__": "update"}  # "tiny" stands for no task of the paper: left as it is
    assert f"| ESD | {number['ratio']:.3f} | – |" in head  # the headline: no paper row for "tiny"
    assert "Re-run on" in estimate and "evaluations about" in estimate


def test_export_report_and_the_paper_view_through_the_api(demo_app):
    """Any browser exports the bundled results as one HTML report (every run id in it); the paper view draws the
    quoted Table 1 rows of a task with recare.metrics' RATIO."""
    from recare import metrics, paper
    from ui.common import new_browser_key

    client = _client(demo_app)
    ids = ["evaluate-demo-tiny-base", "evaluate-demo-tiny-esd"]
    path, message = client.predict(ids, new_browser_key(), api_name="/evaluate_report")
    text = Path(path).read_text(encoding="utf-8")
    assert message.startswith("✓") and all(i in text for i in ids) and "<html" in text
    ratio_plot, care_plot, *_, table, care_table = client.predict("tench", api_name="/paper_view")
    traces = json.loads(ratio_plot["plot"])["data"]
    for trace, row in zip(traces, paper.table_1("tench"), strict=True):
        d, u, c = metrics.ratio_axes(row.asr_cce, row.clip, row.care)
        assert trace["r"] == pytest.approx([d, u, c, d]) and f"printed {row.printed_ratio:.2f}" in trace["name"]
    assert [r[table["headers"].index("RATIO")] for r in table["data"]] == [0.30, 0.25, 0.56, 0.85]
    message = client.predict(["x"] * 13, new_browser_key(), api_name="/evaluate_report")[1]
    assert message.startswith("⚠")  # unknown runs, too many: refused in one line


def test_rerun_refuses_what_it_cannot_recompute(demo_app):
    from ui.common import new_browser_key

    message, _, _ = _client(demo_app).predict("tiny", new_browser_key(), api_name="/demo_rerun")
    assert message.startswith("⚠") and "cannot be re-run" in message
    assert not list(demo_app["runs"].glob("evaluate-2*"))  # nothing was started


def test_rerun_live_recomputes_the_base_evaluation_for_this_browser_only(base_run, tmp_path):
    """A base-only bundle: "Re-run live" submits the same evaluation as a job of this browser's; it finishes
    with a metrics.json Compare draws, and another browser sees the bundled result but not this run."""
    import ui
    from gradio_client import Client

    from tests.test_app_fixtures import runs_dir_of, world_env
    from ui.common import new_browser_key

    bundle = demo.pack_demo({"tiny": {"base": base_run}}, tmp_path / "demo")
    with world_env(tmp_path / "world"):
        workspace = tmp_path / "ws"
        runs = runs_dir_of(workspace)
        app = ui.create_app(workspace=workspace, device="cpu", runs_dir=runs, demo_dir=bundle)
        app.queue(default_concurrency_limit=4)
        _, url, _ = app.launch(prevent_thread_lock=True, quiet=True, **ui.launch_kwargs(workspace, runs_dir=runs))
        try:
            client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
            mine, other = new_browser_key(), new_browser_key()
            message, evaluations, _ = client.predict("tiny", mine, api_name="/demo_rerun")
            assert message.startswith("✓ Re-running tiny"), message
            ids = evaluations["value"] if isinstance(evaluations, dict) else evaluations
            assert ids[0] == "evaluate-demo-tiny-base" and len(ids) == 2
            deadline = time.monotonic() + 180
            while True:
                info = client.predict(ids, mine, api_name="/evaluate_status")[5]
                assert all(r["state"] != "failed" for r in info["runs"]), info
                if info["all_done"]:
                    break
                assert time.monotonic() < deadline, info
                time.sleep(1.0)
            assert [n["model"] for n in info["ratio"]] == ["tiny · base", "tiny · base (re-run)"]
            saved = json.loads((runs / ids[1] / "metrics.json").read_text())
            bundled = json.loads((bundle / ids[0] / "metrics.json").read_text())
            assert set(saved["asr"]) == set(bundled["asr"]) and saved["n_images"] == bundled["n_images"]
            listed = {v for _, v in client.predict([], other, api_name="/evaluate_list")["choices"]}
            assert "evaluate-demo-tiny-base" in listed and ids[1] not in listed
        finally:
            app.close()
