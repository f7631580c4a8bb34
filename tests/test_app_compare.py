"""The Compare workspace: its radar figures (pure), its live view of a stopped evaluation (tiny models), and
through gradio_client against a launched app.

Evaluate the base mini-world model on one seed with the erased attack only and a custom prompt, poll to
done, and check the radar numbers against the run's metrics.json through `recare.metrics` and the custom
prompt's images in the grid; a checkpoint trained on another base, or a corrupt one, is refused and
leaves no run behind; cancelling twice says so; two owners never see each other's evaluations.
"""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client, handle_file

from recare import metrics
from tests.test_app_fixtures import mini_world_client
from ui.common import new_browser_key
from ui.figures import care_radar_figure, radar_numbers, ratio_radar_figure

STATUS, RATIO_PLOT, RATIO_TABLE, CARE_PLOT, CARE_TABLE, INFO = range(6)
CARE_CONCEPTS = 7  # the poll's CARE-axes update (after the timer)
GRID_PROMPT, GRID, GRID_NOTE, GRID_INFO = range(4)
CUSTOM = "a photo of a boat on a lake"


def _row(model, asr, clip, per_concept, clip_range=(0.2, 0.3)):
    values = list(per_concept.values())
    return {"model": model, "asr": asr, "clip_score": clip,
            "care_score": {"mean": sum(values) / len(values), "per_concept": per_concept},
            "ratio": {"value": None, "clip_range": list(clip_range)}}


def test_radar_figures_have_one_trace_per_model_with_the_library_numbers():
    rows = [_row("base", {"erased": 90.0, "cce": 95.0}, 0.29, {"a": 0.9, "b": 0.8, "c": 0.7}),
            _row("recare", {"erased": 5.0, "cce": 30.0}, 0.27, {"a": 0.85, "b": 0.6, "c": 0.75})]
    fig = ratio_radar_figure(rows)
    assert [t.type for t in fig.data] == ["scatterpolar", "scatterpolar"]
    for trace, row in zip(fig.data, rows):
        d, u, c = metrics.ratio_axes(row["asr"]["cce"], row["clip_score"], row["care_score"]["mean"], (0.2, 0.3))
        assert list(trace.r) == pytest.approx([d, u, c, d])  # a closed triangle
        assert trace.fill == "toself"
        expected = metrics.ratio(row["asr"]["cce"], row["clip_score"], row["care_score"]["mean"], (0.2, 0.3))
        assert trace.meta["ratio"] == pytest.approx(expected) and f"{expected:.3f}" in trace.name
        assert trace.meta["attack"] == "cce"  # Appendix M: Defense is 100 - ASR under CCE
    # three concepts: a real radar, one axis per concept
    care = care_radar_figure(rows)
    assert [t.type for t in care.data] == ["scatterpolar", "scatterpolar"]
    for trace, row in zip(care.data, rows):
        radar = metrics.care_radar(row["care_score"]["per_concept"])
        assert list(trace.theta)[:3] == list(radar.axes) and list(trace.r)[:3] == list(radar.values)
    # one concept (a mini-world task): bars, still one trace per model; without CCE the strongest attack
    one = [_row("base", {"erased": 80.0, "noise": 90.0}, 0.25, {"person": 0.5}),
           _row("esd", {"erased": 10.0}, 0.24, {"person": 0.25})]
    bars = care_radar_figure(one)
    assert [t.type for t in bars.data] == ["bar", "bar"] and [list(t.y) for t in bars.data] == [[0.5], [0.25]]
    assert radar_numbers(one[0])["attack"] == "noise" and radar_numbers(one[1])["attack"] == "erased"
    assert radar_numbers({"model": "x", "asr": {}, "clip_score": None, "care_score": None}) is None


