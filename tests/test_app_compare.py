"""The Compare workspace: its radar figures (pure), and through gradio_client against a launched app.

Evaluate the base mini-world model on one seed with the erased attack only, poll to done, and check
the radar numbers against the run's metrics.json through `recare.metrics`; a checkpoint trained on
another base is refused and leaves no run behind; two owners never see each other's evaluations.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from recare import metrics
from tests.test_app_fixtures import app_for_module, mini_world_client
from ui.common import new_browser_key
from ui.figures import care_radar_figure, radar_numbers, ratio_radar_figure

STATUS, RATIO_PLOT, RATIO_TABLE, CARE_PLOT, CARE_TABLE, INFO = range(6)


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


@pytest.fixture(scope="module")
def compare_app(tmp_path_factory):
    """A launched app with a run store of its own (module-scoped fixtures start before the per-test env)."""
    with app_for_module(tmp_path_factory) as app:
        yield app


def _client(app) -> Client:
    return mini_world_client(app, "Compare")


def _care_prompts(task="tench", n=2):
    from recare.workflows import mini_world_task

    return json.dumps({k: v[:n] for k, v in mini_world_task(task)["care_prompts"].items()})


def _start(client, key, picked=("base",), attacks=("erased",), seeds=1):
    return client.predict(list(picked), "tench", "a photo of a tench", _care_prompts(), list(attacks), seeds, 1, 4,
                          "mini-world", key, api_name="/evaluate_start")


def _status(client, ids, key):
    return client.predict(ids, key, api_name="/evaluate_status")


def test_evaluate_base_polled_to_done_radar_equals_metrics(compare_app):
    client, key = _client(compare_app), new_browser_key()
    message, evaluations, _ = _start(client, key)
    assert message.startswith("✓ Started 1 evaluation"), message
    ids = evaluations["value"] if isinstance(evaluations, dict) else evaluations  # a gr.Dropdown update
    assert len(ids) == 1
    deadline = time.monotonic() + 120
    while True:
        out = _status(client, ids, key)
        info = out[INFO]
        assert all(r["state"] != "failed" for r in info["runs"]), info
        if info["all_done"]:
            break
        assert time.monotonic() < deadline, info
        time.sleep(1.0)
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
    assert out[RATIO_TABLE]["data"][0][7] == pytest.approx(numbers["ratio"], abs=1e-4)

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
    message, _ = client.predict(ids, other, api_name="/evaluate_cancel")
    assert "not yours" in message


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
    assert (compare_app["runs"] / run_id / "trained_params.safetensors").is_file()
    assert run_id in json.dumps(client.predict(["base"], key, api_name="/evaluate_models"))
    assert run_id not in json.dumps(client.predict(["base"], new_browser_key(), api_name="/evaluate_models"))
