"""The reviewer demo: precomputed evaluation results shipped with the app, and the job that recomputes them.

    pack_demo({"tench": {"base": RUN, "esd": RUN, "recare": RUN}, ...}, out=Path("assets/demo"))
    bundled_runs(Path("assets/demo"))      # the run folders to hand to RunStore(bundled=...)
    read_index(Path("assets/demo"))        # index.json: tasks, models, the commands that made them
    rerun_job(entry, device)               # (target, settings) to submit to the JobRunner for one model
    run_demo_rerun_job(run, progress, cancel)   # job target: train with the world's settings, then evaluate

A bundle cannot hold trained weights (about 6 MB per mini-world model), so it holds evaluation
results only, one trimmed, read-only evaluation run folder per (task, model):

    index.json                              format, date, tasks, models, how each result was made and
                                            how to recompute it (`pack_command`, `runs[...]`)
    evaluate-demo-<task>-<model>/
        config.json     the evaluation's config.json plus "compare" (the label Compare shows, e.g.
                        "tench · ReCARE") and "demo" (task, model, method, source run)
        status.json     state "done", kind "evaluate" (so Compare lists it like any evaluation run)
        manifest.json   as the evaluation wrote it (settings, seeds, fingerprints, versions, timing)
        metrics.json    as the evaluation wrote it (what the radars draw)
        grid.png        a few seeds of the target prompt (top row) and one CARE prompt (bottom row)
        records.csv     only when it is small (`RECORDS_MAX_BYTES`)

The whole bundle must stay under `MAX_BYTES` (3 MB): `pack_demo` refuses otherwise and leaves the
previous bundle as it was (the folder is built aside, then swapped in).

Re-run: the base model's result is one evaluation job with the same `EvaluationConfig`
(`recare.eval.run:run_evaluation_job`); a trained model's is one job of kind "evaluate" (so Compare
lists it) whose target, `recare.demo:run_demo_rerun_job`, first trains into `<run>/train/` with the
world's recommended settings for the task and method (`recare.workflows.task_train_config`, as
`python -m recare train --task T --method M`), then evaluates that UNet into the run folder itself
(metrics.json at its top, as Compare reads it). Both parts resume: a cancelled training continues
from `<run>/train/state/`, a finished one is not repeated, and the evaluation keeps the images
already made.
"""

from __future__ import annotations

import io
import json
import shutil
import types
from pathlib import Path
from typing import Any, Mapping

from recare.errors import ConfigError, RecareError
from recare.progress import CancelToken, ProgressCallback

FORMAT, FORMAT_VERSION = "recare-demo", 1
INDEX_FILE = "index.json"
GRID_FILE = "grid.png"
MAX_BYTES = 3 * 1024 * 1024          # the whole bundle (issue 14: <= 3 MB; 3 MiB)
RECORDS_MAX_BYTES = 96 * 1024        # records.csv is copied only below this size
GRID_CELL = 128                      # grid cells are at most this many pixels wide (mini world: 64, kept)
GRID_GAP = 2                         # white pixels between grid.png cells
RUN_PREFIX = "evaluate-demo"
TRAIN_DIR = "train"                  # where a re-run trains, inside its own run folder
EVALUATE_TARGET = "recare.eval.run:run_evaluation_job"
RERUN_TARGET = "recare.demo:run_demo_rerun_job"
BASE = "base"
# model label -> (training method, the name shown); "base" is the untrained model
MODELS: Mapping[str, tuple[str | None, str]] = types.MappingProxyType({
    BASE: (None, "base"),
    "esd": ("esd", "ESD"),
    "recare": ("recare", "ReCARE"),
    "recare-no-adv": ("recare-no-adv", "ReCARE w/o adversarial tokens"),
    "recare-no-retain": ("recare-no-retain", "ReCARE w/o retain"),
})
COPIED_FILES = ("manifest.json", "metrics.json")
# TrainConfig fields that name inputs or the machine, not how the model was trained
_TRAIN_CONTEXT_FIELDS = ("images", "careset", "device", "dtype", "save_every", "outputs", "gradient_checkpointing")


def run_name(task: str, model: str) -> str:
    """The bundled run folder's name (a valid run id): `evaluate-demo-<task>-<model>`."""
    return f"{RUN_PREFIX}-{task}-{model}"


