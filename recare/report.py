"""A shareable report: one self-contained HTML file with the evaluations' grids, radars and numbers.

    build_report([Path("runs/evaluate-..."), ...], Path("report.html"))   # or: python -m recare report --eval RUN ...

The file needs nothing else to open, offline: plotly.js is inlined once, the images are embedded as data URIs
(the mini world's 64 x 64 images drawn larger with nearest-neighbour scaling), every chart has its numbers in a
table under it, and every number says which run it comes from, with the run's settings and date. For each task
the evaluations cover, the paper's own Table 1 rows (and Appendix N.2's Table 13 for nudity) are drawn the same
way beside ours, marked as quoted (`recare.paper`). Nothing here computes a metric: the charts and tables come
from `recare.charts` over each run's metrics.json.

The labelled image grid (`grid_html`) is also what the app's Compare workspace shows.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
from pathlib import Path
from typing import Sequence

from recare.errors import ConfigError
from recare.metrics_io import METRICS_JSON, read_metrics_json
from recare.timestamps import iso_from_seconds, now_iso

GRID_SEEDS = 4
CELL_PX = 72          # an image cell's side in the grid (the world's 64 px, drawn with nearest-neighbour scaling)
SETTINGS_SHOWN = ("model", "unet", "task", "attacks", "seeds", "base_seed", "care_images_per_prompt", "clip_count",
                  "steps", "guidance", "detector", "encoder", "cce_steps", "cce_images")
MEASURED = "measured here"
QUOTED = "quoted from the paper"


@dataclasses.dataclass
class ModelGrid:
    """One model's images for the grid: a row per prompt (target prompt, a CARE prompt), a column per seed.

    Attributes:
        label: the model's name shown beside its images ("base", "ESD", "ReCARE", a run's label).
        run: the evaluation run the images come from.
        rows: one {"attack", "concept", "prompt", "seeds"} per row of images.
        images: rows of PIL images (flagged images already blurred).
    """

    label: str
    run: str
    rows: list[dict]
    images: list[list]
    notes: list[list[str]] | None = None  # per image, added to its alt text (e.g. "blurred", "pending")


@dataclasses.dataclass
class Evaluation:
    """A finished evaluation run folder, read: what the report shows of it."""

    path: Path
    run: str
    label: str
    key: str | None          # the method (base, esd, recare, ...) when known: one colour per method
    task: str | None
    metrics: dict
    settings: dict           # the EvaluationConfig fields
    date: str                # when it finished (a bundled result: when it was packed)
    bundled: bool

    def row(self) -> dict:
        """Its metrics as a chart row (`recare.charts`)."""
        return {**self.metrics, "model": self.label, "run": self.run, "key": self.key}


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path.parent} is not a finished evaluation run: it has no {path.name} ({what}).") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read: {e}.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object.")
    return data


def load_evaluation(path: str | Path) -> Evaluation:
    """Read a finished evaluation run folder (metrics.json, config.json, status.json).

    Args:
        path: the run folder (a run of `python -m recare evaluate`, the app's Compare, or a demo bundle's).
    """
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"--eval {path}: not a folder.")
    metrics = read_metrics_json(folder)
    config = _read_json(folder / "config.json", "its settings")
    status = _read_json(folder / "status.json", "its state") if (folder / "status.json").is_file() else {}
    settings = config.get("evaluation") if isinstance(config.get("evaluation"), dict) else config
    demo = config.get("demo") if isinstance(config.get("demo"), dict) else {}
    label = str((config.get("compare") or {}).get("label") or folder.name)
    key = demo.get("model") or ("base" if settings.get("unet") in (None, "") else None)
    bundled = bool((status.get("result") or {}).get("bundled"))
    date = str(status.get("finished") or status.get("updated") or "")
    if not date:
        date = iso_from_seconds((folder / METRICS_JSON).stat().st_mtime)
    return Evaluation(path=folder, run=folder.name, label=label, key=key, task=settings.get("task") or demo.get("task"),
                      metrics=metrics, settings=settings, date=date, bundled=bundled)


def run_grid(path: str | Path, label: str | None = None, seeds: int = GRID_SEEDS) -> ModelGrid | None:
    """The grid images of an evaluation run: a bundled run's grid.png cut apart, else its own images (target prompt,
    first CARE prompt, `seeds` seeds; `recare.demo.grid_images`). None when the run has no images to show.

    Args:
        path: the evaluation run folder.
        label: the name shown beside the images (default: the run's label).
        seeds: images per row.
    """
    from recare.demo import GRID_FILE, grid_cells, grid_images, read_index
    from recare.errors import RecareError
    from recare.eval.config import config_from_file
    from recare.eval.records import read_records

    folder = Path(path).expanduser().resolve()
    config = _read_json(folder / "config.json", "its settings")
    name = label or str((config.get("compare") or {}).get("label") or folder.name)
    index = read_index(folder.parent) if (folder / GRID_FILE).is_file() else None
    entry = next((e for e in (index or {}).get("runs", []) if isinstance(e, dict) and e.get("run") == folder.name),
                 None)
    try:
        if entry is not None and isinstance(entry.get("grid"), dict):
            images = grid_cells(folder / GRID_FILE, entry["grid"])
            return ModelGrid(name, folder.name, list(entry["grid"]["rows"]), [row[:seeds] for row in images])
        if not (folder / "records.csv").is_file():
            return None
        images, rows = grid_images(folder, read_records(folder), config_from_file(config), seeds)
    except (RecareError, OSError, KeyError, ValueError):
        return None
    return ModelGrid(name, folder.name, rows, images)


def image_data_uri(image, scale: int = 1) -> str:
    """A PIL image as a PNG data URI, optionally enlarged `scale` times with nearest-neighbour scaling."""
    from PIL import Image

    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _row_title(row: dict) -> str:
    if row.get("title"):
        return str(row["title"])
    what = "target prompt" if row.get("attack") != "care" else f"CARE prompt ({row.get('concept', '')})"
    return f"{what}: “{row.get('prompt', '')}”"


def grid_html(grids: Sequence[ModelGrid], cell_px: int = CELL_PX, element_id: str | None = None) -> str:
    """The labelled grid as an HTML table: a row per model with its name in front, a column group per prompt
    (target prompt, CARE prompt), a column per seed, the prompt and seeds above. Images are embedded (data URIs)
    and drawn `cell_px` wide with nearest-neighbour scaling (`image-rendering: pixelated`); each has an alt text.

    Args:
        grids: one ModelGrid per model, in row order (their prompts are assumed the same: one task, same seeds).
        cell_px: an image's side on the page.
        element_id: the table's id attribute.
    """
    if not grids:
        return "<p>No images to show.</p>"
    first = grids[0]
    esc = html.escape
    cell = (f"width:{cell_px}px;height:{cell_px}px;image-rendering:pixelated;image-rendering:crisp-edges;"
            "display:block;border-radius:3px")
    plain = "border:none;background:none;"
    head = [f'<th scope="col" style="{plain}text-align:left;padding:0 8px 2px 0;font-weight:600;'
            'vertical-align:bottom">model</th>']
    for k, row in enumerate(first.rows):
        pad = "padding-left:14px;" if k else "padding-left:1px;"
        seeds = row["seeds"]
        span = f"seeds {seeds[0]}–{seeds[-1]}" if len(seeds) > 1 else f"seed {seeds[0]}" if seeds else ""
        head.append(f'<th scope="colgroup" colspan="{len(seeds)}" style="{plain}text-align:left;{pad}'
                    f'font-weight:600;vertical-align:bottom;line-height:1.25;padding-bottom:3px;'
                    f'max-width:{len(seeds) * (cell_px + 2)}px">{esc(_row_title(row))} '
                    f'<span style="font-weight:400;color:#666">· {esc(span)}</span></th>')
    body = []
    for grid in grids:
        cells = [f'<th scope="row" style="{plain}text-align:left;padding:0 10px 0 0;font-size:1.15em;'
                 f'font-weight:700;max-width:220px;overflow-wrap:anywhere" class="recare-grid-model">'
                 f'{esc(grid.label)}</th>']
        for k, (row, images) in enumerate(zip(grid.rows, grid.images)):
            for j, image in enumerate(images):
                pad = "padding-left:14px;" if k and j == 0 else ""
                seed = row["seeds"][j] if j < len(row["seeds"]) else "?"
                note = (grid.notes[k][j] if grid.notes and k < len(grid.notes) and j < len(grid.notes[k]) else "")
                alt = f"{grid.label}, {row.get('prompt', '')}, seed {seed}" + (f", {note}" if note else "")
                cells.append(f'<td style="{plain}padding:1px;{pad}"><img src="{image_data_uri(image)}" alt="{esc(alt)}" '
                             f'title="{esc(alt)}" style="{cell}"></td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{esc(element_id)}"' if element_id else ""
    return (f'<table{ident} class="recare-grid" style="border-collapse:collapse;margin:0">'
            f'<thead><tr>{"".join(head)}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


# ---------------------------------------------------------------------------------------------
# the report


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto; max-width: 1320px;
       color: #222; line-height: 1.4; padding: 0 16px; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #555; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 0.8em; font-weight: 600; }
.measured { background: #e3edf7; color: #1d3f66; } .quoted { background: #fbeed0; color: #6b4a00; }
.charts { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 12px; }
.chart > details { overflow-x: auto; }
.chart { border: 1px solid #e3e3e3; border-radius: 8px; padding: 6px; }
.chart p { margin: 4px 6px; font-size: 0.9em; }
table.numbers { border-collapse: collapse; font-size: 0.85em; margin: 8px 0 4px; }
table.numbers th, table.numbers td { border: 1px solid #ddd; padding: 3px 6px; text-align: right; }
table.numbers th { background: #f5f5f5; } table.numbers td:first-child { text-align: left; }
details { margin: 6px 0; } pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 0.8em; }
"""

READING = {
    "ratio": "Each triangle is one model: Defense (100 − attack success %), Utility (CLIP score, normalised) and "
             "CARE (benign concepts kept); the bigger the triangle the better, and RATIO is its area over the "
             "full triangle's (Appendix M).",
    "care": "The share of images of each benign co-occurring concept that CLIP still recognises as that concept: "
            "1 means kept, 0 means erased along with the target.",
}


def _table(frame) -> str:
    frame = frame.astype(object).where(frame.notna(), "–")
    return frame.to_html(index=False, na_rep="–", classes="numbers", border=0, escape=True)


def _figure(fig) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False, "responsive": True})


