"""recare.jobs.requests: typed requests, one submission path, the quota for a whole batch, the worker's re-check;
and the runner's liveness and restart behaviour (recare.jobs.runner, recare.runs)."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest

from recare import runs as R
from recare.config import TrainConfig
from recare.errors import ConfigError, ImageInputError, RunError
from recare.jobs import JobRunner, JobSpec, run_job
from recare.jobs.checks import Submitter, check_model, json_depth, parse_json, recheck, run_ids
from recare.jobs.requests import EvaluateRequest, TrainRequest, submit_requests
from recare.limits import Limits
from recare.models import ModelPolicy
from tests.jobs_fixture import expected_value

ACCUMULATE = "tests.jobs_fixture:accumulate"
PUBLIC = Submitter(owner="alice", client="c-1", public=True, limits=Limits())
CARESET = {"tench_care_word": ["freshwater"], "tench_care_word_photo": ["A photo of freshwater"]}


def _train(**fields) -> TrainConfig:
    return TrainConfig.for_method("esd", **{"device": "cpu", **fields})


# ---- raw values ---------------------------------------------------------------------------------------


def test_run_ids_take_texts_only_and_are_bounded():
    limits = Limits(ids_per_request=3)
    assert run_ids("a-1, b-2  a-1", limits) == ["a-1", "b-2"]
    assert run_ids(None, limits) == [] and run_ids(["", " c-3 "], limits) == ["c-3"]
    for bad in (5, 1.5, True, {"a": 1}, ["a", 7]):
        with pytest.raises(ConfigError, match="must be run ids"):
            run_ids(bad, limits)
    with pytest.raises(ConfigError, match="RECARE_MAX_IDS_PER_REQUEST"):
        run_ids(["x"] * 4, limits)
    with pytest.raises(RunError, match="is not a run id"):
        run_ids(["../etc"], limits)


def test_json_depth_is_counted_before_parsing():
    assert json_depth('{"a": ["[[[", {"b": []}]}') == 4  # { [ { [ ; the brackets inside the string do not count
    assert json_depth('"\\"[["') == 0
    assert parse_json('{"a": [1]}', "the prompts") == {"a": [1]}
    with pytest.raises(ConfigError, match="nested 100,000 levels deep.*RECARE_MAX_JSON_DEPTH"):
        parse_json("[" * 100_000 + "]" * 100_000, "the prompts")
    with pytest.raises(ConfigError, match="must be JSON text"):
        parse_json(5, "the prompts")
    with pytest.raises(ConfigError, match="are not JSON"):
        parse_json("{", "the prompts")


# ---- the policy ----------------------------------------------------------------------------------------


def test_public_mode_refuses_every_server_path_alike(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    answers = set()
    for name in (str(tmp_path / "model"), str(tmp_path / "missing"), "/etc", "~root", "./x"):
        with pytest.raises(ConfigError) as refused:
            check_model(name, PUBLIC)
        answers.add(str(refused.value))
    assert len(answers) == 1 and str(tmp_path) not in answers.pop()
    assert check_model("mini-world", PUBLIC) == "mini-world"
    assert check_model("CompVis/stable-diffusion-v1-4", PUBLIC) == "CompVis/stable-diffusion-v1-4"
    allowed = Submitter.of(ModelPolicy.public([tmp_path]))
    assert check_model(str(tmp_path / "model"), allowed) == str(tmp_path / "model")
    assert check_model(str(tmp_path / "model"), Submitter()) == str(tmp_path / "model")  # local use


def test_train_request_bounds_every_number_and_refuses_server_inputs(tmp_path):
    limits = PUBLIC.limits
    cases = {
        "RECARE_MAX_TRAIN_ITERATIONS": TrainConfig.from_dict({**TrainConfig.for_method("recare-no-adv").to_dict(),
                                                               "stage2": {"iterations": 10**12}}),
        "RECARE_MAX_TI_STEPS": TrainConfig.from_dict({**TrainConfig.for_method("recare").to_dict(), "stage1": {
            "textual_inversion": {"steps": limits.ti_steps + 1}}}),
        "RECARE_MAX_STAGE1_ITERATIONS": TrainConfig.from_dict({**TrainConfig.for_method("recare").to_dict(), "stage1": {
            "esd": {"iterations": 10**9}}}),
        "RECARE_MAX_STAGE1_ROUNDS": TrainConfig.from_dict({**TrainConfig.for_method("recare").to_dict(), "stage1": {
            "n_iterations": 11}, "num_images": 11}),
        "RECARE_MAX_IMAGES": _train(num_images=10**9),
        "stage-2 iterations after each closing round": TrainConfig.from_dict({**TrainConfig.for_method(
            "recare").to_dict(), "stage2": {"closing_rounds": 1, "closing_iterations": 10**12}}),
        "textual-inversion steps per closing inversion": TrainConfig.from_dict({**TrainConfig.for_method(
            "recare").to_dict(), "stage2": {"closing_rounds": 1, "closing_ti_steps": limits.ti_steps + 1}}),
        "seed must be between 0 and": _train(seed=10**30),
        "this public app loads only": _train(model="/etc"),
        "names a file on the server": _train(images=str(tmp_path)),
    }
    for expected, config in cases.items():
        with pytest.raises(ConfigError, match=expected):
            TrainRequest(config).check(PUBLIC, [str(tmp_path / "runs")])
    TrainRequest(_train()).check(PUBLIC, [])  # the defaults pass


def test_evaluate_request_bounds_every_number():
    base = {"model": "mini-world", "task": "tench", "attacks": ["erased"]}
    for field, value, expected in (("seeds", 10**9, "RECARE_MAX_EVAL_SEEDS"),
                                   ("care_images_per_prompt", 10**9, "RECARE_MAX_CARE_IMAGES"),
                                   ("clip_count", 10**9, "RECARE_MAX_CLIP_CAPTIONS"),
                                   ("cce_steps", 10**9, "RECARE_MAX_TI_STEPS"),
                                   ("steps", 10**6, "RECARE_MAX_STEPS"),
                                   ("base_seed", -1, "at least 0|between 0 and"),
                                   ("extra_prompts", [f"p{i}" for i in range(201)], "RECARE_MAX_PROMPT_LIST"),
                                   ("care_prompts", {"c": ["x" * 5000]}, "RECARE_MAX_PROMPT_CHARS"),
                                   ("model", "/etc", "this public app loads only"),
                                   ("unet", "/etc", "must be one of your runs"),
                                   ("clip_prompts", "/etc/passwd", "names a file on the server"),
                                   ("detector_options", {"weights_path": "/etc/x.pt"}, "names a file on the server")):
        with pytest.raises(ConfigError, match=expected):
            EvaluateRequest({**base, field: value}).check(PUBLIC, [])
    EvaluateRequest({**base, "seeds": 2, "detector_options": {"concept": "tench"}}).check(PUBLIC, [])


def test_attack_runs_are_bounded_when_the_evaluation_has_them():
    from recare.eval.config import EvaluationConfig

    if not any(f.name == "attack_runs" for f in dataclasses.fields(EvaluationConfig)):
        pytest.skip("EvaluationConfig has no attack_runs field yet")
    with pytest.raises(ConfigError, match="RECARE_MAX_ATTACK_RUNS"):
        EvaluateRequest({"model": "mini-world", "task": "tench", "attack_runs": 11}).check(PUBLIC, [])


# ---- one batch, one quota --------------------------------------------------------------------------------


@pytest.fixture
def runner(tmp_path):
    made = JobRunner(R.RunStore(tmp_path / "runs", limits=Limits(jobs_per_client=2, jobs_total=3)),
                     use_processes=False, poll_s=0.05)
    yield made
    made.shutdown(timeout=10)


def test_a_batch_over_a_limit_starts_nothing_and_says_which(runner):
    spec = JobSpec("train", ACCUMULATE, {"steps": 50, "sleep_s": 0.05})
    with pytest.raises(RunError, match="this request starts 3 jobs.*RECARE_MAX_JOBS_PER_CLIENT.*Nothing was started"):
        runner.submit_many([spec] * 3, owner="alice", client="c-1")
    assert runner.store.list() == []
    first = runner.submit_many([spec] * 2, owner="alice", client="c-1")
    # invented owner keys from the same address share its limit
    with pytest.raises(RunError, match="2 jobs from your address.*RECARE_MAX_JOBS_PER_CLIENT"):
        runner.submit_many([spec], owner="mallory", client="c-1")
    runner.submit_many([spec], owner="bob", client="c-2")
    with pytest.raises(RunError, match="the server has 3 jobs queued or running.*RECARE_MAX_JOBS_TOTAL"):
        runner.submit_many([spec], owner="carol", client="c-3")
    assert len(runner.store.list()) == 3
    for run in first:
        runner.cancel(run.id)


def test_inputs_are_copied_into_the_run_when_it_is_submitted(tmp_path, runner, monkeypatch):
    monkeypatch.setattr(runner, "_wake", lambda: None)  # queued, never started: only the submission is tested
    session = tmp_path / "session"
    session.mkdir()
    images = []
    for i in range(2):
        images.append(session / f"{i}.png")
        images[-1].write_bytes(b"\x89PNG fake %d" % i)
    request = TrainRequest(TrainConfig.for_method("recare", device="cpu", num_images=2), images=tuple(map(str, images)),
                           careset=CARESET)
    (run,) = submit_requests(runner, [request], Submitter(owner="alice", client="c-1"))
    for image in images:
        image.unlink()  # the browser session closes
    settings = run.config()
    copied = sorted(p.name for p in (run.path / "inputs" / "images").iterdir())
    assert copied == ["0000.png", "0001.png"] and settings["train"]["images"] == str(run.path / "inputs" / "images")
    assert json.loads((run.path / "inputs" / "careset.json").read_text()) == CARESET
    assert settings["request"]["kind"] == "train" and settings["request"]["public"] is False
    recheck(run)  # the stored settings pass the stored policy


def test_a_failed_staging_removes_every_run_of_the_batch(tmp_path, runner, monkeypatch):
    monkeypatch.setattr(runner, "_wake", lambda: None)
    gone = TrainRequest(TrainConfig.for_method("recare", device="cpu", num_images=2),
                        images=(str(tmp_path / "missing.png"), str(tmp_path / "missing2.png")), careset=CARESET)
    with pytest.raises(ImageInputError, match="is gone"):
        submit_requests(runner, [TrainRequest(_train()), gone], Submitter(owner="alice", client="c-1"))
    assert runner.store.list() == []


def test_the_worker_checks_the_stored_request_again(tmp_path):
    store = R.RunStore(tmp_path / "runs")
    runner = JobRunner(store, use_processes=False)
    spec = TrainRequest(_train()).spec(PUBLIC, [str(store.root)], "cpu")
    run = store.create("train", spec.config, owner="alice", target=spec.target)
    settings = run.config()
    settings["train"]["model"] = str(tmp_path)  # a run folder edited on disk
    run.config_path.write_text(json.dumps(settings))
    status = run_job(run, spec.target)
    assert status["state"] == R.FAILED and "this public app loads only" in status["error"]
    runner.shutdown()


# ---- liveness and restarts -------------------------------------------------------------------------------


def test_a_reused_pid_does_not_keep_a_dead_run_running(tmp_path):
    store = R.RunStore(tmp_path / "runs")
    run = store.create("train", {})
    me = R.process_identity(os.getpid())
    run.update_status(state=R.RUNNING, pid=os.getpid(), pid_id=me, host=R.socket.gethostname())
    assert run.status()["state"] == R.RUNNING  # the same process: alive
    run.update_status(pid_id="another-boot:123")  # the pid now names another process (a restart reused it)
    status = run.status()
    assert status["state"] == R.FAILED and "belongs to another process" in status["error"]


def test_runs_stopped_by_a_shutdown_come_back_queued_with_a_note(tmp_path):
    store = R.RunStore(tmp_path / "runs")
    first = JobRunner(store, use_processes=False, poll_s=0.05)
    run = first.submit("train", ACCUMULATE, {"steps": 30, "sleep_s": 0.05}, owner="alice")
    user = first.submit("train", ACCUMULATE, {"steps": 30, "sleep_s": 0.05}, owner="bob")
    while run.status()["progress"]["step"] < 2:
        pass
    first.cancel(user.id)  # the user's own cancel stays a cancel
    first.shutdown()
    stopped = run.status()
    assert stopped["state"] == R.CANCELLED and stopped["stopped_by_shutdown"] is True
    second = JobRunner(store, use_processes=False, poll_s=0.05)
    assert run.id in second.recover()["queued"]
    assert "the app restarted" in run.status()["note"]
    assert second.wait(run.id, timeout=30)["result"]["value"] == expected_value(30)
    assert user.status()["state"] == R.CANCELLED and not user.status().get("note")
    second.shutdown()


def test_every_job_function_is_named_in_the_registry_and_resolves():
    from recare import cli, demo
    from recare.jobs import resolve_target, targets

    assert {demo.EVALUATE_TARGET, demo.RERUN_TARGET, cli.TRAIN_TARGET} <= set(targets.TARGETS.values())
    for target in targets.TARGETS.values():
        assert callable(resolve_target(target))
    assert not targets.known("os:system")


def test_the_client_address_is_the_one_the_proxy_saw(monkeypatch):
    from types import SimpleNamespace

    from recare.jobs.checks import client_hash
    from ui.common import client_key

    def request(host, forwarded=None):
        return SimpleNamespace(client=SimpleNamespace(host=host),
                               headers={"x-forwarded-for": forwarded} if forwarded else {})

    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("RECARE_PROXY_HOPS", raising=False)
    assert client_key(request("10.0.0.9", "1.2.3.4")) == client_hash("10.0.0.9")  # no proxy: the header is the client's
    monkeypatch.setenv("SPACE_ID", "someone/space")  # one proxy in front: the address it appended last
    assert client_key(request("10.0.0.9", "6.6.6.6, 5.6.7.8")) == client_hash("5.6.7.8")
    assert client_key(request("10.0.0.9", "6.6.6.6, 5.6.7.8")) != client_key(request("10.0.0.9", "7.7.7.7, 5.6.7.9"))
    assert client_key(request("10.0.0.9")) == client_hash("10.0.0.9")
    assert client_key(None) == "" and client_hash("5.6.7.8").startswith("c-") and "5.6.7.8" not in client_hash("5.6.7.8")


def test_the_cli_bounds_its_jobs_like_the_app(tmp_path, capsys):
    from recare import cli

    out = str(tmp_path / "runs")
    for argv, expected in ((["train", "--task", "tench", "--iterations", str(10**12), "--out", out],
                            "RECARE_MAX_STAGE1_ITERATIONS|RECARE_MAX_TRAIN_ITERATIONS"),
                           (["train", "--task", "tench", "--ti-steps", str(10**9), "--out", out], "RECARE_MAX_TI_STEPS"),
                           (["evaluate", "--task", "tench", "--seeds", str(10**9), "--out", out],
                            "RECARE_MAX_EVAL_SEEDS"),
                           (["evaluate", "--task", "tench", "--clip-count", str(10**9), "--out", out],
                            "RECARE_MAX_CLIP_CAPTIONS")):
        assert cli.main(argv) == 2
        assert re.search(expected, capsys.readouterr().err.strip().splitlines()[-1]), argv
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # refused before any run
