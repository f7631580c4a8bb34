"""Compare workspace: evaluate the base model and unlearned models on the same seeds, live RATIO and CARE radars.

Nothing here evaluates: Start submits one `recare.jobs.requests.EvaluateRequest` per picked model (kind
"evaluate"; checked, bounded and quota-counted as one batch) to the app's JobRunner with the browser's owner key, and a gr.Timer polls the run
folders while any is queued or running. The charts are live: while a job runs, its provisional metrics
(`recare.eval.run_metrics.partial_metrics`: the same metrics over the images made so far) are drawn dashed with
"(partial)" in the legend and the tables; when it finishes, its metrics.json replaces them:
- the RATIO radar (Appendix M): Defense, Utility, CARE, one filled triangle per model, RATIO in the legend;
- the CARE chart (Appendix N.2): one axis per chosen CARE concept (up to 10), one trace per model (bars
  below 3 concepts).
Every number comes from `recare.metrics` through `recare.charts` (`radar_numbers`, `care_radar_figure`); where an
evaluation ran a learned attack several times the RATIO radar adds the worst run's triangle, dotted.

Layout, the story first: a row of four charts, each under one reading line: the RATIO radar and the CARE
chart *measured here*, each beside the paper's own numbers for the same task *quoted* (`recare.paper`: Table 1,
Table 13; "Paper task" picks nudity, van gogh or tench, a mini-world task its own); under them the numbers of
every chart in tables; then, in sections (collapsed under the reviewer demo, which adds its labelled grid above
the charts, `ui.demo`): the evaluation settings, the prompt grid, and the exports (the HTML report of
`recare.report`, metrics JSON / CSV of `recare.eval.export`, the grid PNG), whose download boxes appear once
they hold a file. What the page shows as data lives beside it: the models and settings in `ui.compare_settings`,
the grid, the paper view and the evaluations' metrics in `ui.compare_data`.

The image grid shows one prompt (the target prompt, a run's own adversarial-token prompts, each CARE
prompt, the custom prompts; `recare.eval.plan.prompt_table`) for every model on the same seeds: rows =
models (a row per attack run where a learned attack ran several times), columns = seeds, from the images the
evaluation runs save (images/<set>/...). Images the NudeNet detector flags (judged once per file,
`recare.eval.detection_cache`) are shown as `recare.safety.blur` copies; when the detector is unavailable
every image is. The grid exports as one PNG.

Models: the base (the header's model), this browser's finished training runs, and uploaded trained
checkpoints (trained_params.safetensors or ReCARE-Diffusers-UNet.pt), each copied into a run folder of
kind "checkpoint" after `recare.models.load_trained_unet_state` checked that it fits the base model.
Every event is a named API endpoint (`evaluate_*`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from recare import models, worldspec
from recare.errors import ConfigError, RecareError, RunError
from recare.eval.export import write_metrics_export
from recare.runs import CANCELLED, DONE, QUEUED, RUNNING
from ui.common import AppContext, md, no_paths, ok, owner_key, page_owner, problem, served, submitter
from recare import paper
from ui.compare_data import (
    collect_evaluations, evaluation_choices, evaluation_ids,
    CHART_GUIDES, CHART_HEIGHT, SET_NAMES, grid_data, grid_html, grid_info, grid_note, paper_care_frame,
    paper_care_guide, paper_guide, paper_note, paper_table_frame, paper_view, report_file, shown_image,
)
from ui.compare_settings import (
    ATTACK_CHOICES, BASE, CHECKPOINT_KIND, CHECKPOINT_NAMES, DEFAULT_ATTACK_RUNS, CompareSettings, evaluation_requests,
    model_options, task_prompts,
)
from ui.figures import (
    MAX_CARE_AXES, TABLE_COLUMNS, care_concepts, care_radar_figure, image_grid, metric_tables, ratio_radar_figure,
)

POLL_S = 2.0
# the RATIO table's columns (TABLE_COLUMNS): room for the model and the run id, the numbers narrow
RATIO_TABLE_WIDTHS = ("15%", "18%", "6%", "5%", "6%", "6%", "6%", "6%", "5%", "6%", "6%", "7%", "8%")


def create_compare_tab(ctx: AppContext) -> dict[str, Any]:
    """Build the Compare workspace inside the current gr.Tab.

    Args:
        ctx: the shell's context (model picker, run store, job runner, owner key).
    """
    tasks = [t.get("name") for t in worldspec.mini_world_tasks() if t.get("name")]
    first = task_prompts(tasks[0]) if tasks else ("", "{}")
    c: dict[str, Any] = {}
    demo = ctx.runs is not None and bool(ctx.runs.bundled)  # a reviewer demo fills the charts from the start
    paper_first = paper.paper_task(tasks[0]) if tasks else None
    # ---- the story first: the four charts (measured here | quoted from the paper), one reading line each ----
    with gr.Row(equal_height=False, elem_id="compare-charts"):
        _, c["ratio_plot"] = _chart(CHART_GUIDES["ratio"], "RATIO radar · measured here", "compare-ratio")
        c["paper_ratio_guide"], c["paper_ratio_plot"] = _chart(
            paper_guide(paper_first), "RATIO radar · quoted from the paper (SD v1.4)", "paper-ratio")
        _, c["care_plot"] = _chart(CHART_GUIDES["care"], "CARE scores · measured here", "compare-care")
        c["paper_care_guide"], c["paper_care_plot"] = _chart(
            paper_care_guide(paper_first), "CARE · quoted from the paper (SD v1.4)", "paper-care")
    with gr.Accordion("Numbers behind the charts", open=True, elem_id="compare-numbers"):
        c["status"] = gr.Markdown("No evaluation selected.", elem_id="compare-status")
        c["ratio_table"] = gr.Dataframe(pd.DataFrame(columns=list(TABLE_COLUMNS)), interactive=False, wrap=True,
                                        label="RATIO numbers · measured here (attack runs, mean and worst ASR)",
                                        column_widths=list(RATIO_TABLE_WIDTHS), elem_id="compare-ratio-table")
        c["care_table"] = gr.Dataframe(pd.DataFrame(columns=["model"]), interactive=False, wrap=True,
                                       label="CARE score per concept · measured here", elem_id="compare-care-table")
        c["care_concepts"] = gr.CheckboxGroup([], value=[], label=f"CARE radar axes (up to {MAX_CARE_AXES})",
                                              info="the evaluated CARE concepts; Appendix N.2",
                                              elem_id="compare-care-concepts")
        with gr.Row():
            c["paper_task"] = gr.Radio([(t, t) for t in paper.TASKS], value=paper_first, label="Paper task",
                                       info="the paper's Table 1 rows shown; a mini-world task picks its own "
                                            "(smoking stands for nudity)", elem_id="paper-task", scale=1)
            c["paper_note"] = gr.Markdown(paper_note(paper_first), elem_id="paper-note")
        c["paper_table"] = gr.Dataframe(paper_table_frame(paper_first), interactive=False, wrap=True,
                                        label="Paper (SD v1.4) · quoted: Table 1 rows, with the RATIO recare.metrics "
                                              "gives for them", elem_id="paper-table")
        c["paper_care_table"] = gr.Dataframe(paper_care_frame(paper_first), interactive=False, wrap=True,
                                             label="Paper (SD v1.4) · quoted: CARE scores", elem_id="paper-care-table")
    # ---- evaluating models: the settings, collapsed under a demo ----
    with gr.Accordion("Evaluate models", open=not demo, elem_id="compare-evaluate"):
        with gr.Row():
            c["evaluations"] = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True,
                                           label="Evaluations shown",
                                           info="your evaluation runs (this browser's) and the demo's; Evaluate "
                                                "selects its own", elem_id="compare-evaluations", scale=4)
            c["refresh"] = gr.Button("Refresh", size="sm", scale=1, elem_id="compare-refresh")
        with gr.Row(equal_height=False):
            with gr.Column(min_width=320):
                with gr.Row():
                    c["models"] = gr.CheckboxGroup([("base model (header)", BASE)], value=[BASE], label="Models",
                                                   info="the base, your finished training runs, uploaded checkpoints",
                                                   elem_id="compare-models", scale=4)
                    c["models_refresh"] = gr.Button("Refresh", size="sm", scale=1, elem_id="compare-models-refresh")
                with gr.Row():
                    c["checkpoint"] = gr.File(label=f"Add a trained checkpoint ({' or '.join(CHECKPOINT_NAMES)})",
                                              file_types=[".safetensors", ".pt"], height=90, scale=3,
                                              elem_id="compare-checkpoint")
                    c["add"] = gr.Button("Add", size="sm", scale=1, elem_id="compare-add")
                c["task"] = gr.Dropdown([(f"mini world: {t}", t) for t in tasks], value=tasks[0] if tasks else None,
                                        label="Task", allow_custom_value=True, elem_id="compare-task",
                                        info="fills the target prompt and the CARE prompts from recare.json")
                c["target_prompt"] = gr.Textbox(first[0], label="Target prompt (the erased attack)")
                c["custom_prompts"] = gr.Textbox("", lines=2, max_lines=8, label="Custom prompts (one per line)",
                                                 info="made by every model on the attacks' seeds; shown in the grid, "
                                                      "not scored", elem_id="compare-custom")
            with gr.Column(min_width=320):
                c["care_prompts"] = gr.Code(first[1], language="json", label="CARE prompts {concept: [prompts]}",
                                            lines=4, elem_id="compare-care-prompts")
                c["attacks"] = gr.CheckboxGroup(list(ATTACK_CHOICES), value=["erased", "adversarial"], label="Attacks",
                                                info="erased is fastest; adversarial = a training run's own stage-1 "
                                                     "tokens (skipped for models without them); Appendix M's RATIO "
                                                     "uses CCE (without it, the Defense axis uses the strongest "
                                                     "attack run)", elem_id="compare-attacks")
                with gr.Row():
                    c["seeds"] = gr.Number(4, precision=0, label="Seeds per prompt", elem_id="compare-seeds")
                    c["care_images"] = gr.Number(2, precision=0, label="CARE images per prompt")
                    c["clip_count"] = gr.Number(8, precision=0, label="CLIP captions")
                    c["attack_runs"] = gr.Number(DEFAULT_ATTACK_RUNS, precision=0, label="Runs per learned attack",
                                                 info="CCE and UD (UnlearnDiff) are random: each runs this many "
                                                      "times with its own seed; the tables show mean, worst and runs",
                                                 elem_id="compare-attack-runs")
                with gr.Row():
                    c["start"] = gr.Button("Evaluate", variant="primary", elem_id="compare-start")
                    c["cancel"] = gr.Button("Cancel", variant="stop", elem_id="compare-cancel")
                c["message"] = gr.Markdown("", elem_id="compare-message")
    c["info"] = gr.JSON(visible=False)  # the poll's numbers for API clients
    with gr.Accordion("Same seeds, side by side: every prompt of the selected evaluations", open=not demo,
                      elem_id="compare-grid-section"):
        with gr.Row():
            c["grid_prompt"] = gr.Dropdown([], value=None, label="Prompt", scale=4, elem_id="compare-grid-prompt",
                                           info="rows = models, columns = seeds; NudeNet-flagged images are blurred")
            c["grid_export"] = gr.Button("Export grid (PNG)", size="sm", scale=1, elem_id="compare-grid-export")
        c["grid_file"] = gr.File(label="grid.png", interactive=False, visible=False, elem_id="compare-grid-file")
        c["grid_note"] = gr.Markdown("", elem_id="compare-grid-note")
        c["grid"] = gr.HTML("", elem_id="compare-grid")
        c["grid_info"] = gr.JSON(visible=False)  # the grid's cells for API clients
    with gr.Accordion("Export: report, metrics", open=False, elem_id="compare-exports"):
        with gr.Row():
            c["report"] = gr.Button("Export report (HTML)", variant="primary", elem_id="compare-report")
            c["export"] = gr.Button("Export metrics (JSON + CSV)", elem_id="compare-export")
        gr.Markdown("The report is one self-contained HTML file (opens offline): the grids, the charts with their "
                    "numbers, each run's settings and date, and the paper's quoted rows marked as such.")
        with gr.Row():
            c["report_file"] = gr.File(label="report.html", interactive=False, visible=False,
                                       elem_id="compare-report-file")
            c["json_file"] = gr.File(label="metrics.json", interactive=False, visible=False, elem_id="compare-json")
            c["csv_file"] = gr.File(label="metrics.csv", interactive=False, visible=False, elem_id="compare-csv")
        c["export_message"] = gr.Markdown("", elem_id="compare-export-message")
    c["timer"] = gr.Timer(POLL_S, active=False)
    c["view"] = gr.State({})  # what this page shows: the CARE concepts offered, the grid's content, safety flags

    owner = ctx.owner
    settings = [c[k] for k in ("models", "task", "target_prompt", "care_prompts", "attacks", "seeds", "care_images",
                               "clip_count", "custom_prompts")]
    poll_in = [c["evaluations"], owner, c["care_concepts"], c["view"]]
    poll_out = [c["status"], c["ratio_plot"], c["ratio_table"], c["care_plot"], c["care_table"], c["info"], c["timer"],
                c["care_concepts"], c["view"]]
    grid_in = [c["evaluations"], c["grid_prompt"], owner, c["view"]]
    grid_out = [c["grid_prompt"], c["grid"], c["grid_note"], c["grid_info"], c["view"]]

    def start(picked, task, target_prompt, care_prompts, attacks, seeds, care_images, clip_count, custom_prompts,
              model_name, key, attack_runs=DEFAULT_ATTACK_RUNS, request: gr.Request = None):
        return _start(ctx, (picked, task, target_prompt, care_prompts, attacks, seeds, care_images, clip_count,
                            custom_prompts, model_name, attack_runs), key, request)

    def poll(ids, key, concepts, view, request: gr.Request):
        return _poll(ctx, ids, key, concepts, view, request)

    def grid(ids, choice, key, view, request: gr.Request):
        return _grid(ctx, ids, choice, key, view, request)

    def export_grid(ids, choice, key, view, request: gr.Request):
        return _export_grid(ctx, ids, choice, key, view, request)

    def cancel(ids, key, request: gr.Request):
        return _cancel(ctx, ids, key, request)

    def list_evaluations(ids, key, request: gr.Request):
        return _list(ctx, ids, key, request)

    def list_models(picked, key, request: gr.Request):
        return _models_choices(ctx, picked, key, request)

    def add(file, model_name, picked, key, request: gr.Request):
        return _add_checkpoint(ctx, file, model_name, picked, key, request)

    def export(ids, key, request: gr.Request):
        return _export(ctx, ids, key, request)

    def export_report(ids, key, request: gr.Request):
        return _export_report(ctx, ids, key, request)

    def draw_paper(task):
        return _paper(task)

    c["task"].change(_fill_task, [c["task"]], [c["target_prompt"], c["care_prompts"]], api_name=False,
                     show_progress="hidden")
    # preprocess=False: the handler checks every raw value itself (a message, not a bare "Error")
    c["start"].click(start, [*settings, ctx.model_name, owner, c["attack_runs"]], [c["message"], c["evaluations"], c["timer"]],
                     api_name="evaluate_start", concurrency_limit=4, preprocess=False)
    c["timer"].tick(poll, poll_in, poll_out, api_name=False, show_progress="hidden").then(
        grid, grid_in, grid_out, api_name=False, show_progress="hidden")
    c["evaluations"].input(poll, poll_in, poll_out, api_name=False, show_progress="hidden").then(
        grid, grid_in, grid_out, api_name=False, show_progress="hidden")
    c["care_concepts"].input(poll, poll_in, poll_out, api_name=False, show_progress="hidden")
    c["grid_prompt"].input(grid, grid_in, grid_out, api_name=False, show_progress="hidden")
    c["status_btn"] = gr.Button(visible=False)  # API twins of the poll and of the grid
    c["status_btn"].click(poll, poll_in, poll_out, api_name="evaluate_status", show_progress="hidden")
    c["grid_btn"] = gr.Button(visible=False)
    c["grid_btn"].click(grid, grid_in, grid_out, api_name="evaluate_grid", show_progress="hidden")
    c["grid_export"].click(export_grid, grid_in, [c["grid_file"], c["grid_note"]], api_name="evaluate_export_grid").then(
        _show_files, [c["grid_file"]], [c["grid_file"]], api_name=False, show_progress="hidden")
    c["cancel"].click(cancel, [c["evaluations"], owner], [c["message"], c["timer"]], api_name="evaluate_cancel")
    c["refresh"].click(list_evaluations, [c["evaluations"], owner], [c["evaluations"]], api_name="evaluate_list")
    c["models_refresh"].click(list_models, [c["models"], owner], [c["models"]], api_name="evaluate_models")
    c["add"].click(add, [c["checkpoint"], ctx.model_name, c["models"], owner], [c["message"], c["models"]],
                   api_name="evaluate_add_checkpoint", concurrency_limit=1)
    c["export"].click(export, [c["evaluations"], owner], [c["json_file"], c["csv_file"], c["export_message"]],
                      api_name="evaluate_export").then(
        _show_files, [c["json_file"], c["csv_file"]], [c["json_file"], c["csv_file"]], api_name=False,
        show_progress="hidden")
    c["report"].click(export_report, [c["evaluations"], owner], [c["report_file"], c["export_message"]],
                      api_name="evaluate_report", concurrency_limit=2).then(
        _show_files, [c["report_file"]], [c["report_file"]], api_name=False, show_progress="hidden")
    paper_out = [c[k] for k in ("paper_ratio_plot", "paper_care_plot", "paper_ratio_guide", "paper_care_guide",
                                "paper_note", "paper_table", "paper_care_table")]
    c["paper_task"].change(draw_paper, [c["paper_task"]], paper_out, api_name="paper_view", show_progress="hidden")
    c["task"].change(lambda task: paper.paper_task(task) or gr.skip(), [c["task"]], [c["paper_task"]],
                     api_name=False, show_progress="hidden")
    root = gr.context.Context.root_block
    if root is not None:  # a reopened page finds its models and evaluations
        root.load(list_models, [c["models"], owner], [c["models"]], api_visibility="private")
        root.load(list_evaluations, [c["evaluations"], owner], [c["evaluations"]], api_visibility="private")
        root.load(draw_paper, [c["paper_task"]], paper_out, api_visibility="private", show_progress="hidden")
    owner.change(list_models, [c["models"], owner], [c["models"]], api_visibility="private")
    owner.change(list_evaluations, [c["evaluations"], owner], [c["evaluations"]], api_visibility="private")
    from ui.demo import attach_demo  # the reviewer demo's panel and bundled results (nothing without a bundle)

    attach_demo(ctx, c)
    return c


# ---------------------------------------------------------------------------------------------
# models


def _fill_task(task):
    try:
        return task_prompts(task)
    except RecareError as e:
        problem(str(e))
        return gr.skip(), gr.skip()


def _listing(key, request, make):
    """`make(owner)` for a page load or a Refresh; None (the caller skips) while a first visit's page has no
    browser key yet, or after an error, which is shown as a toast."""
    try:
        owner = page_owner(key, request)
        return None if owner is None else make(owner)
    except RecareError as e:
        problem(str(e))
        return None


def _models_choices(ctx: AppContext, picked, key, request=None):
    options = _listing(key, request, lambda owner: model_options(ctx, owner))
    if options is None:
        return gr.skip()
    values = {v for _, v in options}
    return gr.CheckboxGroup(choices=options, value=[p for p in (picked or []) if p in values] or [BASE])


def _add_checkpoint(ctx: AppContext, payload, model_name, picked, key, request=None):
    """Copy an uploaded checkpoint into a run folder once it is known to fit the base model; else refuse it.

    The file is inspected where it was uploaded (`recare.weights_check`: its header against the base UNet,
    before anything is inflated) and loaded; only then is a run made for it.
    """
    from recare.jobs.checks import check_model

    run = None
    try:
        owner = owner_key(key, request)
        source = _uploaded(payload)
        if source.name not in CHECKPOINT_NAMES:
            raise ConfigError(f"{source.name} is not a trained checkpoint this workspace takes: upload "
                              f"{' or '.join(CHECKPOINT_NAMES)}.")
        sub = submitter(ctx, owner, request)
        model_name = check_model(model_name if model_name not in (None, "") else models.MINI_WORLD, sub)
        base = ctx.models.pipeline(model_name)
        models.load_trained_unet_state(source, base.unet, limits=ctx.limits)  # another base, damaged, oversized
        run = ctx.runs.create(CHECKPOINT_KIND, {"checkpoint": {"file": source.name, "model": model_name}}, owner=owner,
                              client=sub.client)
        shutil.copyfile(source, run.path / source.name)
        run.update_status(state=DONE, result={"file": source.name, "model": model_name})
    except RecareError as e:
        if run is not None:
            shutil.rmtree(run.path, ignore_errors=True)  # a refused checkpoint leaves nothing behind
        return problem(f"Checkpoint refused: {no_paths(ctx, e)}"), gr.skip()
    except OSError as e:  # the disk, not the file: no half-made run may hold a quota slot
        if run is not None:
            shutil.rmtree(run.path, ignore_errors=True)
        return problem(f"Checkpoint not stored: the server could not write it ({type(e).__name__}); try again."), \
            gr.skip()
    options = model_options(ctx, owner)
    return (ok(f"Added {md(source.name)} as **{run.id}** (fits {md(model_name)})."),
            gr.CheckboxGroup(choices=options, value=list(dict.fromkeys([*(picked or []), run.id]))))


def _uploaded(payload) -> Path:
    """The path of an uploaded file; only files in Gradio's upload cache are read."""
    from gradio import utils

    path = payload.get("path") if isinstance(payload, dict) else payload if isinstance(payload, str) else None
    if not isinstance(path, str) or not path:
        raise ConfigError("no checkpoint uploaded: choose a file first.")
    resolved, cache = Path(path).resolve(), Path(utils.get_upload_folder()).resolve()
    if cache not in resolved.parents or not resolved.is_file():
        raise ConfigError("the checkpoint is not an uploaded file; upload it again.")
    return resolved


