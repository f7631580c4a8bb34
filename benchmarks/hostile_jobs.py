"""Hostile job requests against `python app.py --public`: the answer, its time, and the app's memory.

    python -m benchmarks.hostile_jobs            # prints one table (markdown)

Starts the app as its own process with a fresh run store, waits until it answers, then sends the
requests that took the app down or past its rules before `recare.jobs.requests` (issue 21): huge
counts, a server folder as the model, wrong types, many invented owner keys from one address, a
deflate-compressed checkpoint, deep JSON, 200 ids. For each: the first words of the answer, seconds,
the app's resident memory after it (VmRSS), and the run folders it left. Linux only (/proc).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    from gradio_client import Client, handle_file

    sys.path.insert(0, str(REPO))
    from tests.helpers_hostile import deflated_torch_file
    from ui.common import new_browser_key

    root = Path(tempfile.mkdtemp(prefix="recare-hostile-jobs-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RECARE_HOME": str(root / "home"), "RECARE_WORKSPACE": str(root / "ws")}
    log = open(root / "app.log", "w")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--public", "--port", str(port), "--runs-dir",
                             str(root / "runs")], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = None
    while client is None and proc.poll() is None and time.perf_counter() - started < 300:
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(root / "dl"))
        except Exception:
            time.sleep(1)
    if client is None:
        raise SystemExit((root / "app.log").read_text()[-2000:])
    try:
        client.predict("mini-world", api_name="/load_model")
        key = new_browser_key()
        folder = root / "a-model"
        folder.mkdir()
        (folder / "model_index.json").write_text("{}")
        bomb = deflated_torch_file(root / "ReCARE-Diffusers-UNet.pt", mib=256)
        care = json.dumps({"freshwater": ["a lake"]})

        def train(k=key, task="tench", model="mini-world", iterations=1):
            return client.predict(task, "esd", "a photo of a tench", "tench", "fish", None, iterations, 1e-5, 2, 2,
                                  "noxattn", 42, 1, 0, model, k, api_name="/train_start")[0]

        def evaluate(seeds=1, care_prompts=care, picked=("base",)):
            return client.predict(list(picked), "tench", "a photo of a tench", care_prompts, ["erased"], seeds, 1, 4,
                                  "", "mini-world", key, api_name="/evaluate_start")[0]

        requests = [
            ("/evaluate_start", "seeds = 10^9", lambda: evaluate(seeds=10**9)),
            ("/train_start", "iterations = 10^12", lambda: train(iterations=10**12)),
            ("/train_start", "iterations = 10^30", lambda: train(iterations=10**30)),
            ("/train_start", "a server folder as the model", lambda: train(task="session", model=str(folder))),
            ("/evaluate_status", "ids = 5 (a number)",
             lambda: json.dumps(client.predict(5, key, [], api_name="/evaluate_status")[5])),
            ("/evaluate_status", "200 copies of one id",
             lambda: json.dumps(client.predict(["x-1"] * 200, key, [], api_name="/evaluate_status")[5])),
            ("/evaluate_start", "CARE prompts nested 100,000 deep",
             lambda: evaluate(care_prompts="[" * 100_000 + "]" * 100_000)),
            ("/evaluate_add_checkpoint", f"deflated .pt, {bomb.stat().st_size / 1024:.0f} KB -> 256 MB",
             lambda: client.predict(handle_file(str(bomb)), "mini-world", ["base"], key,
                                    api_name="/evaluate_add_checkpoint")[0]),
        ] + [("/train_start", f"invented key {i + 1} of 6", lambda: train(k=new_browser_key())) for i in range(6)]
        print(f"app: `python app.py --public`, pid {proc.pid}, answering after {time.perf_counter() - started:.0f} s, "
              f"VmRSS {_rss_mb(proc.pid):.0f} MB\n")
        print("| endpoint | request | answer (first 110 characters) | s | app VmRSS after (MB) | run folders |")
        print("|---|---|---|---|---|---|")
        for endpoint, name, call in requests:
            t = time.perf_counter()
            try:
                answer = str(call())
            except Exception as e:
                answer = f"{type(e).__name__}: {e}"
            seconds = time.perf_counter() - t
            runs = len([p for p in (root / "runs").iterdir() if not p.name.startswith(".")]) \
                if (root / "runs").is_dir() else 0
            shown = answer.replace("|", "\\|").replace("\n", " ")[:110]
            print(f"| {endpoint} | {name} | {shown} | {seconds:.2f} | {_rss_mb(proc.pid):.0f} | {runs} |", flush=True)
        alive = "Loaded" in client.predict("mini-world", api_name="/load_model")
        print(f"\nthe app served the next request: {'yes' if alive else 'NO'}")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


if __name__ == "__main__":
    main()