def model_title(task: str, model: str) -> str:
    """The label Compare shows for a bundled result, e.g. "tench · ReCARE"."""
    return f"{task} · {MODELS[model][1]}"


# ---------------------------------------------------------------------------------------------
# packing


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path.parent} is not a finished evaluation run: it has no {path.name} ({what}).") from None
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}).") from None


def _check_name(kind: str, value: str) -> None:
    import re

    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_]{0,40}", value):
        raise ConfigError(f"demo {kind} {value!r} must be letters, digits and '_' (e.g. 'tench', 'van_gogh').")


def grid_images(run_dir: Path, records: list[dict], evaluation, seeds: int) -> tuple[list[list], list[dict]]:
    """`seeds` images of the target prompt (first row) and of the first CARE prompt (second row) of an evaluation.

    The target row is the "erased" attack's images (the plain target prompt), else the first attack's.
    Images a nudity detector flagged are blurred (`recare.safety.blur`): nothing explicit is shown or stored.

    Returns:
        (rows of PIL images, one {"attack", "concept", "prompt", "seeds"} per row).
    """
    from PIL import Image

    from recare.safety import blur

    attacks = [a for a in ("erased", *evaluation.attacks) if any(r["attack"] == a for r in records)]
    rows: list[list[dict]] = []
    if attacks:
        chosen = [r for r in records if r["attack"] == attacks[0]]
        prompt = chosen[0]["prompt"]
        rows.append(sorted((r for r in chosen if r["prompt"] == prompt), key=lambda r: r["seed"])[:seeds])
    care = [r for r in records if r["attack"] == "care"]
    if care:
        prompt = care[0]["prompt"]
        rows.append(sorted((r for r in care if r["prompt"] == prompt), key=lambda r: r["seed"])[:seeds])
    rows = [row for row in rows if row]
    if not rows:
        raise ConfigError(f"{run_dir} has no attack or CARE images to show in a grid.")
    hide = evaluation.detector == "nudenet"
    images = []
    for row in rows:
        line = []
        for record in row:
            path = run_dir / record["file"]
            if not path.is_file():
                raise ConfigError(f"{run_dir} lacks the image {record['file']} that its records.csv lists.")
            with Image.open(path) as im:
                image = im.convert("RGB")
            if hide and record.get("positive"):
                image = blur(image)
            image.thumbnail((GRID_CELL, GRID_CELL))
            line.append(image)
        images.append(line)
    described = [{"attack": row[0]["attack"], "concept": row[0]["concept"], "prompt": row[0]["prompt"],
                  "seeds": [r["seed"] for r in row]} for row in rows]
    return images, described


def _grid(run_dir: Path, records: list[dict], evaluation, seeds: int) -> tuple[bytes, dict]:
    """A PNG of `grid_images` (rows: target prompt, a CARE prompt; columns: seeds), 2 px apart.

    Returns:
        (the PNG bytes, {"rows": [{"attack", "concept", "prompt", "seeds"}], "cell": px}).
    """
    from PIL import Image

    images, described = grid_images(run_dir, records, evaluation, seeds)
    cell_w = max(im.width for line in images for im in line)
    cell_h = max(im.height for line in images for im in line)
    gap, cols = GRID_GAP, max(len(line) for line in images)
    canvas = Image.new("RGB", (cols * cell_w + (cols - 1) * gap, len(images) * cell_h + (len(images) - 1) * gap),
                       "white")
    for i, line in enumerate(images):
        for j, im in enumerate(line):
            canvas.paste(im, (j * (cell_w + gap), i * (cell_h + gap)))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue(), {"rows": described, "cell": [cell_w, cell_h]}


def grid_cells(png_path: Path, grid: dict) -> list[list]:
    """The images of a bundled grid.png cut apart again: rows of PIL images (`grid` is the index entry's "grid").

    Args:
        png_path: the bundled grid.png.
        grid: {"rows": [{"seeds": [...]}, ...], "cell": [w, h]} as `pack_demo` wrote it.
    """
    from PIL import Image

    w, h = (int(v) for v in grid["cell"])
    out = []
    with Image.open(png_path) as im:
        canvas = im.convert("RGB")
    for i, row in enumerate(grid["rows"]):
        out.append([canvas.crop((j * (w + GRID_GAP), i * (h + GRID_GAP), j * (w + GRID_GAP) + w,
                                 i * (h + GRID_GAP) + h)) for j in range(len(row["seeds"]))])
    return out