# ---------------------------------------------------------------------------------------------
# start, cancel, list


def _start(ctx: AppContext, values, key, request=None):
    """One evaluation job per picked model, submitted as one batch (all or none). Returns (message, evaluations
    dropdown, timer).

    Args:
        values: the form's raw values in `CompareSettings.from_inputs`'s order.
    """
    from recare.jobs.requests import submit_requests

    try:
        owner = owner_key(key, request)
        jobs = evaluation_requests(ctx, CompareSettings.from_inputs(*values), owner)  # all checked before any job
        runs = submit_requests(ctx.jobs, jobs, submitter(ctx, owner, request), device=str(ctx.models.device))
    except RecareError as e:
        return problem(f"Not started: {no_paths(ctx, e)}"), gr.skip(), gr.skip()
    ids = [r.id for r in runs]
    position = ctx.jobs.queue_position(ids[0])
    wait = f" Waiting: position {position} in the queue." if position and position > 1 else ""
    return (ok(f"Started {len(ids)} evaluation(s): {', '.join(ids)}.{wait}"),
            gr.Dropdown(choices=evaluation_choices(ctx, owner), value=ids), gr.Timer(active=True))


def _cancel(ctx: AppContext, ids, key, request=None):
    try:
        owner = owner_key(key, request)
        messages = [ctx.jobs.cancel(run_id, owner=owner) for run_id in evaluation_ids(ids)]
    except RecareError as e:
        return problem(no_paths(ctx, e)), gr.skip()
    if not messages:
        return problem("no evaluation selected."), gr.skip()
    return ok(" ".join(messages)), gr.Timer(active=True)


