"""The Train workspace through gradio_client, against a launched app on the mini (or tiny) world.

Start a short ReCARE run on a mini-world task, poll until loss points arrive, cancel, resume,
finish; download its weights; two owners never see each other's runs; bad inputs get a clear
message and nothing saved is lost.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from tests.test_app_fixtures import mini_world_client
from ui.common import new_browser_key

STATUS, PROGRESS, LOSS, PREVIEWS, INFO = range(5)


@pytest.fixture
def train_app(app_url):
    """The session's launched app (tests/conftest.py); each test drives it with fresh browser keys."""
    return app_url


def _client(app) -> Client:
    return mini_world_client(app, "Train")


def _start(client: Client, key: str, task="tench", method="recare", careset=None, iterations=4, s1_iterations=2,
           ti_steps=2, num_images=2, preview_every=2, target="a photo of a tench", reference="tench", init="fish"):
    return client.predict(task, method, target, reference, init, careset, iterations, 2e-5, s1_iterations, ti_steps,
                          "noxattn", 42, num_images, preview_every, "mini-world", key, api_name="/train_start")


def _run_id(started) -> str:
    message = started[0]
    assert message.startswith("✓ Started"), message
    return message.split("**")[1]


def _status(client: Client, run_id: str, key: str) -> dict:
    return client.predict(run_id, key, api_name="/train_status")[INFO]