def _training_source(evaluation) -> dict | None:
    """What the evaluated UNet was trained with, read from its training run folder when it is still there."""
    if not evaluation.unet:
        return None
    folder = Path(evaluation.unet).expanduser()
    folder = folder if folder.is_dir() else folder.parent
    out: dict[str, Any] = {"run": folder.name}
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        out["train"] = config.get("train") if isinstance(config, dict) else None
    except (OSError, ValueError):
        out["train"] = None
    try:
        result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        seconds = result.get("seconds") if isinstance(result, dict) else None
        out["seconds"] = float(seconds) if isinstance(seconds, (int, float)) else None
    except (OSError, ValueError):
        out["seconds"] = None
    return out


def _how_trained(train: dict | None) -> dict | None:
    """The training settings that decide the weights (inputs and machine fields left out)."""
    if not isinstance(train, dict):
        return None
    return {k: v for k, v in train.items() if k not in _TRAIN_CONTEXT_FIELDS}


def rerun_train_config(task: str, model: str) -> dict | None:
    """The TrainConfig (as a dict) that recomputes `model` on a mini-world `task`: the world's recommended
    settings for the task and the method (`recare.workflows.task_train_config`); None for the base model
    or when `task` is not a mini-world task (then only the evaluation can be recomputed).

    Args:
        task: the demo's task name.
        model: a key of `MODELS`.
    """
    from recare.workflows import mini_world_task, task_train_config

    method = MODELS[model][0]
    if method is None:
        return None
    try:
        return task_train_config(mini_world_task(task), method).to_dict()
    except ConfigError:
        return None


def _pack_one(task: str, model: str, source: Path, folder: Path, out_text: str, grid_seeds: int,
              records_max_bytes: int) -> dict:
    """Write one trimmed run folder into `folder`; return its index entry."""
    from recare import __version__
    from recare.eval.config import config_from_file
    from recare.eval.records import read_records
    from recare.metrics_io import read_metrics_json
    from recare.atomic import atomic_write_bytes, atomic_write_json
    from recare.runs import DONE
    from recare.timestamps import now_iso

    source = Path(source).expanduser().resolve()
    if not source.is_dir():
        raise ConfigError(f"--eval {task}:{model}={source}: not a folder.")
    settings = _read_json(source / "config.json", "the evaluation settings")
    try:
        evaluation = config_from_file(settings)
    except RecareError as e:  # a foreign config.json: say which run
        raise ConfigError(f"{source}/config.json is not an evaluation's settings ({e}).") from None
    metrics = read_metrics_json(source)
    _read_json(source / "manifest.json", "the evaluation did not finish")
    if evaluation.task and evaluation.task != task:
        raise ConfigError(f"{source.name} evaluated the task {evaluation.task!r}, not {task!r}.")
    if (model == BASE) != (evaluation.unet is None):
        raise ConfigError(f"{source.name} evaluated {'trained weights' if evaluation.unet else 'the base model'}, "
                          f"but is given as {task}:{model}.")
    trained = _training_source(evaluation)
    trained_method = ((trained or {}).get("train") or {}).get("method")
    if trained_method and trained_method != MODELS[model][0]:
        raise ConfigError(f"{source.name} evaluated a UNet trained with the method {trained_method!r} "
                          f"({trained['run']}), but is given as {task}:{model}.")
    name = run_name(task, model)
    target = folder / name
    target.mkdir()
    for file in COPIED_FILES:
        shutil.copyfile(source / file, target / file)
    records_path = source / "records.csv"
    records = read_records(source)
    with_records = records_path.stat().st_size <= records_max_bytes
    if with_records:
        shutil.copyfile(records_path, target / "records.csv")
    png, grid = _grid(source, records, evaluation, grid_seeds)
    atomic_write_bytes(target / GRID_FILE, png)
    label = model_title(task, model)
    method = MODELS[model][0]
    atomic_write_json(target / "config.json", {
        **settings, "compare": {"label": label, "model": "demo"},
        "demo": {"task": task, "model": model, "method": method, "source_run": source.name}})
    stamp = now_iso()
    atomic_write_json(target / "status.json", {
        "id": name, "kind": "evaluate", "state": DONE, "owner": "", "created": stamp, "started": None,
        "updated": stamp, "finished": stamp, "progress": {"stage": "metrics", "step": 1, "total": 1,
                                                          "message": "bundled result", "metrics": {}},
        "error": None, "pid": None, "host": None, "resumable": False, "attempts": 0, "target": None,
        "device": None, "result": {"metrics": metrics, "images": len(records), "bundled": True}})

    rerun_train = rerun_train_config(task, model)
    rerun_eval = {**evaluation.to_dict(), "unet": None}
    config_path = f"{out_text.rstrip('/')}/{name}/config.json"
    if method is None:
        commands = [f"python -m recare evaluate --config {config_path}"]
    elif rerun_train is not None:
        commands = [f"python -m recare train --task {task} --method {method}    # prints RUN",
                    f"python -m recare evaluate --config {config_path} --unet RUN"]
    else:
        commands = [f"python -m recare evaluate --config {config_path} --unet TRAINED_RUN"]
    made = {"evaluation_run": source.name, "recare_version": settings.get("recare_version"),
            "evaluate": f"python -m recare evaluate --config {source.name}/manifest.json"}
    if trained is not None:
        made["train_run"] = trained["run"]
        made["train_seconds"] = trained.get("seconds")
        made["trained_as_rerun"] = (None if trained.get("train") is None or rerun_train is None
                                    else _how_trained(trained["train"]) == _how_trained(rerun_train))
        made["train"] = _how_trained(trained.get("train"))
    timing = (_read_json(source / "manifest.json", "").get("timing") or {})
    return {"run": name, "task": task, "model": model, "method": method, "label": label,
            "grid": {"file": f"{name}/{GRID_FILE}", **grid}, "records": with_records,
            "made_by": made, "evaluation_seconds": timing.get("total_s"),
            "rerun": {"task": task if rerun_train is not None else None, "train": rerun_train,
                      "evaluation": rerun_eval, "commands": commands},
            "packed_with": __version__}


