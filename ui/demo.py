"""The reviewer demo inside Compare: bundled, precomputed results drawn at once, and "Re-run live".

When the app was started with a demo bundle (`recare.demo`, default the repository's assets/demo),
its run folders are bundled runs of the run store: every browser lists them among its evaluations,
none can change or delete them. `attach_demo(ctx, c)`, called at the end of the Compare tab, adds a
panel at the top of that tab:
- a "Demo task" picker; the first task's bundled evaluations (base, ESD, ReCARE) are selected in
  Compare's "Evaluations shown" from the start and drawn when the page loads; another task selects
  and draws its own;
- the labelled image grid of the task (`recare.report.grid_html`: a row per model with its name in front, the
  target prompt's and one CARE prompt's images on the same seeds, drawn large with nearest-neighbour scaling);
- the paper's quoted rows of the same task in Compare's paper charts (`paper_task`);
- "Re-run live": one job per model for this browser, kind "evaluate" (Compare lists and polls them
  like its own): the base model's evaluation with the bundle's `EvaluationConfig`, ESD / ReCARE as a
  training with the world's recommended settings followed by that evaluation
  (`recare.demo:run_demo_rerun_job`), with an estimate of how long that takes on this device.
Nothing here computes a number: the radars and tables come from `ui.figures` over metrics.json.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from recare import demo as demo_bundle
from recare.errors import ConfigError, RecareError
from recare import paper
from ui.common import AppContext, md, no_paths, ok, owner_key, problem, submitter
from ui.compare_data import CHART_HEIGHT, collect_evaluations, evaluation_choices, headline
from ui.figures import care_radar_figure, metric_tables, ratio_radar_figure

DRAW_OUTPUTS = ("status", "ratio_plot", "ratio_table", "care_plot", "care_table", "info")


def demo_of(ctx: AppContext) -> tuple[Any, dict] | None:
    """(bundle folder, index.json) of the app's demo bundle, or None when the app has none."""
    if ctx.runs is None or not ctx.runs.bundled:
        return None
    return demo_bundle.index_of_runs(ctx.runs.bundled)


def attach_demo(ctx: AppContext, c: dict[str, Any]) -> dict[str, Any]:
    """Add the reviewer-demo panel to the Compare tab (a no-op without a demo bundle).

    Call it at the end of `create_compare_tab`, inside its gr.Tab: the panel moves to the top of the tab.

    Args:
        ctx: the shell's context (its run store holds the bundled runs).
        c: the Compare tab's components; the demo's are added under "demo_*" keys.
    """
    found = demo_of(ctx)
    if found is None:
        return c
    folder, index = found
    tasks = [t for t in index.get("tasks", []) if _entries(ctx, index, t)]
    if not tasks:
        return c
    parent = gr.context.Context.block
    with gr.Row(equal_height=False, elem_id="demo-panel") as panel:
        with gr.Column(scale=3, min_width=560):
            c["demo_guide"] = gr.Markdown(_guide(index), elem_id="demo-guide", elem_classes=["recare-guide"])
            c["demo_grids"] = gr.HTML(_grid_html(ctx, folder, index, tasks[0]), elem_id="demo-grids")
        with gr.Column(scale=2, min_width=320):
            c["demo_banner"] = gr.Markdown(_banner(index), elem_id="demo-banner")
            with gr.Row(equal_height=True):
                c["demo_task"] = gr.Dropdown([(f"demo task · mini world: {t}", t) for t in tasks], value=tasks[0],
                                             label="Demo task", show_label=False, elem_id="demo-task", scale=3)
                c["demo_rerun"] = gr.Button("Re-run live", elem_id="demo-rerun", scale=1, min_width=120)
            c["demo_headline"] = gr.Markdown("", elem_id="demo-headline")
            c["demo_message"] = gr.Markdown("", elem_id="demo-message")
            with gr.Accordion("Re-run live: what it does, how long it takes", open=False):
                c["demo_estimate"] = gr.Markdown("", elem_id="demo-estimate")
    if parent is not None and panel in parent.children:  # the panel is what a reviewer should see first
        parent.children.remove(panel)
        parent.children.insert(0, panel)

    # Compare starts with the first task's bundled results selected (a static value: no page-load race
    # with Compare's own list refresh, which keeps selected ids it knows, and it knows bundled ones).
    first = [e["run"] for e in _entries(ctx, index, tasks[0])]
    c["evaluations"].choices = list(dict.fromkeys([*c["evaluations"].choices, *_choices(ctx, index)]))
    c["evaluations"].value = first
    c["paper_task"].value = paper.paper_task(tasks[0])  # the paper's rows of the same task

    owner = ctx.owner
    draw_out = [c[k] for k in DRAW_OUTPUTS]
    show_out = [c["evaluations"], *draw_out, c["demo_grids"], c["demo_estimate"], c["paper_task"], c["demo_headline"]]

    def show(task):
        return _show(ctx, task)

    def draw(task):
        return _show(ctx, task)[1:]

    def rerun(task, key, request: gr.Request):
        return _rerun(ctx, task, key, request)

    c["demo_task"].change(show, [c["demo_task"]], show_out, api_name="demo_show", show_progress="hidden")
    c["demo_rerun"].click(rerun, [c["demo_task"], owner], [c["demo_message"], c["evaluations"], c["timer"]],
                          api_name="demo_rerun", concurrency_limit=1, preprocess=False)  # raw values checked here
    root = gr.context.Context.root_block
    if root is not None:
        root.load(draw, [c["demo_task"]], show_out[1:], api_visibility="private", show_progress="hidden")
    return c