def _wait(client, run_id, key, until, timeout=240.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = _status(client, run_id, key)
        if until(info):
            return info
        assert time.monotonic() < deadline, f"timed out; last status {info}"
        assert info.get("state") != "failed", info
        time.sleep(0.5)


@pytest.mark.e2e
def test_start_poll_cancel_resume_finish_download(train_app):
    client, key = _client(train_app), new_browser_key()
    run_id = _run_id(_start(client, key))

    # poll until some loss points arrive, then cancel: the run keeps a resumable state
    info = _wait(client, run_id, key, lambda i: i["state"] == "running" and i["loss_points"] >= 2)
    # stage 1: 2 rounds x (2 erase + 2 TI); stage 2: 4; tench's closing search, capped by the same overrides:
    # 2 rounds x (2 TI steps + 4 iterations)
    assert info["steps_total"] == 2 * (2 + 2) + 4 + 2 * (2 + 4)
    message, _ = client.predict(run_id, key, api_name="/train_cancel")
    assert "Cancel requested" in message or "Cancelled" in message, message
    info = _wait(client, run_id, key, lambda i: i["state"] == "cancelled")
    assert info["resumable"] is True
    points = info["loss_points"]
    again, _ = client.predict(run_id, key, api_name="/train_cancel")  # cancelling twice: said, nothing lost
    assert "Nothing to cancel" in again and "cancelled" in again
    shown = client.predict(run_id, key, api_name="/train_status")
    assert "Resume" in shown[STATUS]

    # resume: it continues and finishes; the loss plot has the points of both attempts
    message, _ = client.predict(run_id, key, api_name="/train_resume")
    assert "Resumed" in message
    info = _wait(client, run_id, key, lambda i: i["state"] == "done")
    assert info["loss_points"] >= points and info["steps_done"] == info["steps_total"]
    assert info["previews"] >= 1 and info["result"]["tokens"][:2] == ["<v1*>", "<v2*>"]
    assert info["result"]["closing_probe"], info["result"]   # the closing search ran and says what it found
    final = client.predict(run_id, key, api_name="/train_status")
    figure = json.loads(final[LOSS])
    names = {t["name"] for t in figure["data"]}
    assert {"erase loss", "retain loss", "textual inversion loss"} <= names
    erase = next(t for t in figure["data"] if t["name"] == "erase loss")
    assert len(erase["x"]) >= 2 * 2 + 4  # every erase iteration of stage 1 and stage 2 is drawn
    assert len(final[PREVIEWS]) == 2  # the base model's grid beside the latest preview
    assert "done" in final[STATUS] and "100%" in final[PROGRESS]

    # the run is listed with its settings; downloads: the trained parameters and an exported official .pt
    choices, table = client.predict(run_id, key, api_name="/train_list")
    assert run_id in [row[0] for row in table["data"]]
    row = next(r for r in table["data"] if r[0] == run_id)
    assert row[1] == "done" and row[2] == "recare" and "tench" in row[3] and "stage-2 it" in row[4]
    file, message = client.predict(run_id, "trained_params", key, api_name="/train_download")
    assert Path(file).name == "trained_params.safetensors" and Path(file).stat().st_size > 0, message
    file, message = client.predict(run_id, "official_pt", key, api_name="/train_download")
    import torch

    state = torch.load(file, map_location="cpu", weights_only=True)
    assert any(k.startswith("down_blocks") for k in state)

    # the estimate now uses the speed this run measured
    from recare.runs import RunStore
    from recare.train.speed import measured_speed

    speed = measured_speed(RunStore(train_app["runs"]), "mini-world", "cpu")
    assert speed and speed["erase"] > 0 and speed["stage2"] > 0 and speed["textual_inversion"] > 0

    # delete: gone from the list
    message, _, table = client.predict(run_id, key, api_name="/train_delete")
    assert "Deleted" in message and run_id not in [r[0] for r in table["data"]]


def test_two_owners_do_not_see_each_others_runs(train_app):
    client = _client(train_app)
    alice, bob = new_browser_key(), new_browser_key()
    run_id = _run_id(_start(client, alice, iterations=1, s1_iterations=1, ti_steps=1, preview_every=0))
    try:
        _, table = client.predict(None, bob, api_name="/train_list")
        assert run_id not in [r[0] for r in table["data"]]
        _, table = client.predict(None, alice, api_name="/train_list")
        assert run_id in [r[0] for r in table["data"]]
        for api in ("/train_cancel", "/train_resume"):
            message, _ = client.predict(run_id, bob, api_name=api)
            assert "does not exist or is not yours" in message
        message, _, _ = client.predict(run_id, bob, api_name="/train_delete")
        assert "does not exist or is not yours" in message
        assert "does not exist or is not yours" in _status(client, run_id, bob)["error"]
        assert _status(client, run_id, alice)["state"] in ("queued", "running", "done")  # untouched
    finally:
        client.predict(run_id, alice, api_name="/train_cancel")
        _wait(client, run_id, alice, lambda i: i["state"] in ("cancelled", "done"))


def test_bad_inputs_get_a_clear_message(train_app, tmp_path):
    client, key = _client(train_app), new_browser_key()
    # no CARE-set (this session has none and no task makes one)
    message = _start(client, key, task="session")[0]
    assert "Not started" in message and "no CARE-set" in message
    # an empty CARE-set
    empty = tmp_path / "careset.json"
    empty.write_text(json.dumps({"tench_care_word": [], "tench_care_word_photo": []}))
    message = _start(client, key, task="session", careset=handle_file(str(empty)))[0]
    assert "Not started" in message and "empty" in message
    # not a number, an unknown method, no key yet
    assert "must be a number" in _start(client, key, iterations="many")[0]
    assert "unknown method" in _start(client, key, method="magic")[0]
    assert "reload the page" in _start(client, "", task="tench")[0]
    # nothing was created for this owner
    _, table = client.predict(None, key, api_name="/train_list")
    assert table["data"] == []
    # no run selected / an unknown run
    message, _ = client.predict(None, key, api_name="/train_cancel")
    assert "no run selected" in message
    message, _ = client.predict("train-20990101-000000-abcdef", key, api_name="/train_resume")
    assert "does not exist or is not yours" in message


@pytest.mark.parametrize("method", ["esd"])
def test_estimate_and_plan_for_each_method(method):
    from recare.config import TrainConfig
    from recare.train.speed import estimate_seconds, training_plan

    config = TrainConfig.for_method(method)
    plan = training_plan(config)
    assert plan == [("esd", 1000)]
    assert estimate_seconds(config, {"erase": 0.5}) == 500.0
    assert estimate_seconds(config, {"stage2": 0.5}) is None
    recare = TrainConfig.for_method("recare")
    s1 = recare.stage1
    expected = s1.n_iterations * (s1.esd.iterations * 1.0 + s1.textual_inversion.steps * 0.25) + recare.stage2.iterations * 2.0
    assert estimate_seconds(recare, {"erase": 1.0, "textual_inversion": 0.25, "stage2": 2.0}) == expected
    assert [p for p, _ in training_plan(recare)] == ["stage1.erase[1]", "stage1.textual_inversion[1]", "stage1.erase[2]",
                                                      "stage1.textual_inversion[2]", "stage2"]


def test_estimate_counts_stage1_search_inversions_only_when_asked_for_the_longest():
    import dataclasses

    from recare.config import TrainConfig
    from recare.train.speed import estimate_seconds

    speed = {"erase": 1.0, "textual_inversion": 0.25, "stage2": 2.0}
    recare = TrainConfig.for_method("recare")
    s1 = recare.stage1
    one = s1.n_iterations * (s1.esd.iterations + s1.textual_inversion.steps * 0.25) + recare.stage2.iterations * 2.0
    assert estimate_seconds(recare, speed, longest=True) == estimate_seconds(recare, speed) == one
    searching = dataclasses.replace(recare, stage1=dataclasses.replace(s1, probe_seeds=16, min_token_strength=0.5,
                                                                       attempts=3, search_original=True))
    assert searching.stage1.max_inversions == 4
    assert estimate_seconds(searching, speed) == one
    assert estimate_seconds(searching, speed, longest=True) == one + s1.n_iterations * 3 * s1.textual_inversion.steps * 0.25


def test_train_estimate_says_how_long_the_stage1_search_may_run(tmp_path):
    """The world's tench ReCARE may run a second inversion per round (search_original): the Train
    workspace's estimate gives the one-inversion time and the longest beside it."""
    import types

    from recare.atomic import atomic_write_json
    from recare.models.policy import ModelPolicy
    from recare.runs import RunStore
    from recare.train.speed import SPEED_FILE
    from ui.common import AppContext
    from ui.train_tab import _estimate

    store = RunStore(tmp_path / "runs")
    atomic_write_json(Path(store.root) / SPEED_FILE,
                      {"mini-world|cpu": {"erase": 0.5, "stage2": 1.0, "textual_inversion": 0.03, "runs": 1}})
    ctx = AppContext(models=types.SimpleNamespace(policy=ModelPolicy(), device="cpu"), session=None,
                     model_name=None, runs=store)
    args = ("tench", "recare", "a photo of a tench", "tench", "fish", None, 200, 5e-5, 100, 1000, "noxattn", 42,
            60, 0, "mini-world")
    text = _estimate(ctx, *args)
    # 2 rounds x (100 x 0.5 s + 1000 x 0.03 s) + 200 x 1 s = 360 s, and tench's closing search: one round of one
    # 1000-step inversion and 100 stage-2 iterations = 130 s (8.2 min); the longest adds 2 x 30 s for stage 1's
    # search, a second closing round and a second inversion per round (2 x (100 + 2 x 30) - 130 = 190 s: 12.3 min)
    assert "about **8 min" in text and "up to **12 min" in text and "all 2 inversions" in text, text
    assert "closing search all 2 rounds of 2 inversions" in text and "1000 TI steps (closing 1)" in text, text
    esd = _estimate(ctx, "tench", "esd", "a photo of a tench", "tench", "fish", None, 250, 1e-4, 100, 1000,
                    "noxattn", 42, 60, 0, "mini-world")
    assert "about **" in esd and "up to" not in esd, esd