def _folder_bytes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def pack_demo(evaluations: Mapping[str, Mapping[str, str | Path]], out: str | Path, grid_seeds: int = 4,
              max_bytes: int = MAX_BYTES, records_max_bytes: int = RECORDS_MAX_BYTES,
              command: str | None = None) -> Path:
    """Pack finished evaluation runs into a reviewer-demo bundle (see the module docstring for its layout).

    Args:
        evaluations: {task: {model: evaluation run folder}}, e.g. {"tench": {"base": ..., "esd": ...,
            "recare": ...}}; model is a key of `MODELS`; tasks and models keep the given order.
        out: the bundle folder (replaced as a whole when the new bundle is complete and small enough).
        grid_seeds: images per row of each grid (seeds base_seed, base_seed + 1, ...).
        max_bytes: the bundle's size limit (default 3 MB).
        records_max_bytes: records.csv is copied only when it is at most this big.
        command: the command line that made the bundle (kept in index.json).

    Returns:
        The bundle folder.

    Raises:
        ConfigError: no runs, an unknown model label, a folder that is not a finished evaluation
            run, a run given under the wrong task or model, or a bundle over `max_bytes`.
    """
    from recare import __version__
    from recare.atomic import atomic_write_dir, atomic_write_json
    from recare.timestamps import now_iso

    if not evaluations or not any(evaluations.values()):
        raise ConfigError("nothing to pack: give at least one evaluation run (--eval TASK:MODEL=RUN).")
    if not isinstance(grid_seeds, int) or grid_seeds < 1:
        raise ConfigError(f"grid_seeds must be at least 1 (got {grid_seeds!r}).")
    for task, models in evaluations.items():
        _check_name("task", task)
        for model in models:
            if model not in MODELS:
                raise ConfigError(f"unknown demo model {model!r}: use one of {', '.join(MODELS)}.")
    out = Path(out).expanduser()
    out_text = str(out)
    with atomic_write_dir(out) as tmp:
        entries = [_pack_one(task, model, Path(run), tmp, out_text, grid_seeds, records_max_bytes)
                   for task, models in evaluations.items() for model, run in models.items()]
        index = {"format": FORMAT, "version": FORMAT_VERSION, "created": now_iso(), "recare_version": __version__,
                 "pack_command": command, "tasks": list(evaluations),
                 "models": list(dict.fromkeys(m for models in evaluations.values() for m in models)),
                 "runs": entries}
        atomic_write_json(tmp / INDEX_FILE, index)
        index["bytes"] = sum(_folder_bytes(tmp).values())
        atomic_write_json(tmp / INDEX_FILE, index)
        sizes = _folder_bytes(tmp)
        total = sum(sizes.values())
        if total > max_bytes:
            largest = ", ".join(f"{name} {size / 1024:.0f} KB" for name, size in
                                sorted(sizes.items(), key=lambda kv: -kv[1])[:3])
            raise ConfigError(f"the demo bundle would be {total / 2**20:.2f} MiB, over its limit of "
                              f"{max_bytes / 2**20:.2f} MiB (largest: {largest}); use fewer --grid-seeds or fewer runs.")
    return out


