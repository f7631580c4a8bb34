"""Train and Compare under hostile input on a public app: every job goes through one checked path.

One public app (`ModelPolicy.public()`, its own run store, the reviewer demo bundled, a per-client
limit of 2 jobs and a 1 MB checkpoint-header limit from the environment) is launched for the module.
Each case sends a hostile value through gradio_client to an endpoint of Train, Compare or the demo
and checks: a clear one-sentence message (a regex), no absolute server path in it, an answer within
`CASE_S` seconds, no run folder left behind by a refusal, and that the app serves the next request.
The table goes to test-artifacts/hostile-jobs.md. The last tests check the quota classes end to end
(invented keys from one address; a batch over the limit starts nothing) and the app's memory.
"""

from __future__ import annotations

import json
import re
import resource
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from recare.models import ModelPolicy
from tests.helpers_hostile import deflated_torch_file, launched, safetensors_with
from tests.test_app_fixtures import installed_mini_world, world_env
from ui.common import new_browser_key

REPO = Path(__file__).resolve().parent.parent
ARTIFACT = REPO / "test-artifacts" / "hostile-jobs.md"
LIMITS_ENV = {"RECARE_MAX_JOBS_PER_CLIENT": "2", "RECARE_MAX_CHECKPOINT_HEADER_BYTES": "1M"}
PUBLIC_REFUSAL = "this public app loads only"
CASE_S = 20.0          # a refusal comes before any work: well under this even on a loaded 2-core machine
INFO = 4               # train_status's info output


@pytest.fixture(scope="module")
def public_app(tmp_path_factory):
    if installed_mini_world() is None:
        pytest.skip("the job cases use the mini world's tasks and base UNet (checkpoints/mini-world)")
    base = tmp_path_factory.getbasetemp().parent / "recare-app-shared"
    with world_env(base), pytest.MonkeyPatch.context() as mp:
        for name, value in LIMITS_ENV.items():
            mp.setenv(name, value)  # read by create_app
        root = tmp_path_factory.mktemp("hostile-jobs")
        with launched(root / "ws", root / "runs", ModelPolicy.public(), REPO / "assets" / "demo") as url:
            yield {"url": url, "root": root, "runs": root / "runs"}


def _client(app) -> Client:
    return Client(app["url"], verbose=False, download_files=str(app["root"] / "downloads"))


def _alive(client: Client) -> bool:
    return "Loaded" in client.predict("mini-world", api_name="/load_model")


def _run_folders(app) -> set[str]:
    return {p.name for p in app["runs"].iterdir() if not p.name.startswith(".")} if app["runs"].is_dir() else set()


# ---------------------------------------------------------------------------------------------
# the calls


def _train(client, key, task="tench", method="esd", iterations=1, lr=1e-5, s1=2, ti=2, seed=42, num_images=2,
           model="mini-world", preview_every=0, method_param="noxattn"):
    return client.predict(task, method, "a photo of a tench", "tench", "fish", None, iterations, lr, s1, ti,
                          method_param, seed, num_images, preview_every, model, key, api_name="/train_start")[0]


CARE = json.dumps({"freshwater": ["a photo of a lake"]})


def _evaluate(client, key, picked=("base",), care=CARE, attacks=("erased",), seeds=1, care_images=1, clip=4,
              model="mini-world"):
    return client.predict(list(picked) if isinstance(picked, tuple) else picked, "tench", "a photo of a tench", care,
                          list(attacks) if isinstance(attacks, tuple) else attacks, seeds, care_images, clip, "", model,
                          key, api_name="/evaluate_start")[0]


def _files(tmp: Path) -> dict[str, Path]:
    f = {}
    (tmp / "bomb").mkdir()
    f["bomb"] = deflated_torch_file(tmp / "bomb" / "ReCARE-Diffusers-UNet.pt", mib=64)
    (tmp / "many").mkdir()
    f["many"] = safetensors_with(tmp / "many" / "trained_params.safetensors",
                                 {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(10_000)})
    (tmp / "header").mkdir()
    f["header"] = safetensors_with(tmp / "header" / "trained_params.safetensors",
                                   {"conv_in.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                                   header_pad=2 << 20)
    (tmp / "shape").mkdir()
    f["shape"] = safetensors_with(tmp / "shape" / "trained_params.safetensors",
                                  {"conv_in.weight": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 36]}})
    (tmp / "folder").mkdir()
    (tmp / "folder" / "model_index.json").write_text("{}")
    f["folder"] = tmp / "folder"
    return f