def test_live_view_of_a_stopped_evaluation_is_partial_then_final(tmp_path):
    """A run stopped in its CARE images (tiny models): the poll draws its provisional numbers dashed and marked
    "(partial)", equal to `partial_metrics`; the grid shows the custom prompt's images on the attacks' seeds and
    pending cells; once resumed to the end the numbers are metrics.json's and the marks are gone."""
    from recare.errors import Cancelled
    from recare.eval.config import EvaluationConfig
    from recare.eval.run import evaluate
    from recare.eval.run_metrics import partial_metrics
    from recare.progress import CancelToken
    from recare.runs import CANCELLED, DONE, RunStore
    from tests.helpers_tiny import make_tiny_clip, make_tiny_pipeline
    from ui.common import AppContext
    from ui.compare_tab import _grid, _poll

    make_tiny_pipeline(tmp_path / "pipeline")
    make_tiny_clip(tmp_path / "clip")
    (tmp_path / "captions.txt").write_text("a photo of a fish\na boat on a lake\n")
    config = EvaluationConfig(model=str(tmp_path / "pipeline"), target_prompt="a photo of a fish", target_concept="tench",
                              care_prompts={"water": ["a lake", "a river"], "person": ["a man"]},
                              care_labels=["person", "fish"], encoder=str(tmp_path / "clip"), detector="oracle",
                              clip_prompts=str(tmp_path / "captions.txt"), attacks=["erased"],
                              extra_prompts=["a boat"], seeds=2, care_images_per_prompt=2, steps=2, height=64,
                              width=64, batch_size=2, device="cpu")
    key = new_browser_key()
    store = RunStore(tmp_path / "runs")
    run = store.create("evaluate", {"evaluation": config.to_dict(), "compare": {"label": "tiny base"}}, owner=key)
    cancel = CancelToken()
    stop = lambda event: cancel.cancel() if event.stage == "evaluate" and event.step >= 6 else None  # noqa: E731
    with pytest.raises(Cancelled):  # erased (2) + custom (2) + one CARE batch (2) made
        evaluate(config, run_dir=run.path, run=run, progress=stop, cancel=cancel)
    run.update_status(state=CANCELLED)
    ctx = AppContext(models=None, session=None, model_name=None, runs=store)

    out = _poll(ctx, [run.id], key, [], {})
    info, partial = out[INFO], partial_metrics(run.path)
    assert info["partial"][run.id] == partial["progress"] and partial["progress"]["images"] == 6
    assert info["care"]["tiny base"] == partial["care_score"]["per_concept"]
    assert info["ratio"] == []  # no CLIP image yet: no triangle, but the table shows what there is
    table = out[RATIO_TABLE]
    assert list(table.iloc[0][["ASR %", "numbers"]]) == [pytest.approx(partial["asr"]["erased"], abs=0.01),
                                                         "partial: 6/12 images"]
    [bars] = out[CARE_PLOT].data
    assert bars.name == "tiny base (partial)" and bars.meta["partial"] and bars.marker.pattern.shape == "/"
    assert [v for _, v in out[CARE_CONCEPTS].choices] == list(partial["care_score"]["per_concept"])

    prompt, gallery, note, grid, view = _grid(ctx, [run.id], None, key, out[8])
    labels = [label for label, _ in prompt.choices]
    assert labels[:2] == ["target prompt · a photo of a fish", "custom · a boat"] and len(labels) == 5
    custom = json.dumps(["extra", "a boat"])
    prompt, gallery, note, grid, view = _grid(ctx, [run.id], custom, key, view)
    assert grid["seeds"] == [42, 43] and [c["state"] for c in grid["rows"][0]["cells"]] == ["ready", "ready"]
    assert gallery.count("<img ") == 2 and "Rows: 1 model(s)" in note
    assert re.findall(r'class="recare-grid-model">([^<]+)</th>', gallery) == ["tiny base"]  # labelled, no click
    assert 'alt="tiny base, a boat, seed 42' in gallery
    again = _grid(ctx, [run.id], custom, key, view)
    assert again[1] == gr.skip()  # nothing changed: the gallery is not sent again
    care = json.dumps(["care", "a man"])
    cells = _grid(ctx, [run.id], care, key, view)[3]["rows"][0]["cells"]
    assert [c["state"] for c in cells] == ["pending", "pending"]  # not made yet

    evaluate(None, run_dir=run.path)
    run.update_status(state=DONE)
    out = _poll(ctx, [run.id], key, [], {})
    saved = json.loads((run.path / "metrics.json").read_text())
    [numbers] = out[INFO]["ratio"]
    assert out[INFO]["partial"] == {} and numbers["partial"] is False
    assert numbers["ratio"] == pytest.approx(radar_numbers({**saved, "model": "tiny base"})["ratio"])
    assert "(partial)" not in out[RATIO_PLOT].data[0].name and out[RATIO_PLOT].data[0].line.dash == "solid"
    assert list(out[RATIO_TABLE]["numbers"]) == ["final"]