# ---------------------------------------------------------------------------------------------
# reading a bundle


def read_index(folder: str | Path) -> dict | None:
    """A bundle's index.json, or None when `folder` holds no demo bundle (or one in another format).

    Args:
        folder: the bundle folder (e.g. the repository's assets/demo).
    """
    path = Path(folder).expanduser() / INDEX_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("runs"), list):
        return None
    return index


def bundled_runs(folder: str | Path | None) -> list[Path]:
    """The bundle's run folders in index order (for `RunStore(bundled=...)`); [] without a bundle.

    Args:
        folder: the bundle folder, or None.
    """
    if folder is None:
        return []
    folder = Path(folder).expanduser().resolve()
    index = read_index(folder)
    if index is None:
        return []
    out = []
    for entry in index["runs"]:
        name = entry.get("run") if isinstance(entry, dict) else None
        if isinstance(name, str) and "/" not in name and (folder / name / "status.json").is_file():
            out.append(folder / name)
    return out


def index_of_runs(bundled: tuple[Path, ...] | list[Path]) -> tuple[Path, dict] | None:
    """The (bundle folder, index) that bundled run folders came from (their common parent), or None.

    Args:
        bundled: `RunStore.bundled`.
    """
    for parent in dict.fromkeys(Path(p).parent for p in bundled):
        index = read_index(parent)
        if index is not None:
            return parent, index
    return None


def task_entries(index: dict, task: str) -> list[dict]:
    """The index entries of `task`, in the bundle's order."""
    return [e for e in index.get("runs", []) if isinstance(e, dict) and e.get("task") == task]


# ---------------------------------------------------------------------------------------------
# re-running


def rerun_job(entry: dict, device: str = "auto") -> tuple[str, dict]:
    """The job that recomputes one bundled result: (target, settings) for `JobRunner.submit("evaluate", ...)`.

    Args:
        entry: one `index["runs"]` entry.
        device: where the job runs ("cpu", "cuda:0"); written into the training and evaluation settings.

    Raises:
        ConfigError: a trained model whose task is not a mini-world task (no recommended training).
    """
    from recare.eval.config import EvaluationConfig

    rerun = entry.get("rerun") or {}
    evaluation = EvaluationConfig.from_dict({**(rerun.get("evaluation") or {}), "unet": None, "device": device})
    settings: dict[str, Any] = {"command": "demo-rerun", "evaluation": evaluation.to_dict(),
                                "compare": {"label": f"{entry.get('label')} (re-run)", "model": "demo-rerun"},
                                "demo": {"task": entry.get("task"), "model": entry.get("model"),
                                         "bundled_run": entry.get("run")}}
    if entry.get("method") is None:
        return EVALUATE_TARGET, settings
    if not rerun.get("train"):
        raise ConfigError(f"{entry.get('label')}: no recommended training for the task {entry.get('task')!r} "
                          "(not a mini-world task), so it cannot be re-run here.")
    from recare.config import TrainConfig

    train = TrainConfig.from_dict({**rerun["train"], "device": device})
    settings.update(train=train.to_dict(), task=rerun.get("task"))
    return RERUN_TARGET, settings