def _cases(client: Client, key: str, f: dict[str, Path]) -> list[tuple[str, str, object, str]]:
    """(surface, input, call, expected message regex)."""
    def add(path: Path) -> str:
        return client.predict(handle_file(str(path)), "mini-world", ["base"], key, api_name="/evaluate_add_checkpoint")[0]

    def train_status(run_id):
        return json.dumps(client.predict(run_id, key, api_name="/train_status")[INFO])

    def status(ids):
        return json.dumps(client.predict(ids, key, [], api_name="/evaluate_status")[5])

    def grid(ids):
        return str(client.predict(ids, None, key, api_name="/evaluate_grid")[2])

    def export(ids):
        return str(client.predict(ids, key, api_name="/evaluate_export")[2])

    def cancel(ids):
        return str(client.predict(ids, key, api_name="/evaluate_cancel")[0])

    deep = "[" * 100_000 + "]" * 100_000
    return [
        # ---- Train: every number bounded, the model policy, wrong types
        ("/train_start", "iterations 10^12", lambda: _train(client, key, iterations=10**12), "RECARE_MAX_TRAIN_ITERATIONS"),
        ("/train_start", "iterations 10^30", lambda: _train(client, key, iterations=10**30), "RECARE_MAX_TRAIN_ITERATIONS"),
        ("/train_start", "TI steps 10^9", lambda: _train(client, key, method="recare", ti=10**9), "RECARE_MAX_TI_STEPS"),
        ("/train_start", "stage-1 iterations 10^9", lambda: _train(client, key, method="recare", s1=10**9),
         "RECARE_MAX_STAGE1_ITERATIONS"),
        ("/train_start", "images 10^9", lambda: _train(client, key, num_images=10**9), "RECARE_MAX_IMAGES"),
        ("/train_start", "seed 10^30", lambda: _train(client, key, seed=10**30), "seed must be between 0 and"),
        ("/train_start", "seed -1", lambda: _train(client, key, seed=-1), "seed must be between 0 and"),
        ("/train_start", "model /etc (session inputs)", lambda: _train(client, key, task="session", model="/etc"),
         PUBLIC_REFUSAL),
        ("/train_start", "model: an existing diffusers folder",
         lambda: _train(client, key, task="session", model=str(f["folder"])), PUBLIC_REFUSAL),
        ("/train_start", "model: a missing folder",
         lambda: _train(client, key, task="session", model=str(f["folder"]) + "-missing"), PUBLIC_REFUSAL),
        ("/train_start", "iterations 'abc'", lambda: _train(client, key, iterations="abc"), "must be a number"),
        ("/train_start", "iterations a list", lambda: _train(client, key, iterations=[1]), "must be a number"),
        ("/train_start", "learning rate 'nan'", lambda: _train(client, key, lr="nan"), "must be a finite number"),
        ("/train_start", "task a number", lambda: _train(client, key, task=5), "must be a mini-world task's name"),
        ("/train_start", "unknown method", lambda: _train(client, key, method="rm -rf"), "unknown method"),
        ("/train_start", "owner key 'x'", lambda: _train(client, "x"), "no key for its runs"),
        # ---- Train: run ids
        ("/train_status", "run id a number", lambda: train_status(12345), "must be a run id"),
        ("/train_status", "run id '../../etc'", lambda: train_status("../../etc"), "is not a run id"),
        ("/train_cancel", "run id a bool", lambda: client.predict(True, key, api_name="/train_cancel")[0],
         "must be a run id"),
        ("/train_resume", "unknown run", lambda: client.predict("train-20990101-000000-abcdef", key,
                                                                 api_name="/train_resume")[0], "does not exist or is not yours"),
        ("/train_download", "a bundled evaluation run",
         lambda: client.predict("evaluate-demo-tench-base", "trained_params", key, api_name="/train_download")[1],
         "is not one of your training runs"),
        # ---- Compare: bounds, policy, types
        ("/evaluate_start", "seeds 10^9", lambda: _evaluate(client, key, seeds=10**9), "RECARE_MAX_EVAL_SEEDS"),
        ("/evaluate_start", "seeds 10^30", lambda: _evaluate(client, key, seeds=10**30), "RECARE_MAX_EVAL_SEEDS"),
        ("/evaluate_start", "CARE images 10^9", lambda: _evaluate(client, key, care_images=10**9),
         "RECARE_MAX_CARE_IMAGES"),
        ("/evaluate_start", "CLIP captions 10^9", lambda: _evaluate(client, key, clip=10**9), "RECARE_MAX_CLIP_CAPTIONS"),
        ("/evaluate_start", "seeds 'abc'", lambda: _evaluate(client, key, seeds="abc"), "must be a number"),
        ("/evaluate_start", "base model /etc", lambda: _evaluate(client, key, model="/etc"), PUBLIC_REFUSAL),
        ("/evaluate_start", "base model: an existing diffusers folder",
         lambda: _evaluate(client, key, model=str(f["folder"])), PUBLIC_REFUSAL),
        ("/evaluate_start", "CARE prompts nested 100,000 deep", lambda: _evaluate(client, key, care=deep),
         "RECARE_MAX_JSON_DEPTH"),
        ("/evaluate_start", "500 CARE prompts",
         lambda: _evaluate(client, key, care=json.dumps({"c": [f"p{i}" for i in range(500)]})), "RECARE_MAX_PROMPT_LIST"),
        ("/evaluate_start", "CARE prompts a number", lambda: _evaluate(client, key, care=5), "must be JSON text"),
        ("/evaluate_start", "models a number", lambda: _evaluate(client, key, picked=7), "must be run ids"),
        ("/evaluate_start", "attacks a text", lambda: _evaluate(client, key, attacks="erased"), "attacks must be a list"),
        ("/evaluate_start", "target prompt a list",
         lambda: client.predict(["base"], "tench", ["x"], CARE, ["erased"], 1, 1, 4, "", "mini-world", key,
                                api_name="/evaluate_start")[0], "target prompt must be text"),
        ("/evaluate_start", "an unknown run as a model", lambda: _evaluate(client, key, picked=("base", "train-x")),
         "does not exist or is not yours"),
        ("/evaluate_start", "a bundled evaluation as a model",
         lambda: _evaluate(client, key, picked=("evaluate-demo-tench-base",)), "is not a model"),
        # ---- Compare: ids of every other endpoint
        ("/evaluate_status", "ids a number", lambda: status(5), "must be run ids"),
        ("/evaluate_status", "ids a float", lambda: status(1.5), "must be run ids"),
        ("/evaluate_status", "ids a bool", lambda: status(True), "must be run ids"),
        ("/evaluate_status", "200 copies of one id", lambda: status(["evaluate-demo-tench-base"] * 200),
         "RECARE_MAX_IDS_PER_REQUEST"),
        ("/evaluate_status", "ids holding a number", lambda: status(["evaluate-demo-tench-base", 7]), "must be run ids"),
        ("/evaluate_grid", "ids a number", lambda: grid(5), "must be run ids"),
        ("/evaluate_export", "ids a float", lambda: export(2.5), "must be run ids"),
        ("/evaluate_cancel", "ids a bool", lambda: cancel(False), "must be run ids"),
        # ---- Compare: uploads inspected before they are inflated
        ("/evaluate_add_checkpoint", "deflate bomb .pt (64 MB of zeros in ~64 KB)", lambda: add(f["bomb"]),
         "is compressed, which torch.save never writes"),
        ("/evaluate_add_checkpoint", "safetensors listing 10,000 empty tensors", lambda: add(f["many"]),
         "lists 10,000 tensors and the base UNet has"),
        ("/evaluate_add_checkpoint", "2 MB safetensors header (limit 1 MB)", lambda: add(f["header"]),
         "RECARE_MAX_CHECKPOINT_HEADER_BYTES"),
        ("/evaluate_add_checkpoint", "a tensor of another shape", lambda: add(f["shape"]),
         "does not fit this base model"),
        # ---- the demo's re-run
        ("/demo_rerun", "task a number", lambda: client.predict(5, key, api_name="/demo_rerun")[0],
         "no results for the task"),
    ]