# ---------------------------------------------------------------------------------------------
# reading the bundle


def _entries(ctx: AppContext, index: dict, task: str) -> list[dict]:
    """The task's index entries whose run folder the store has as a bundled run."""
    bundled = {p.name for p in ctx.runs.bundled}
    return [e for e in demo_bundle.task_entries(index, task) if e.get("run") in bundled]


def _choices(ctx: AppContext, index: dict) -> list[tuple[str, str]]:
    """Compare's dropdown entries of every bundled run (its own format: "<id> · <label>")."""
    return [(f"{e['run']} · {e.get('label', '')}", e["run"]) for t in index.get("tasks", []) for e in
            _entries(ctx, index, t)]


def _banner(index: dict) -> str:
    models = ", ".join(demo_bundle.MODELS.get(m, (None, m))[1] for m in index.get("models", []))
    return f"### Reviewer demo · {models} on the mini world"


def _guide(index: dict) -> str:
    """The grid's reading line."""
    created = str(index.get("created") or "")[:10]
    return ("Same seeds for every model: the **target prompt** should lose its concept, the **CARE prompt** keep "
            f"its own. Below: charts **measured here** (bundled evaluations, {md(created)}) beside the paper's, "
            "**quoted**.")


def _grid_html(ctx: AppContext, folder, index: dict, task: str) -> str:
    """The task's labelled grid (`recare.report.grid_html`): a row per model with its name in front, the target
    prompt's and the CARE prompt's images on the same seeds."""
    from recare.report import grid_html, run_grid

    grids = [run_grid(folder / e["run"], label=demo_bundle.MODELS.get(e.get("model"), (None, e.get("label", "")))[1])
             for e in _entries(ctx, index, task)]
    return grid_html([g for g in grids if g is not None], element_id="demo-grid-table")