def _list(ctx: AppContext, ids, key, request=None):
    choices = _listing(key, request, lambda owner: evaluation_choices(ctx, owner))
    if choices is None:
        return gr.skip()
    known = {v for _, v in choices}
    try:
        shown = [i for i in evaluation_ids(ids) if i in known]
    except RecareError as e:
        problem(str(e))
        shown = []
    return gr.Dropdown(choices=choices, value=shown)


# ---------------------------------------------------------------------------------------------
# the live view


def _chosen_concepts(rows: list[dict], picked) -> tuple[list[str], list[str]]:
    """(every evaluated CARE concept, the radar's axes: the picked ones that exist, else the first 10)."""
    known = care_concepts(rows)
    chosen = [c for c in (picked or []) if isinstance(c, str) and c in known]
    return known, (chosen or known)[:MAX_CARE_AXES]


def _poll(ctx: AppContext, ids, key, concepts=None, view=None, request=None):
    """(status, RATIO radar, its table, CARE chart, its table, info, timer, CARE concepts, view) of the selected
    evaluations; the ones still running are drawn from their images so far, marked "(partial)"."""
    view = dict(view or {})
    try:
        owner = owner_key(key, request)
        states, rows = collect_evaluations(ctx, ids, owner)
        for state in states:  # a job's error may quote a server path: cut it in public mode
            state["error"] = no_paths(ctx, state["error"]) if state.get("error") else state.get("error")
    except RecareError as e:
        return (md(str(e)), gr.skip(), gr.skip(), gr.skip(), gr.skip(), {"error": str(e)}, gr.Timer(active=False),
                gr.skip(), view)
    if not states:
        return ("No evaluation selected.", None, gr.skip(), None, gr.skip(), {"runs": []}, gr.Timer(active=False),
                gr.skip(), view)
    lines = []
    for s in states:
        if s["state"] == RUNNING and s["total"]:
            what = f"running · {s['stage']} {s['step']}/{s['total']}"
        elif s["state"] in ("failed",):
            what = f"⚠ failed: {md(s['error'] or 'unknown error')}"
        else:
            what = {DONE: "✓ done", QUEUED: "queued", CANCELLED: "cancelled", RUNNING: "running"}.get(s["state"],
                                                                                                s["state"])
        if s["partial"]:
            what += f" · charts: partial, {s['partial']['images']} of {s['partial']['planned']} images"
        lines.append(f"- **{md(s['model'])}** ({s['id']}): {what}")
    known, chosen = _chosen_concepts(rows, concepts)
    if len([c for c in (concepts or []) if c in known]) > MAX_CARE_AXES:
        lines.append(f"- the CARE radar shows the first {MAX_CARE_AXES} chosen concepts")
    ratio, care, numbers = metric_tables(rows, chosen)
    active = any(s["state"] in (QUEUED, RUNNING) for s in states)
    info = {"runs": states, "ratio": numbers, "care": {r["model"]: (r.get("care_score") or {}).get("per_concept")
                                                       for r in rows},
            "partial": {r["run"]: r.get("progress") for r in rows if r.get("partial")},
            "care_axes": chosen, "all_done": not active}
    concept_box = gr.skip()
    if known != view.get("concepts") or list(concepts or []) != chosen:
        concept_box = gr.CheckboxGroup(choices=known, value=chosen)
        view["concepts"] = known
    return ("\n".join(lines), ratio_radar_figure(rows, height=CHART_HEIGHT), ratio,
            care_radar_figure(rows, height=CHART_HEIGHT, concepts=chosen), care, info,
            gr.Timer(active=active), concept_box, view)


