"""How long a training run will take here, from the speed measured by earlier runs on the same model and device.

    speed = measured_speed(store, "mini-world", "cpu")   # None until a run has measured it
    seconds = estimate_seconds(config, speed)            # None when a needed speed is unknown

Every training job writes one metrics line per step (`recare.runs.Run.append_metrics`). The
seconds per step of the three kinds of step, the erase iteration (stage-1 erase and the ESD
baseline: one student and one teacher pass), the stage-2 iteration (erase plus retain terms) and the
textual-inversion step, are the medians over the latest runs of that model on that device (a
cancelled run counts too). The result is also kept in `<runs>/.train-speed.json`, so the
measurement survives deleting the runs it came from.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Iterable

from recare.atomic import atomic_write_json, read_json_object
from recare.timestamps import now_iso, to_seconds

SPEED_FILE = ".train-speed.json"
KINDS = ("erase", "stage2", "textual_inversion")
_STAGE_KIND = {"stage1.erase": "erase", "esd": "erase", "stage2": "stage2", "stage1.textual_inversion": "textual_inversion"}
MAX_RUNS = 12           # newest runs read per measurement
MAX_STEP_S = 3600.0     # a step longer than this is a paused or suspended machine, not speed


def step_seconds(rows: Iterable[dict]) -> dict[str, list[float]]:
    """Seconds of every step in metrics rows, by kind ("erase", "stage2", "textual_inversion").

    A row's own "seconds" is used when it has one (erase loops time their step); otherwise the
    time since the previous row of the same stage, when that row was the previous step.

    Args:
        rows: metrics.jsonl lines (dicts with stage, step and time).
    """
    out: dict[str, list[float]] = {k: [] for k in KINDS}
    previous: dict | None = None
    for row in rows:
        kind = _STAGE_KIND.get(str(row.get("stage")))
        if kind is not None:
            seconds = row.get("seconds")
            if not isinstance(seconds, (int, float)) and previous is not None \
                    and previous.get("stage") == row.get("stage") and row.get("step") == (previous.get("step") or 0) + 1:
                now, then = to_seconds(row.get("time")), to_seconds(previous.get("time"))
                seconds = now - then if now is not None and then is not None else None
            if isinstance(seconds, (int, float)) and 0 < seconds < MAX_STEP_S:
                out[kind].append(float(seconds))
        previous = row
    return out


def _key(model: str, device: str) -> str:
    return f"{model}|{device}"


def measured_speed(store, model: str, device: str) -> dict | None:
    """Seconds per step of each kind for `model` on `device`, or None when nothing was measured yet.

    Args:
        store: the `recare.runs.RunStore` whose training runs are read (every owner's: only timings are used).
        model: the base model name ("mini-world", a hub id, a folder).
        device: the resolved device the jobs ran on ("cpu", "cuda:0").

    Returns:
        {"erase": s, "stage2": s, "textual_inversion": s (each only when measured), "runs": n,
        "source": "measured by n runs on this device" or "cached measurement"}.
    """
    samples: dict[str, list[float]] = {k: [] for k in KINDS}
    used = 0
    for run in store.list(kind="train"):
        if used >= MAX_RUNS:
            break
        if run.bundled:
            continue
        try:
            status, config = run.stored_status(), run.config()
        except Exception:  # a half-written or foreign folder: no timing from it
            continue
        if str(status.get("device") or "") != device or (config.get("train") or {}).get("model") != model:
            continue
        found = step_seconds(run.read_metrics())
        if any(found.values()):
            used += 1
            for kind, values in found.items():
                samples[kind].extend(values)
    cache = read_json_object(Path(store.root) / SPEED_FILE)
    cached = cache.get(_key(model, device)) if isinstance(cache.get(_key(model, device)), dict) else {}
    speed = {k: float(statistics.median(v)) for k, v in samples.items() if v}
    if speed:
        merged = {**{k: cached[k] for k in KINDS if isinstance(cached.get(k), (int, float))}, **speed,
                  "runs": used, "updated": now_iso()}
        if merged != {**cached, "updated": merged["updated"]}:
            try:
                atomic_write_json(Path(store.root) / SPEED_FILE, {**cache, _key(model, device): merged})
            except OSError:
                pass  # a read-only runs folder: the estimate still works from the runs
        return {**merged, "source": f"measured by {used} earlier run{'s' if used != 1 else ''} on this device"}
    if any(isinstance(cached.get(k), (int, float)) for k in KINDS):
        return {**cached, "source": "cached measurement of earlier runs on this device"}
    return None


def training_plan(config) -> list[tuple[str, int]]:
    """The loops `config` runs, in order, with their steps: [("stage1.erase[1]", 100), ("stage1.textual_inversion[1]", 1000), ...].

    Args:
        config: a `recare.config.TrainConfig`.
    """
    plan: list[tuple[str, int]] = []
    if config.stage1 is not None:
        for r in range(1, config.stage1.n_iterations + 1):
            plan += [(f"stage1.erase[{r}]", config.stage1.esd.iterations),
                     (f"stage1.textual_inversion[{r}]", config.stage1.textual_inversion.steps)]
    if config.stage2 is not None:
        plan.append(("stage2", config.stage2.iterations))
        if config.stage1 is not None:   # the closing search: each round's first inversion and the iterations after it
            for k in range(1, config.stage2.closing_rounds + 1):
                plan += [(f"closing.textual_inversion[{k}]", config.closing_ti_steps),
                         (f"closing.erase[{k}]", config.stage2.closing_iterations)]
    if config.esd is not None:
        plan.append(("esd", config.esd.iterations))
    return plan


def estimate_seconds(config, speed: dict | None, *, longest: bool = False) -> float | None:
    """Seconds the training loops of `config` take at `speed` (model loading and image generation not counted).

    Stage 1's search stops at the first inversion of a round that draws the target strongly enough, so a
    round runs between one and `stage1.max_inversions` textual inversions: the estimate counts one, and
    `longest=True` counts them all (the probes between them are not counted). Likewise the closing search
    (`stage2.closing_rounds`) may end after its first inversion: the estimate counts one closing round (one
    inversion and its stage-2 iterations), `longest=True` every round with all its inversions.

    Args:
        config: a `recare.config.TrainConfig`.
        speed: `measured_speed`'s result.
        longest: count every inversion stage 1's search may run.

    Returns:
        The estimate, or None when a needed kind of step has not been measured.
    """
    if not speed:
        return None
    need: dict[str, int] = {}
    if config.stage1 is not None:
        s1 = config.stage1
        need["erase"] = s1.n_iterations * s1.esd.iterations
        need["textual_inversion"] = (s1.n_iterations * (s1.max_inversions if longest else 1)
                                     * s1.textual_inversion.steps)
    if config.stage2 is not None:
        need["stage2"] = config.stage2.iterations
        s2 = config.stage2
        if config.stage1 is not None and s2.closing_rounds > 0:
            rounds = s2.closing_rounds if longest else 1
            need["stage2"] += rounds * s2.closing_iterations
            need["textual_inversion"] += rounds * (s2.closing_attempts if longest else 1) * config.closing_ti_steps
    if config.esd is not None:
        need["erase"] = need.get("erase", 0) + config.esd.iterations
    if any(not isinstance(speed.get(kind), (int, float)) for kind in need):
        return None
    return float(sum(n * speed[kind] for kind, n in need.items()))


__all__ = ["measured_speed", "estimate_seconds", "training_plan", "step_seconds", "SPEED_FILE"]