@pytest.fixture
def compare_app(app_url):
    """The session's launched app (tests/conftest.py); each test drives it with fresh browser keys."""
    return app_url


def _client(app) -> Client:
    return mini_world_client(app, "Compare")


def _care_prompts(task="tench", n=2):
    from recare.workflows import mini_world_task

    return json.dumps({k: v[:n] for k, v in mini_world_task(task)["care_prompts"].items()})


def _start(client, key, picked=("base",), attacks=("erased",), seeds=1, custom=""):
    return client.predict(list(picked), "tench", "a photo of a tench", _care_prompts(), list(attacks), seeds, 1, 4,
                          custom, "mini-world", key, api_name="/evaluate_start")


def _status(client, ids, key, concepts=()):
    return client.predict(ids, key, list(concepts), api_name="/evaluate_status")


def _grid(client, ids, key, choice=None):
    return client.predict(ids, choice, key, api_name="/evaluate_grid")


def _ids(evaluations) -> list[str]:
    return evaluations["value"] if isinstance(evaluations, dict) else evaluations  # a gr.Dropdown update


@pytest.mark.e2e
def test_evaluate_base_polled_to_done_radar_equals_metrics(compare_app):
    client, key = _client(compare_app), new_browser_key()
    message, evaluations, _ = _start(client, key, custom=f"{CUSTOM}\n\n{CUSTOM}\n")  # blank and repeated lines drop
    assert message.startswith("✓ Started 1 evaluation"), message
    ids = _ids(evaluations)
    assert len(ids) == 1
    deadline = time.monotonic() + 180
    while True:
        out = _status(client, ids, key)
        info = out[INFO]
        assert all(r["state"] != "failed" for r in info["runs"]), info
        for run_id, progress in info["partial"].items():  # provisional numbers while it runs: the images so far
            assert 0 < progress["images"] <= progress["planned"], progress
            assert progress["complete"] is (progress["images"] == progress["planned"])  # merging: all made
        if info["all_done"]:
            break
        assert time.monotonic() < deadline, info
        time.sleep(1.0)
    assert info["partial"] == {}
    saved = json.loads((compare_app["runs"] / ids[0] / "metrics.json").read_text())
    assert set(saved["asr"]) == {"erased"}
    [numbers] = info["ratio"]
    lo, hi = saved["ratio"]["clip_range"]
    d, u, c = metrics.ratio_axes(saved["asr"]["erased"], saved["clip_score"], saved["care_score"]["mean"], (lo, hi))
    assert (numbers["D"], numbers["U"], numbers["C"]) == pytest.approx((d, u, c))
    assert numbers["ratio"] == pytest.approx(metrics.ratio(saved["asr"]["erased"], saved["clip_score"],
                                                          saved["care_score"]["mean"], (lo, hi)))
    assert info["care"][info["runs"][0]["model"]] == saved["care_score"]["per_concept"]
    ratio_fig = json.loads(out[RATIO_PLOT]["plot"])
    assert len(ratio_fig["data"]) == 1 and ratio_fig["data"][0]["r"][:3] == pytest.approx([d, u, c])
    care_fig = json.loads(out[CARE_PLOT]["plot"])
    assert len(care_fig["data"]) == 1
    assert care_fig["data"][0]["y"] == pytest.approx(list(saved["care_score"]["per_concept"].values()))
    column = out[RATIO_TABLE]["headers"].index
    assert out[RATIO_TABLE]["data"][0][column("RATIO")] == pytest.approx(numbers["ratio"], abs=1e-4)
    assert out[RATIO_TABLE]["data"][0][column("numbers")] == "final" and "(partial)" not in ratio_fig["data"][0]["name"]
    assert out[RATIO_TABLE]["data"][0][column("attack runs")] == 1  # one draw: no worst-run column
    assert info["care_axes"] == list(saved["care_score"]["per_concept"])  # every evaluated concept (<= 10)

    # the grid: the custom prompt is one of its prompts (made once, on the attacks' seed 42), its image is there
    grid = _grid(client, ids, key)
    choices = {json.loads(value)[1]: json.loads(value)[0] for _, value in grid[GRID_INFO]["choices"]}
    assert choices[CUSTOM] == "extra" and choices["a photo of a tench"] == "erased"
    assert sum(1 for p in choices if p == CUSTOM) == 1
    grid = _grid(client, ids, key, json.dumps(["extra", CUSTOM]))
    info = grid[GRID_INFO]
    assert info["prompt"] == CUSTOM and info["seeds"] == [42]
    [row] = info["rows"]
    [cell] = row["cells"]
    assert cell["state"] == "ready" and (compare_app["runs"] / ids[0] / cell["file"]).is_file()
    assert cell["file"].startswith("images/extra/") and grid[GRID].count("<img ") == 1
    records = list(csv.DictReader((compare_app["runs"] / ids[0] / "records.csv").open()))
    assert [r["prompt"] for r in records if r["attack"] == "extra"] == [CUSTOM]
    assert set(saved["asr"]) == {"erased"}  # a custom prompt is shown, never scored
    png, message = client.predict(ids, json.dumps(["extra", CUSTOM]), key, api_name="/evaluate_export_grid")
    from PIL import Image

    with Image.open(png) as picture:
        assert picture.width > 128 and picture.height > 128, message

    json_file, csv_file, message = client.predict(ids, key, api_name="/evaluate_export")
    assert json.loads(Path(json_file).read_text())["models"][0]["asr"] == saved["asr"], message
    [row] = list(csv.DictReader(Path(csv_file).open()))
    assert float(row["ratio"]) == pytest.approx(numbers["ratio"]) and row["defense_attack"] == "erased"

    # another owner sees none of it: not in its list, and polling or cancelling by id is refused
    other = new_browser_key()
    listed = client.predict([], other, api_name="/evaluate_list")
    assert ids[0] not in json.dumps(listed)
    assert ids[0] in json.dumps(client.predict([], key, api_name="/evaluate_list"))
    assert "not yours" in _status(client, ids, other)[INFO]["error"]
    assert "not yours" in _grid(client, ids, other)[GRID_INFO]["error"]
    message, _ = client.predict(ids, other, api_name="/evaluate_cancel")
    assert "not yours" in message