# ---------------------------------------------------------------------------------------------
# the image grid


def _runs(ctx: AppContext, ids, owner: str | None) -> list:
    """The selected evaluation runs this owner may read (`RunStore.get` refuses the others)."""
    return [ctx.runs.get(run_id, owner) for run_id in evaluation_ids(ids)]


def _grid(ctx: AppContext, ids, choice, key, view=None, request=None):
    """(prompt dropdown, grid, note, grid info, view): the labelled grid of one prompt (HTML, images embedded);
    it is sent only when its content changed since this page's last update."""
    view = dict(view or {})
    view.pop("flags", None)  # verdicts are cached in the library now (recare.eval.detection_cache)
    try:
        grid = grid_data(_runs(ctx, ids, owner_key(key, request)), choice)
    except RecareError as e:
        return gr.skip(), gr.skip(), problem(str(e)), {"error": str(e)}, view
    info = grid_info(grid)
    signature = json.dumps([info["choices"], info["choice"], [[c["state"], c["file"], c["blurred"]]
                                                              for r in info["rows"] for c in r["cells"]]])
    if signature == view.get("grid"):
        return gr.skip(), gr.skip(), gr.skip(), info, view
    view["grid"] = signature
    dropdown = gr.Dropdown(choices=grid.choices, value=grid.choice)
    return dropdown, grid_html(grid), grid_note(grid), info, view