def _chart(title: str, badge: str, reading: str, fig, table) -> str:
    kind = "measured" if badge == MEASURED else "quoted"
    return (f'<div class="chart"><p><span class="badge {kind}">{html.escape(badge)}</span> '
            f'<b>{html.escape(title)}</b></p><p>{html.escape(reading)}</p>{_figure(fig)}'
            f'<details open><summary>numbers</summary>{_table(table)}</details></div>')


def _settings_table(evaluations: Sequence[Evaluation]):
    import pandas as pd

    rows = []
    for e in evaluations:
        values = []
        for name in SETTINGS_SHOWN:
            value = e.settings.get(name)
            if isinstance(value, list):
                value = ", ".join(map(str, value))
            elif name == "unet" and value:
                value = Path(str(value)).name  # the trained run's folder, not the machine's path
            values.append(value)
        rows.append([e.label, e.run, e.date[:19].replace("T", " "), "bundled demo result" if e.bundled else "run",
                     *values])
    return pd.DataFrame(rows, columns=["model", "run", "finished (UTC)", "kind", *SETTINGS_SHOWN])


def _task_section(task: str | None, evaluations: list[Evaluation]) -> str:
    from recare import charts, paper
    from recare.demo import MODELS

    esc = html.escape
    rows = [e.row() for e in evaluations]
    ratio_table, care_table, _ = charts.metric_tables(rows)
    parts = [f"<h2>Task: {esc(task or 'unnamed')} <span class='badge measured'>{MEASURED}</span></h2>"]
    grids = []
    for e in evaluations:
        grid = run_grid(e.path, label=MODELS[e.key][1] if e.bundled and e.key in MODELS else e.label)
        if grid is not None:
            grids.append(grid)
    if grids:
        parts.append("<p>Same seeds for every model (a row per model); images the nudity detector flags are "
                     "blurred.</p>" + grid_html(grids))
    ratio_ours = _chart("RATIO radar", MEASURED, READING["ratio"], charts.ratio_radar_figure(rows, height=400),
                        ratio_table)
    care_ours = _chart("CARE score per concept", MEASURED, READING["care"],
                       charts.care_radar_figure(rows, height=400), care_table)
    charts_html = [ratio_ours, care_ours]
    quoted = paper.paper_task(task)
    if quoted:
        table1 = paper.metrics_rows(quoted)
        care_rows = paper.care_rows(quoted)
        care_quoted = charts.metric_tables(care_rows)[1]
        ratio_paper = _chart(
            f"Paper (SD v1.4): RATIO radar, {quoted}", QUOTED,
            f"The paper's {paper.TABLE_1} rows for {quoted}, drawn with the same recare.metrics functions.",
            charts.ratio_radar_figure(table1, height=400, title=f"{paper.TABLE_1}, {quoted} (quoted)"),
            charts.paper_table(quoted))
        care_paper = _chart(f"Paper (SD v1.4): CARE, {quoted}", QUOTED, f"Quoted from {paper.care_source(quoted)}.",
                            charts.care_radar_figure(care_rows, height=400,
                                                     title=f"{paper.care_source(quoted)} (quoted)"), care_quoted)
        charts_html = [ratio_ours, ratio_paper, care_ours, care_paper]
    parts.append(f'<div class="charts">{"".join(charts_html)}</div>')
    if quoted and task != quoted:
        parts.append(f"<p class='meta'>The mini world's {esc(task or '')} task stands for the paper's {esc(quoted)} "
                     "task; the paper's numbers are SD v1.4 at 512 px with the paper's detectors, ours the mini "
                     "world's: compare shapes and rankings, not values.</p>")
    parts.append("<h3>Settings of each run</h3>" + _table(_settings_table(evaluations)))
    for e in evaluations:
        parts.append(f"<details><summary>{esc(e.run)}: metrics.json and settings</summary><pre>"
                     f"{esc(json.dumps({'metrics': e.metrics, 'settings': e.settings}, indent=1))}</pre></details>")
    return "\n".join(parts)


