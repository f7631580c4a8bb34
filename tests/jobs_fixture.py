"""Fake jobs for tests/test_jobs.py. Spawned workers import this module: keep it light (no torch)."""

from __future__ import annotations

import json
import time

from recare.errors import TrainingError
from recare.progress import emit


def next_value(value: int, step: int) -> int:
    """One deterministic step of the fake computation (order matters, so a skipped or repeated step shows)."""
    return (value * 31 + step * step + 7) % 1_000_003


def expected_value(steps: int) -> int:
    """What `accumulate` returns for `steps` steps, computed without the runner."""
    value = 0
    for step in range(steps):
        value = next_value(value, step)
    return value


def accumulate(run, progress, cancel) -> dict:
    """A long job: `steps` steps of `sleep_s` each, resume state saved after every step.

    config.json: {"steps": int, "sleep_s": float}.
    """
    config = run.config()
    steps, sleep_s = int(config["steps"]), float(config["sleep_s"])
    step, value = 0, 0
    if run.has_state():
        state = json.loads((run.state_dir / "state.json").read_text())
        step, value = state["step"], state["value"]
    while step < steps:
        cancel.raise_if_cancelled("accumulate")
        time.sleep(sleep_s)
        value = next_value(value, step)
        step += 1
        saved = {"step": step, "value": value}
        run.save_state(lambda folder: (folder / "state.json").write_text(json.dumps(saved)))
        emit(progress, "accumulate", step, steps, f"step {step} of {steps}", value=float(value))
    return {"value": value, "steps": steps}


def fail_user(run, progress, cancel) -> None:
    """A job that stops for a reason the user can fix."""
    emit(progress, "train", 1, 10, loss=float("nan"))
    raise TrainingError("the loss became NaN at step 1; lower the learning rate")


def fail_bug(run, progress, cancel) -> None:
    """A job with a bug."""
    settings: dict = {}
    return settings["missing"]