def _export_grid(ctx: AppContext, ids, choice, key, view=None, request=None):
    """(grid.png, message): the grid as one picture, labels drawn on it, flagged images blurred."""
    try:
        grid = grid_data(_runs(ctx, ids, owner_key(key, request)), choice)
        if not any(c["state"] == "ready" for r in grid.rows for c in r["cells"]):
            raise RunError("no image in the grid yet: select an evaluation that has made some.")
    except RecareError as e:
        return gr.skip(), problem(str(e))
    set_name, prompt = json.loads(grid.choice)
    picture = image_grid([(r["model"], [shown_image(c) if c["state"] == "ready" else None for c in r["cells"]])
                          for r in grid.rows], grid.seeds, title=f"{SET_NAMES.get(set_name, set_name)}: {prompt}")
    with tempfile.TemporaryDirectory(prefix="recare-grid-") as tmp:
        path = Path(tmp) / "compare-grid.png"
        picture.save(path)
        return served(path), ok(f"Exported the grid of {len(grid.rows)} model(s) x {len(grid.seeds)} seed(s).")


def _export(ctx: AppContext, ids, key, request=None):
    """metrics.json and metrics.csv (`recare.eval.export`: one row per model, worst runs too) of the finished ones."""
    try:
        owner = owner_key(key, request)
        rows = [r for r in collect_evaluations(ctx, ids, owner)[1] if not r.get("partial")]  # final numbers only
        if not rows:
            raise RunError("no finished evaluation selected: nothing to export yet.")
    except RecareError as e:
        return gr.skip(), gr.skip(), problem(str(e))
    with tempfile.TemporaryDirectory(prefix="recare-compare-") as tmp:
        json_path, csv_path = write_metrics_export(rows, tmp)
        return served(json_path), served(csv_path), ok(f"Exported the metrics of {len(rows)} model(s).")