def rerun_estimate(store, entries: list[dict], device: str) -> dict:
    """How long re-running `entries` takes: training from the speed measured on this device
    (`recare.train.speed`), evaluation from the time the bundle's own evaluations took.

    Args:
        store: the app's `recare.runs.RunStore` (its training runs hold the measured speed).
        entries: index entries of one task.
        device: the device the jobs would run on.

    Returns:
        {"train_s": seconds or None (not measured yet), "evaluate_s": seconds or None, "speed": source text
        or None, "models": {model: {"train_s", "evaluate_s", "plan"}}}.
    """
    from recare.config import TrainConfig
    from recare.train import speed as train_speed

    models, train_total, eval_total = {}, 0.0, 0.0
    unknown_train = unknown_eval = False
    speed_source = None
    for entry in entries:
        rerun = entry.get("rerun") or {}
        train_s, plan = None, []
        if rerun.get("train"):
            config = TrainConfig.from_dict(rerun["train"])
            plan = train_speed.training_plan(config)
            speed = train_speed.measured_speed(store, config.model, device)
            train_s = train_speed.estimate_seconds(config, speed)
            speed_source = (speed or {}).get("source") or speed_source
            if train_s is None:
                unknown_train = True
            else:
                train_total += train_s
        evaluate_s = entry.get("evaluation_seconds")
        if isinstance(evaluate_s, (int, float)):
            eval_total += float(evaluate_s)
        else:
            unknown_eval = True
        models[entry.get("model")] = {"train_s": train_s, "evaluate_s": evaluate_s, "plan": plan}
    return {"train_s": None if unknown_train else train_total, "evaluate_s": None if unknown_eval else eval_total,
            "speed": speed_source, "models": models}


def _trained(folder: Path) -> bool:
    """Whether a training run folder finished (its weights and result.json are there)."""
    from recare.train.recipe import RESULT_FILE

    return (folder / RESULT_FILE).is_file() and any(folder.glob("trained_params*.safetensors"))


def run_demo_rerun_job(run, progress: ProgressCallback | None, cancel: CancelToken | None) -> dict:
    """Job target "recare.demo:run_demo_rerun_job": train into `<run>/train/`, then evaluate that UNet into `run`.

    The run's config.json holds {"train": TrainConfig fields, "task": a mini-world task or None (its
    images and CARE-set are then made inside the training folder, as `python -m recare train --task`
    does), "evaluation": EvaluationConfig fields ("unet" is set here to the training folder)}. Each
    part resumes: a training run that finished is not repeated, one that was cancelled continues from
    its state, and the evaluation keeps the images it already made.

    Args:
        run: the `recare.runs.Run` (kind "evaluate", so Compare lists it and reads its metrics.json).
        progress: the job runner's reporter (training and evaluation events go to the same run).
        cancel: the run's cancel token (both parts check it).

    Returns:
        {"train": the training summary (or {"reused": True}), "metrics": metrics.json, "images": n}.
    """
    from recare.eval.config import EvaluationConfig
    from recare.eval.run import evaluate
    from recare.atomic import atomic_write_json
    from recare.runs import Run
    from recare.workflows import run_task_training_job

    settings = run.config()
    if not isinstance(settings.get("train"), dict) or not isinstance(settings.get("evaluation"), dict):
        raise ConfigError(f"run {run.id}: config.json needs 'train' and 'evaluation' settings (recare.demo.rerun_job).")
    train_dir = run.path / TRAIN_DIR
    train_run = Run(train_dir)
    # the parent keeps a small state of its own, so a failed or cancelled job reads as resumable
    run.save_state(lambda folder: (folder / "demo.json").write_text(json.dumps({"part": "train"}), encoding="utf-8"))
    if _trained(train_dir):
        summary: dict[str, Any] = {"reused": True}
    else:
        if not train_run.config_path.is_file():  # first attempt: the training part's own settings
            train_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(train_run.config_path, {"command": "demo-rerun", "train": settings["train"],
                                                      **({"task": settings["task"]} if settings.get("task") else {})})
        summary = run_task_training_job(train_run, progress, cancel)
    evaluation = EvaluationConfig.from_dict({**settings["evaluation"], "unet": str(train_dir)})
    if settings["evaluation"].get("unet") != evaluation.unet:  # the run folder says which UNet it evaluated
        atomic_write_json(run.config_path, {**settings, "evaluation": evaluation.to_dict()})
    result = evaluate(evaluation, run_dir=run.path, progress=progress, cancel=cancel, run=run)
    return {"train": summary, "metrics": result.metrics, "images": len(result.records)}


__all__ = ["pack_demo", "read_index", "bundled_runs", "index_of_runs", "task_entries", "rerun_job",
           "rerun_estimate", "rerun_train_config", "run_demo_rerun_job", "run_name", "model_title", "MODELS",
           "MAX_BYTES", "INDEX_FILE", "GRID_FILE", "FORMAT"]