def _good_checkpoint(client: Client, key: str, tmp_path: Path) -> str:
    """Upload a checkpoint that fits the mini world's UNet (one of its own tensors); returns its run id."""
    import torch
    from safetensors.torch import save_file

    from recare.models import load_pipeline

    unet = load_pipeline("mini-world", device="cpu", dtype="fp32").unet
    folder = tmp_path / "good"
    folder.mkdir()
    save_file({"conv_in.bias": unet.state_dict()["conv_in.bias"].clone() + torch.tensor(0.0)},
              folder / "trained_params.safetensors")
    message = client.predict(handle_file(str(folder / "trained_params.safetensors")), "mini-world", ["base"], key,
                             api_name="/evaluate_add_checkpoint")[0]
    assert message.startswith("✓ Added"), message
    return message.split("**")[1]


def test_hostile_jobs_suite(public_app, tmp_path):
    """Every case: a clear message naming what was wrong, no server path, quick, nothing left, the app serves on."""
    f = _files(tmp_path)
    client, key = _client(public_app), new_browser_key()
    saved = _good_checkpoint(client, key, tmp_path)  # saved work the hostile requests must not touch
    before = _run_folders(public_app)
    rows = []
    started_all = time.perf_counter()
    for surface, name, call, expect in _cases(client, key, f):
        started = time.perf_counter()
        try:
            message = str(call())
        except Exception as e:  # what a client sees when the app itself failed
            message = f"{type(e).__name__}: {e}"
        seconds = time.perf_counter() - started
        matched = re.search(expect, message) is not None
        leaks = [p for p in (str(tmp_path), str(public_app["root"]), str(REPO)) if p in message]
        rows.append((surface, name, message, matched and not leaks, seconds <= CASE_S, _alive(client), seconds))
    total_s = time.perf_counter() - started_all

    passed = sum(ok and quick and alive for _, _, _, ok, quick, alive, _ in rows)
    lines = [f"# Hostile job requests (public app): {passed} of {len(rows)} cases passed ({total_s:.1f} s)", "",
             "| # | endpoint | input | message shown | expected, no path | s | app served the next request |",
             "|---|---|---|---|---|---|---|"]
    for i, (surface, name, message, ok, quick, alive, seconds) in enumerate(rows, 1):
        shown = message.replace("|", "\\|").replace("\n", " ")[:200]
        lines.append(f"| {i} | {surface} | {name} | {shown} | {'yes' if ok else '**NO**'} | "
                     f"{seconds:.2f}{'' if quick else ' **slow**'} | {'yes' if alive else '**NO**'} |")
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_text("\n".join(lines) + "\n", encoding="utf-8")

    failed = [f"{surface} / {name}: {message[:300]}" for surface, name, message, ok, quick, alive, _ in rows
              if not (ok and quick and alive)]
    assert len(rows) >= 40
    assert not failed, "\n".join(failed)
    assert _run_folders(public_app) == before  # a refusal leaves no run folder behind
    assert saved in json.dumps(client.predict(["base"], key, api_name="/evaluate_models"))  # nothing lost