# ---------------------------------------------------------------------------------------------
# the paper view and the report


def _chart(guide: str, label: str, elem_id: str) -> tuple[gr.Markdown, gr.Plot]:
    """One column of the chart row: its reading line over the chart (the label is for screen readers)."""
    with gr.Column(min_width=250):
        text = gr.Markdown(guide, elem_classes=["recare-guide"], elem_id=f"{elem_id}-guide")
        plot = gr.Plot(label=label, show_label=False, elem_id=elem_id)
    return text, plot


def _show_files(*files):
    """Download boxes are hidden until they hold a file: show each one that has one."""
    shown = [gr.File(visible=True) if f else gr.skip() for f in files]
    return shown[0] if len(shown) == 1 else shown


def _paper(task):
    """(paper RATIO radar, paper CARE chart, their two reading lines, the note, the two quoted tables)."""
    task = paper.paper_task(task)
    view = paper_view(task)
    return (view["ratio"], view["care"], paper_guide(task), paper_care_guide(task), paper_note(task), view["table"],
            view["care_table"])


def _export_report(ctx: AppContext, ids, key, request=None):
    """(report.html, message): the shareable report of the selected, finished evaluations."""
    try:
        owner = owner_key(key, request)
        with tempfile.TemporaryDirectory(prefix="recare-report-") as tmp:
            path = report_file(_runs(ctx, ids, owner), Path(tmp))
            return served(path), ok(
                f"Exported the report of {len(evaluation_ids(ids))} evaluation(s): one HTML file, opens offline.")
    except RecareError as e:
        return gr.skip(), problem(str(e))