def report_html(paths: Sequence[str | Path], command: str | None = None, now: str | None = None) -> str:
    """The report's HTML text (see the module docstring) for evaluation run folders, grouped by task.

    Args:
        paths: finished evaluation run folders, in the order to show them.
        command: how the report was made (shown in its header).
        now: the report's date (default: now, UTC).
    """
    import plotly.offline

    from recare import __version__, paper

    if not paths:
        raise ConfigError("a report needs at least one evaluation run (--eval RUN).")
    evaluations = [load_evaluation(p) for p in paths]
    by_task: dict[str | None, list[Evaluation]] = {}
    for e in evaluations:
        by_task.setdefault(e.task, []).append(e)
    stamp = now or now_iso()
    esc = html.escape
    header = (f"<h1>ReCARE Studio report</h1><p class='meta'>Made {esc(stamp)} with recare {esc(__version__)}"
              + (f" by <code>{esc(command)}</code>" if command else "") + f"; {len(evaluations)} evaluation run(s): "
              + ", ".join(f"<code>{esc(e.run)}</code>" for e in evaluations) + ".</p>"
              f"<p><span class='badge measured'>{MEASURED}</span> numbers come from each run's metrics.json (the run "
              "id is beside every number). <span class='badge quoted'>" + QUOTED + "</span> numbers are copied from "
              f"the paper ({esc(paper.PAPER)}, {esc(paper.TABLE_1)} and {esc(paper.TABLE_13)}) and were not "
              "measured here; their RATIO is recomputed with the same recare.metrics functions and shown beside the "
              "printed one.</p>")
    body = "\n".join(_task_section(task, group) for task, group in by_task.items())
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>ReCARE Studio report</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{STYLE}</style>"
            f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head><body>{header}{body}"
            "</body></html>")


def build_report(paths: Sequence[str | Path], out: str | Path, command: str | None = None) -> Path:
    """Write the report (`report_html`) to `out` atomically and return its path.

    Args:
        paths: finished evaluation run folders.
        out: the HTML file to write (its folder is created).
        command: how the report was made (shown in its header).
    """
    from recare.atomic import atomic_write_bytes

    target = Path(out).expanduser()
    if target.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as report.html.")
    text = report_html(paths, command=command)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, text.encode("utf-8"))
    return target.resolve()


__all__ = ["ModelGrid", "Evaluation", "load_evaluation", "run_grid", "image_data_uri", "grid_html", "report_html",
           "build_report", "READING", "MEASURED", "QUOTED"]