def test_invented_keys_from_one_address_share_its_limit(public_app):
    """Six invented owner keys from one address: two jobs start (RECARE_MAX_JOBS_PER_CLIENT=2), four are refused."""
    client = _client(public_app)
    keys = [new_browser_key() for _ in range(6)]
    before = _run_folders(public_app)
    messages = [_train(client, key, iterations=1, num_images=1) for key in keys]
    started = [(k, m.split("**")[1]) for k, m in zip(keys, messages) if m.startswith("✓ Started")]
    refused = [m for m in messages if "RECARE_MAX_JOBS_PER_CLIENT" in m]
    try:
        assert len(started) == 2 and len(refused) == 4, messages
        assert all("Nothing was started" in m and "from your address" in m for m in refused)
        assert len(_run_folders(public_app) - before) == 2
        assert _alive(client)
    finally:
        for key, run_id in started:
            client.predict(run_id, key, api_name="/train_cancel")
        for key, run_id in started:
            deadline = time.monotonic() + 120
            while client.predict(run_id, key, api_name="/train_status")[INFO]["state"] in ("queued", "running"):
                assert time.monotonic() < deadline
                time.sleep(0.5)


def test_a_batch_over_the_limit_starts_nothing(public_app):
    """The demo's re-run is three jobs; with a per-client limit of two none starts, and the message says why."""
    client, key = _client(public_app), new_browser_key()
    before = _run_folders(public_app)
    message = client.predict("tench", key, api_name="/demo_rerun")[0]
    assert "this request starts 3 jobs" in message and "RECARE_MAX_JOBS_PER_CLIENT" in message, message
    assert "Nothing was started" in message
    assert _run_folders(public_app) == before


def test_memory_stays_bounded_through_the_hostile_requests(public_app, tmp_path):
    """The app runs in this process: its peak memory grows by less than 300 MB over the worst requests."""
    client, key = _client(public_app), new_browser_key()
    bomb = deflated_torch_file(tmp_path / "ReCARE-Diffusers-UNet.pt", mib=256)  # 256 MB once inflated
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for _ in range(3):
        _evaluate(client, key, seeds=10**9)
        client.predict(["evaluate-demo-tench-base"] * 10_000, key, [], api_name="/evaluate_status")
        client.predict(handle_file(str(bomb)), "mini-world", ["base"], key, api_name="/evaluate_add_checkpoint")
        _evaluate(client, key, care="[" * 200_000 + "]" * 200_000)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert grown_mb < 300, f"peak memory grew by {grown_mb:.0f} MB"
    assert _alive(client)


def test_a_job_error_quoting_a_server_path_shows_its_last_part_only(public_app):
    """A failed job's error (written by the worker) is shown without the server's folders in public mode."""
    from recare.runs import RunStore

    client, key = _client(public_app), new_browser_key()
    secret = str(public_app["root"] / "deep" / "inside" / "weights.pt")
    run = RunStore(public_app["runs"]).create("train", {"train": {}}, owner=key)
    run.update_status(state="failed", error=f"trained weights not found: {secret} does not exist.")
    status = client.predict(run.id, key, api_name="/train_status")
    shown = status[0] + json.dumps(status[INFO])
    assert "weights.pt does not exist" in shown and str(public_app["root"]) not in shown
