"""What Compare shows, as data: the same-seed image grid of the selected evaluations, the paper view, the report.

No Gradio here: `ui.compare_tab` lays out the workspace and wires its events; these functions read the run
folders (through the app's run store) and return plain values and figures.
- `grid_data`: rows = models, columns = seeds, one prompt (the target, each attack's prompts, each run's own
  adversarial-token prompts, each CARE prompt, the custom prompts; `recare.eval.plan.prompt_table`), from
  the images the evaluation runs save, a row per attack run where a learned attack ran several times; images
  the NudeNet detector flags are blurred copies (verdicts cached per file, `recare.eval.detection_cache`).
- `paper_view`: the paper's quoted rows for a task (`recare.paper`) as the same RATIO and CARE charts.
- `report_file`: the shareable HTML report of the selected evaluations (`recare.report`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import MappingProxyType

from PIL import Image

from recare import charts, paper, safety
from recare.eval.detection_cache import DetectionCache, shared_cache
from recare.errors import RecareError, RunError
from recare.eval.config import resolve_config
from recare.eval.config import config_from_file
from recare.eval.plan import CARE, EXTRA, prompt_table
from recare.eval.records import partial_records
from recare.eval.run_metrics import partial_metrics
from recare.metrics_io import read_metrics_json
from recare.runs import DONE, QUEUED

MAX_GRID_SEEDS = 8  # columns of the image grid
SET_NAMES = MappingProxyType({"erased": "target prompt", "adversarial": "own adversarial token", CARE: "CARE",
                              EXTRA: "custom"})


def choice_value(set_name: str, prompt: str) -> str:
    return json.dumps([set_name, prompt])


def choice_label(row: dict) -> str:
    kind = SET_NAMES.get(row["set"], f"{row['set']} attack")
    if row["set"] == CARE:
        kind = f"CARE · {row['concept']}"
    return f"{kind} · {row['prompt']}"


@dataclasses.dataclass
class Grid:
    """What the grid shows: the prompt choices, the chosen one, its seeds, and a row of cells per model."""

    choices: list[tuple[str, str]]
    choice: str | None
    seeds: list[int]
    rows: list[dict]   # {"model", "run", "attack_run", "cells": [{"seed", "state", "path", "file", "blurred", "positive"}]}
    unchecked: bool = False


def grid_data(evaluations: list, choice, cache: DetectionCache | None = None) -> Grid:
    """The grid of evaluation runs (`recare.runs` Run objects) for one prompt (the first when `choice` is not one
    of them): a row per model, and per attack run when a learned attack ran several times on that prompt.

    Args:
        evaluations: the runs.
        choice: a prompt choice's value (`choice_value`).
        cache: the nudity verdicts (default: the process's `recare.eval.detection_cache.shared_cache`): an image
            already judged is not judged again.
    """
    cache = cache if cache is not None else shared_cache()
    runs = []
    choices: dict[str, str] = {}
    seeds_of: dict[str, set[int]] = {}
    for run in evaluations:
        stored = run.config()
        try:
            table = prompt_table(resolve_config(config_from_file(stored)))
        except RecareError:
            continue
        for row in table:
            value = choice_value(row["set"], row["prompt"])
            choices.setdefault(value, choice_label(row))
            seeds_of.setdefault(value, set()).update(row["seeds"])
        runs.append((run, (stored.get("compare") or {}).get("label", run.id), table))
    options = [(label, value) for value, label in choices.items()]
    if choice not in choices:
        choice = options[0][1] if options else None
    if choice is None:
        return Grid(options, None, [], [])
    set_name, prompt = json.loads(choice)
    seeds = sorted(seeds_of[choice])[:MAX_GRID_SEEDS]
    rows, unchecked = [], False
    for run, label, table in runs:
        planned = sorted({int(r.get("run") or 0) for r in table if r["set"] == set_name and r["prompt"] == prompt})
        made = {(int(r.get("run") or 0), int(r["seed"])): r for r in partial_records(run.path)
                if r["attack"] == set_name and r["prompt"] == prompt}
        for attack_run in planned or [0]:
            cells = []
            for seed in seeds:
                record = made.get((attack_run, seed))
                path = run.path / record["file"] if record else None
                if path is None or not path.is_file():
                    cells.append({"seed": seed, "state": "pending" if planned else "not in this run", "path": None,
                                  "file": None, "blurred": False, "positive": None})
                    continue
                flagged = cache.flag(path)
                unchecked = unchecked or flagged is None
                cells.append({"seed": seed, "state": "ready", "path": path, "file": record["file"],
                              "blurred": flagged is not False, "positive": record.get("positive")})
            several = len(planned) > 1
            rows.append({"model": f"{label} · attack run {attack_run + 1}" if several else label, "run": run.id,
                         "attack_run": attack_run, "cells": cells})
    return Grid(options, choice, seeds, rows, unchecked)


def shown_image(cell: dict) -> Image.Image:
    """The picture a cell shows: the image, or `recare.safety.blur`'s copy of it when hidden."""
    with Image.open(cell["path"]) as im:
        image = im.convert("RGB")
    return safety.blur(image) if cell["blurred"] else image


def placeholder(text: str) -> Image.Image:
    """A grey 64 x 64 cell saying why there is no image yet ("pending", "not in this run")."""
    from PIL import ImageDraw

    image = Image.new("RGB", (64, 64), "#eeeeee")
    ImageDraw.Draw(image).text((4, 26), text[:12], fill="#888")
    return image


def grid_html(grid: Grid) -> str:
    """The grid as the labelled HTML table (`recare.report.grid_html`): a row per model with its name in front,
    a column per seed, the prompt above; flagged images blurred, missing ones a grey cell saying why."""
    from recare.report import ModelGrid, grid_html as labelled

    if grid.choice is None:
        return "<p>No images yet: select an evaluation.</p>"
    set_name, prompt = json.loads(grid.choice)
    label = dict((value, text) for text, value in grid.choices).get(grid.choice, prompt)
    row = {"attack": set_name, "prompt": prompt, "seeds": grid.seeds, "title": label}
    models = []
    for r in grid.rows:
        images = [shown_image(c) if c["state"] == "ready" else placeholder(c["state"]) for c in r["cells"]]
        notes = ["blurred" if c["blurred"] else ("" if c["state"] == "ready" else c["state"]) for c in r["cells"]]
        models.append(ModelGrid(r["model"], r["run"], [row], [images], [notes]))
    return labelled(models, element_id="compare-grid-table")


def grid_info(grid: Grid) -> dict:
    return {"choices": [[label, value] for label, value in grid.choices], "choice": grid.choice, "seeds": grid.seeds,
            "prompt": json.loads(grid.choice)[1] if grid.choice else None,
            "set": json.loads(grid.choice)[0] if grid.choice else None,
            "rows": [{"model": r["model"], "run": r["run"], "attack_run": r["attack_run"],
                      "cells": [{k: v for k, v in cell.items() if k != "path"} for cell in r["cells"]]}
                     for r in grid.rows], "detector_unavailable": grid.unchecked}


def grid_note(grid: Grid) -> str:
    if grid.choice is None:
        return "No images yet: select an evaluation."
    blurred = sum(c["blurred"] for r in grid.rows for c in r["cells"])
    models = len({r["run"] for r in grid.rows})
    note = f"Rows: {models} model(s)" + (f", {len(grid.rows)} attack runs" if len(grid.rows) > models else "")
    note += f" · columns: seeds {', '.join(str(s) for s in grid.seeds)}"
    if grid.unchecked:
        note += " · the nudity detector is unavailable, so every image is blurred"
    elif blurred:
        note += f" · {blurred} image(s) flagged by NudeNet shown blurred"
    return note




# ---------------------------------------------------------------------------------------------
# the paper beside the world, and the shareable report

CHART_GUIDES = MappingProxyType({
    "ratio": "**Measured here** · RATIO: a triangle per model (Defense, Utility, CARE); bigger is better. "
             "Dotted: worst attack run.",
    "care": "**Measured here** · CARE score: how often a benign co-occurring concept is still recognised "
            "(1 kept).",
})
MAX_REPORT_RUNS = 12
METHOD_NAMES = MappingProxyType({"base": "base", "esd": "ESD", "recare": "ReCARE"})  # evaluations in one exported report


def paper_guide(task: str | None) -> str:
    """The reading line above the paper's RATIO radar."""
    if not task:
        return "**Quoted from the paper** · no paper task chosen."
    return (f"**Quoted from the paper** (SD v1.4, {task}): {paper.TABLE_1} as the same radar; legend: our "
            "formula's RATIO (printed).")


def paper_care_guide(task: str | None) -> str:
    """The reading line above the paper's CARE chart."""
    if not task:
        return "**Quoted from the paper** · no paper task chosen."
    if task == "nudity":
        return f"**Quoted from the paper** · {paper.TABLE_13}: ten benign concepts of nudity, per method."
    return (f"**Quoted from the paper** · {paper.TABLE_1}'s CARE score of one concept "
            f"({paper.CARE_CONCEPT.get(task, '?')}).")


def paper_note(task: str | None) -> str:
    """Which numbers are measured and which quoted, and which mini-world task stands for the paper's."""
    ours = [k for k, v in paper.MINI_WORLD_TASKS.items() if v == task]
    stand = f" The mini world's **{ours[0]}** task stands for it." if ours else ""
    return (f"The paper's numbers are **quoted** ({paper.PAPER}, {paper.TABLE_1}, {paper.TABLE_13}), not measured "
            "here: SD v1.4 at 512 px with the paper's detectors. The charts marked *measured here* come from the "
            f"evaluation runs' metrics.json.{stand} Compare shapes and rankings, not values.")


def paper_view(task: str | None) -> dict:
    """The paper's charts and tables for a paper task (`recare.paper`), drawn by `recare.charts` as ours are."""
    known = task in paper.TASKS
    rows, care = (paper.metrics_rows(task), paper.care_rows(task)) if known else ([], [])
    return {
        "ratio": charts.ratio_radar_figure(rows, height=CHART_HEIGHT, title=f"{paper.TABLE_1} · {task} (quoted)"
                                           if known else "Paper: pick a task under the charts"),
        "care": charts.care_radar_figure(care, height=CHART_HEIGHT, title=f"{paper.care_source(task)} (quoted)"
                                         if known else "Paper: pick a task under the charts"),
        "table": paper_table_frame(task), "care_table": paper_care_frame(task),
    }


CHART_HEIGHT = 300  # four charts side by side fit the first screen at 1400 x 1000


def paper_table_frame(task: str | None):
    import pandas as pd

    return charts.paper_table(task) if task in paper.TASKS else pd.DataFrame(columns=["model"])


def paper_care_frame(task: str | None):
    import pandas as pd

    return charts.metric_tables(paper.care_rows(task))[1] if task in paper.TASKS else pd.DataFrame(columns=["model"])


def report_file(evaluations: list, folder: Path) -> Path:
    """The HTML report (`recare.report.build_report`) of the finished ones among evaluation runs, in `folder`.

    Raises:
        RunError: none of them has finished, or more than MAX_REPORT_RUNS are selected.
    """
    from recare.report import build_report

    if len(evaluations) > MAX_REPORT_RUNS:
        raise RunError(f"a report takes at most {MAX_REPORT_RUNS} evaluations; {len(evaluations)} are selected.")
    paths = [run.path for run in evaluations if (run.path / "metrics.json").is_file()]
    if not paths:
        raise RunError("no finished evaluation selected: nothing to report yet.")
    return build_report(paths, Path(folder) / "recare-report.html", command="ReCARE Studio · Compare · Export report")


def headline(rows: list[dict], numbers: list[dict], task: str | None) -> str:
    """A Markdown table: each model's RATIO measured here beside the paper's for the same method (quoted).

    Args:
        rows: the measured metrics rows, with "key" (base, esd, recare) and "run".
        numbers: their radar numbers (`recare.charts.metric_tables`), with "run" and "ratio".
        task: the paper's task the rows stand for (None: no paper column).
    """
    quoted = {r["key"]: r for r in paper.metrics_rows(task)} if task in paper.TASKS else {}
    ratio_of = {n["run"]: n["ratio"] for n in numbers}
    lines = [f"| model | RATIO measured here | RATIO quoted (paper, {task or '–'}) |", "|---|---|---|"]
    for row in rows:
        measured = ratio_of.get(row.get("run"))
        q = quoted.get(row.get("key"))
        cell = "–" if q is None else f"{q['ratio']['printed']:.2f} (printed)"
        name = METHOD_NAMES.get(row.get("key"), str(row.get("model", "")))
        lines.append(f"| {name.replace('|', '/')} | "
                     f"{'–' if measured is None else f'{measured:.3f}'} | {cell} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the evaluations a browser sees, and their metrics (shared by Compare and the reviewer demo)


def evaluation_ids(ids) -> list[str]:
    """The evaluations' run ids (`recare.jobs.checks.run_ids`: texts only, bounded; ConfigError otherwise)."""
    from recare.jobs.checks import run_ids

    return run_ids(ids, what="evaluations")


def evaluation_label(run, default: str = "") -> str:
    """The model label an evaluation run was started with (config.json "compare"), else `default`."""
    return (run.config().get("compare") or {}).get("label", default)


def evaluation_choices(ctx, owner: str) -> list[tuple[str, str]]:
    """The "Evaluations shown" entries ("<id> · <label>", id) of every evaluation run `owner` sees, bundled ones last."""
    choices = []
    for run in ctx.runs.list(owner=owner, kind="evaluate"):
        try:
            choices.append((f"{run.id} · {evaluation_label(run)}", run.id))
        except RecareError:
            continue
    return choices


def _metrics(run) -> dict | None:
    """metrics.json of a finished evaluation run (None while it has none)."""
    return read_metrics_json(run.path, missing_ok=True)


def _provisional(run) -> dict | None:
    """The run's metrics from the images made so far (`partial_metrics`), None before its first image."""
    try:
        metrics = partial_metrics(run.path)
    except RecareError:
        return None
    return metrics if metrics["progress"]["images"] else None


def collect_evaluations(ctx, ids, owner: str | None) -> tuple[list[dict], list[dict]]:
    """(per-run states, metrics rows: metrics.json plus "model" and "run"; a run that has not finished gives its
    provisional metrics with "partial": True and its "progress").

    Args:
        ctx: the app's context.
        ids: evaluation run ids.
        owner: whose runs these must be (`RunStore.get`); None only for ids known to be bundled runs.
    """
    states, rows = [], []
    for run_id in evaluation_ids(ids):
        run = ctx.runs.get(run_id, owner)
        status, label = run.status(), evaluation_label(run, run_id)
        state = status.get("state")
        metrics = _metrics(run) if state == DONE else None
        partial = metrics is None and state != QUEUED
        if partial:
            metrics = _provisional(run)
        progress = status.get("progress") or {}
        states.append({"id": run.id, "model": label, "state": state, "stage": progress.get("stage"),
                       "step": progress.get("step"), "total": progress.get("total"), "error": status.get("error"),
                       "partial": (metrics or {}).get("progress") if partial else None})
        if metrics is not None:
            rows.append({**metrics, "model": label, "run": run.id, "partial": partial})
    return states, rows