def _estimate(ctx: AppContext, entries: list[dict]) -> str:
    device = str(ctx.models.device)
    estimate = demo_bundle.rerun_estimate(ctx.runs, entries, device)
    parts = []
    trained = [e for e in entries if e.get("method")]
    if trained:
        if estimate["train_s"] is not None:
            parts.append(f"training about **{_duration(estimate['train_s'])}** ({md(estimate['speed'] or '')})")
        else:
            took = [e.get("made_by", {}).get("train_seconds") for e in trained]
            known = [t for t in took if isinstance(t, (int, float))]
            parts.append("training: not measured on this device yet (the first training run measures it"
                         + (f"; the bundle's took {_duration(sum(known))} where it was made)" if known else ")"))
    if estimate["evaluate_s"] is not None:
        parts.append(f"evaluations about **{_duration(estimate['evaluate_s'])}** (as long as the bundle's took "
                     "where it was made)")
    other = [e.get("label", "") for e in trained if (e.get("made_by") or {}).get("trained_as_rerun") is False]
    note = (f"  \nNote: {md(', '.join(other))} {'was' if len(other) == 1 else 'were'} trained with other settings "
            "than the world's recommended ones, which the re-run uses, so its numbers may differ.") if other else ""
    return (f"Re-run on **{md(device)}**: " + "; ".join(parts) + ". The jobs run one after another and show "
            "live in the charts; closing the page does not stop them." + note)


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------------------
# handlers


def _show(ctx: AppContext, task):
    """(evaluations dropdown, status, RATIO radar, its table, CARE chart, its table, info, grid, estimate,
    paper task, headline: RATIO measured beside the paper's)."""
    found = demo_of(ctx)
    entries = _entries(ctx, found[1], task) if found and isinstance(task, str) else []
    if not entries:
        message = problem(f"the demo has no results for the task {str(task)[:40]!r}.")
        return (gr.skip(), message, gr.skip(), gr.skip(), gr.skip(), gr.skip(), {"error": message}, gr.skip(),
                gr.skip(), gr.skip(), gr.skip())
    try:
        ids = [e["run"] for e in entries]  # bundled runs only (`_entries`): readable by every browser
        states, rows = collect_evaluations(ctx, ids, owner=None)
        method = {e["run"]: e.get("model") for e in entries}
        rows = [{**r, "key": method.get(r["run"])} for r in rows]  # one colour per method, as the paper's charts
        ratio, care, numbers = metric_tables(rows)
        grid = _grid_html(ctx, found[0], found[1], task)
        estimate = _estimate(ctx, entries)
    except (RecareError, OSError, ValueError) as e:
        message = problem(f"the demo bundle cannot be read: {e}")
        return (gr.skip(), message, gr.skip(), gr.skip(), gr.skip(), gr.skip(), {"error": message}, gr.skip(),
                gr.skip(), gr.skip(), gr.skip())
    lines = [f"- **{md(s['model'])}** ({s['id']}): ✓ bundled result" for s in states]
    info = {"runs": states, "ratio": numbers, "care": {r["model"]: (r.get("care_score") or {}).get("per_concept")
                                                       for r in rows}, "all_done": True, "demo_task": task}
    return (gr.Dropdown(value=ids), "\n".join(lines), ratio_radar_figure(rows, height=CHART_HEIGHT), ratio,
            care_radar_figure(rows, height=CHART_HEIGHT), care, info, grid, estimate,
            paper.paper_task(task) or gr.skip(), headline(rows, numbers, paper.paper_task(task)))


def _rerun(ctx: AppContext, task, key, request=None):
    """Submit one job per model of the task for this browser. Returns (message, evaluations, timer)."""
    from recare.jobs.requests import DemoRerunRequest, submit_requests

    try:
        owner = owner_key(key, request)
        found = demo_of(ctx)
        entries = _entries(ctx, found[1], task) if found and isinstance(task, str) else []
        if not entries:
            raise ConfigError(f"the demo has no results for the task {str(task)[:40]!r}.")
        device = str(ctx.models.device)
        jobs = [DemoRerunRequest(demo_bundle.rerun_job(e, device)[1]) for e in entries]
        runs = submit_requests(ctx.jobs, jobs, submitter(ctx, owner, request), device=device)  # all or none
    except RecareError as e:
        return problem(f"Not started: {no_paths(ctx, e)}"), gr.skip(), gr.skip()
    ids = [r.id for r in runs]
    return (ok(f"Re-running {md(task)}: {', '.join(ids)} (they run one after another; the charts update as each "
               "finishes)."),
            gr.Dropdown(choices=evaluation_choices(ctx, owner), value=[*(e["run"] for e in entries), *ids]),
            gr.Timer(active=True))


__all__ = ["attach_demo", "demo_of"]
