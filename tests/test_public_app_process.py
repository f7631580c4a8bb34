"""`python app.py --public` as its own process, with its own run store, under six kinds of hostile job request.

Huge counts, a server folder as the model, wrong types, many invented owner keys from one address,
and a deflate-compressed checkpoint: each is refused with a clear sentence before any work starts
(no run folder appears for it), the app process's memory stays within 300 MB of where it started,
and it answers the next request.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from tests.helpers_hostile import deflated_torch_file
from tests.test_app_fixtures import installed_mini_world
from ui.common import new_browser_key

REPO = Path(__file__).resolve().parent.parent
PUBLIC_REFUSAL = "this public app loads only"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def app_process(tmp_path_factory):
    if installed_mini_world() is None or not Path("/proc/self/status").is_file():
        pytest.skip("needs the mini world (checkpoints/mini-world) and Linux /proc")
    root = tmp_path_factory.mktemp("public-process")
    port = _free_port()
    env = {**os.environ, "RECARE_HOME": str(root / "home"), "RECARE_WORKSPACE": str(root / "ws"),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    env.pop("SPACE_ID", None)
    log = open(root / "app.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--public", "--port", str(port),
                             "--runs-dir", str(root / "runs")], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 240
    client = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            client = Client(url, verbose=False, download_files=str(root / "downloads"))
            break
        except Exception:
            time.sleep(1)
    try:
        assert client is not None, (root / "app.log").read_text()[-3000:]
        yield {"client": client, "pid": proc.pid, "runs": root / "runs", "root": root}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _runs(app) -> set[str]:
    runs = app["runs"]
    return {p.name for p in runs.iterdir() if not p.name.startswith(".")} if runs.is_dir() else set()


@pytest.mark.slow
def test_six_hostile_requests_are_refused_before_any_work(app_process, tmp_path):
    client, pid = app_process["client"], app_process["pid"]
    key = new_browser_key()
    assert "Loaded" in client.predict("mini-world", api_name="/load_model")
    rss_before = _rss_mb(pid)
    runs_before = _runs(app_process)
    folder = tmp_path / "a-model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    care = json.dumps({"freshwater": ["a lake"]})

    def train(key, task="tench", model="mini-world", iterations=1, num_images=1):
        return client.predict(task, "esd", "a photo of a tench", "tench", "fish", None, iterations, 1e-5, 2, 2,
                              "noxattn", 42, num_images, 0, model, key, api_name="/train_start")[0]

    answers = {
        "huge seeds": client.predict(["base"], "tench", "a photo of a tench", care, ["erased"], 10**9, 1, 4, "",
                                     "mini-world", key, api_name="/evaluate_start")[0],
        "huge iterations": train(key, iterations=10**12),
        "server folder as the model": train(key, task="session", model=str(folder)),
        "ids as a number": json.dumps(client.predict(5, key, [], api_name="/evaluate_status")[5]),
        "compressed checkpoint": client.predict(
            handle_file(str(deflated_torch_file(tmp_path / "ReCARE-Diffusers-UNet.pt", mib=128))), "mini-world",
            ["base"], key, api_name="/evaluate_add_checkpoint")[0],
    }
    expected = {"huge seeds": "RECARE_MAX_EVAL_SEEDS", "huge iterations": "RECARE_MAX_TRAIN_ITERATIONS",
                "server folder as the model": PUBLIC_REFUSAL, "ids as a number": "must be run ids",
                "compressed checkpoint": "is compressed"}
    for name, answer in answers.items():
        assert expected[name] in answer, (name, answer)
        assert str(tmp_path) not in answer and str(app_process["root"]) not in answer, (name, answer)
    assert _runs(app_process) == runs_before  # refused before any run existed

    # many invented keys from one address: RECARE_MAX_JOBS_PER_CLIENT (4) bounds them, not the keys
    keys = [new_browser_key() for _ in range(6)]
    started = []
    messages = []
    for k in keys:
        message = train(k)
        messages.append(message)
        if message.startswith("✓ Started"):
            started.append((k, message.split("**")[1]))
    try:
        assert len(started) == 4, messages
        assert all("RECARE_MAX_JOBS_PER_CLIENT" in m and "Nothing was started" in m for m in messages[4:]), messages
    finally:
        for k, run_id in started:
            client.predict(run_id, k, api_name="/train_cancel")
    assert _rss_mb(pid) - rss_before < 300, (rss_before, _rss_mb(pid))
    assert "Loaded" in client.predict("mini-world", api_name="/load_model")