@pytest.mark.e2e
def test_cancelling_twice_says_so_and_keeps_the_run(compare_app):
    client, key = _client(compare_app), new_browser_key()
    assert "no evaluation selected" in client.predict([], key, api_name="/evaluate_cancel")[0]
    ids = _ids(_start(client, key, seeds=2)[1])
    first, _ = client.predict(ids, key, api_name="/evaluate_cancel")
    assert "Cancel" in first, first
    second, _ = client.predict(ids, key, api_name="/evaluate_cancel")
    assert "already" in second and ids[0] in second, second  # "...already requested" or "...already cancelled"
    deadline = time.monotonic() + 120
    while _status(client, ids, key)[INFO]["runs"][0]["state"] not in ("cancelled", "done"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    third, _ = client.predict(ids, key, api_name="/evaluate_cancel")
    assert "Nothing to cancel" in third and "already" in third, third
    assert (compare_app["runs"] / ids[0] / "config.json").is_file()  # the run is kept
    assert ids[0] in json.dumps(client.predict([], key, api_name="/evaluate_list"))


def test_mismatched_checkpoint_is_refused(compare_app, tmp_path):
    import torch
    from safetensors.torch import save_file

    client, key = _client(compare_app), new_browser_key()
    before = sorted(p.name for p in compare_app["runs"].iterdir())
    bad = tmp_path / "trained_params.safetensors"
    save_file({"down_blocks.0.attentions.0.not_in_this_unet.weight": torch.zeros(3, 3)}, str(bad))
    message, _ = client.predict(handle_file(str(bad)), "mini-world", ["base"], key,
                                api_name="/evaluate_add_checkpoint")
    assert "refused" in message and "does not fit this base model" in message, message
    assert sorted(p.name for p in compare_app["runs"].iterdir()) == before  # nothing left behind
    wrong_name = tmp_path / "model.pt"
    wrong_name.write_bytes(b"x")
    message, _ = client.predict(handle_file(str(wrong_name)), "mini-world", ["base"], key,
                                api_name="/evaluate_add_checkpoint")
    assert "refused" in message and "trained_params.safetensors" in message, message
    assert sorted(p.name for p in compare_app["runs"].iterdir()) == before

    # a checkpoint that fits (one real cross-attention tensor of the base UNet) is copied into a run
    from recare import models

    unet = models.load_pipeline("mini-world", device="cpu", dtype="fp32").unet
    name = next(k for k in unet.state_dict() if "attn2.to_k" in k)
    good = tmp_path / "good" / "trained_params.safetensors"
    good.parent.mkdir()
    save_file({name: unet.state_dict()[name].clone()}, str(good))
    message, picked = client.predict(handle_file(str(good)), "mini-world", ["base"], key,
                                     api_name="/evaluate_add_checkpoint")
    assert message.startswith("✓ Added"), message
    run_id = message.split("**")[1]
    saved = (compare_app["runs"] / run_id / "trained_params.safetensors").read_bytes()
    assert run_id in json.dumps(client.predict(["base"], key, api_name="/evaluate_models"))
    assert run_id not in json.dumps(client.predict(["base"], new_browser_key(), api_name="/evaluate_models"))

    # corrupt files under the right names: a clear message, no new run, the checkpoint added before untouched
    before = sorted(p.name for p in compare_app["runs"].iterdir())
    for name, data in (("trained_params.safetensors", b"not a safetensors file" * 4),
                       ("ReCARE-Diffusers-UNet.pt", b"PK\x03\x04 truncated")):
        corrupt = tmp_path / "corrupt" / name
        corrupt.parent.mkdir(exist_ok=True)
        corrupt.write_bytes(data)
        message, _ = client.predict(handle_file(str(corrupt)), "mini-world", ["base"], key,
                                    api_name="/evaluate_add_checkpoint")
        assert "Checkpoint refused" in message and "damaged or incomplete" in message, message
        assert sorted(p.name for p in compare_app["runs"].iterdir()) == before
    assert (compare_app["runs"] / run_id / "trained_params.safetensors").read_bytes() == saved
    assert run_id in json.dumps(client.predict(["base"], key, api_name="/evaluate_models"))


def test_compare_runs_each_learned_attack_the_chosen_number_of_times():
    from recare.errors import ConfigError
    from ui.compare_settings import ATTACK_CHOICES, DEFAULT_ATTACK_RUNS, CompareSettings

    assert "ud" in ATTACK_CHOICES and "cce" in ATTACK_CHOICES
    form = (["base"], "tench", "a photo of a tench", _care_prompts(), ["erased", "cce", "ud"], 2, 1, 4, "", "mini-world")
    assert CompareSettings.from_inputs(*form).evaluation("mini-world", None, False, "cpu").attack_runs == \
        DEFAULT_ATTACK_RUNS
    config = CompareSettings.from_inputs(*form, 3).evaluation("mini-world", None, False, "cpu")
    assert config.attack_runs == 3 and config.attacks == ["erased", "cce", "ud"]
    for bad in ("x", 1.5, None):
        with pytest.raises(ConfigError, match="runs per learned attack"):
            CompareSettings.from_inputs(*form, bad)
