"""Compare workspace: evaluate the base model and unlearned models on the same seeds, live RATIO and CARE radars.

Nothing here evaluates: Start submits one job per picked model (target `recare.eval.run:run_evaluation_job`,
kind "evaluate") to the app's JobRunner with the browser's owner key, and a gr.Timer polls the run
folders while any is queued or running. As each job finishes, its metrics.json joins the charts:
- the RATIO radar (Appendix M): Defense, Utility, CARE, one filled triangle per model, RATIO in the legend;
- the CARE chart (Appendix N.2): one axis per CARE concept, one trace per model (bars below 3 concepts).
Every number comes from `recare.metrics` through `ui.figures.radar_numbers` / `care_radar_figure`.

Models: the base (the header's model), this browser's finished training runs, and uploaded trained
checkpoints (trained_params.safetensors or ReCARE-Diffusers-UNet.pt), each copied into a run folder of
kind "checkpoint" after `recare.models.load_trained_unet_state` checked that it fits the base model.
Every event is a named API endpoint (`evaluate_*`).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from recare import models, worldspec
from recare.errors import ConfigError, RecareError, RunError
from recare.eval import attacks as eval_attacks
from recare.eval.config import EvaluationConfig
from recare.runs import CANCELLED, DONE, QUEUED, RUNNING
from ui.common import AppContext, md, number, ok, owner_key, problem, served
from ui.figures import care_concepts, care_radar_figure, radar_numbers, ratio_radar_figure

TARGET = "recare.eval.run:run_evaluation_job"
BASE = "base"  # the model list's value for the header's base model
CHECKPOINT_KIND = "checkpoint"
CHECKPOINT_NAMES = (models.TRAINED_PARAMS_FILE, models.OFFICIAL_UNET_FILE)
ATTACK_CHOICES = tuple(a for a in ("erased", "cce", "completion", "noise") if a in eval_attacks.ATTACKS)
POLL_S = 2.0
RATIO_COLUMNS = ("model", "run", "Defense attack", "ASR %", "Defense", "Utility", "CARE", "RATIO", "CLIP score")


def create_compare_tab(ctx: AppContext) -> dict[str, Any]:
    """Build the Compare workspace inside the current gr.Tab.

    Args:
        ctx: the shell's context (model picker, run store, job runner, owner key).
    """
    tasks = [t.get("name") for t in worldspec.mini_world_tasks() if t.get("name")]
    first = _task_prompts(tasks[0]) if tasks else ("", "{}")
    c: dict[str, Any] = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=320):
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
            c["care_prompts"] = gr.Code(first[1], language="json", label="CARE prompts {concept: [prompts]}",
                                        lines=4, elem_id="compare-care-prompts")
            c["attacks"] = gr.CheckboxGroup(list(ATTACK_CHOICES), value=["erased"], label="Attacks",
                                            info="erased is fastest; Appendix M's RATIO uses CCE (without it, the "
                                                 "Defense axis uses the strongest attack run)",
                                            elem_id="compare-attacks")
            with gr.Row():
                c["seeds"] = gr.Number(4, precision=0, label="Seeds per prompt", elem_id="compare-seeds")
                c["care_images"] = gr.Number(2, precision=0, label="CARE images per prompt")
                c["clip_count"] = gr.Number(8, precision=0, label="CLIP captions")
            with gr.Row():
                c["start"] = gr.Button("Evaluate", variant="primary", elem_id="compare-start")
                c["cancel"] = gr.Button("Cancel", variant="stop", elem_id="compare-cancel")
            c["message"] = gr.Markdown("", elem_id="compare-message")
        with gr.Column(scale=2):
            with gr.Row():
                c["evaluations"] = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True,
                                               label="Evaluations shown",
                                               info="your evaluation runs (this browser's); Evaluate selects its own",
                                               elem_id="compare-evaluations", scale=4)
                c["refresh"] = gr.Button("Refresh", size="sm", scale=1, elem_id="compare-refresh")
            c["status"] = gr.Markdown("No evaluation selected.", elem_id="compare-status")
            with gr.Row():
                with gr.Column():
                    c["ratio_plot"] = gr.Plot(label="RATIO radar", elem_id="compare-ratio")
                    c["ratio_table"] = gr.Dataframe(pd.DataFrame(columns=list(RATIO_COLUMNS)), interactive=False,
                                                    label="RATIO numbers", elem_id="compare-ratio-table")
                with gr.Column():
                    c["care_plot"] = gr.Plot(label="CARE scores", elem_id="compare-care")
                    c["care_table"] = gr.Dataframe(pd.DataFrame(columns=["model"]), interactive=False,
                                                   label="CARE score per concept", elem_id="compare-care-table")
            with gr.Row():
                c["export"] = gr.Button("Export metrics (JSON + CSV)", elem_id="compare-export")
                c["json_file"] = gr.File(label="metrics.json", interactive=False, elem_id="compare-json")
                c["csv_file"] = gr.File(label="metrics.csv", interactive=False, elem_id="compare-csv")
            c["info"] = gr.JSON(visible=False)  # the poll's numbers for API clients
    c["timer"] = gr.Timer(POLL_S, active=False)

    owner = ctx.owner
    settings = [c[k] for k in ("models", "task", "target_prompt", "care_prompts", "attacks", "seeds", "care_images",
                               "clip_count")]
    poll_out = [c["status"], c["ratio_plot"], c["ratio_table"], c["care_plot"], c["care_table"], c["info"], c["timer"]]

    def start(picked, task, target_prompt, care_prompts, attacks, seeds, care_images, clip_count, model_name, key,
              request: gr.Request):
        return _start(ctx, picked, task, target_prompt, care_prompts, attacks, seeds, care_images, clip_count,
                      model_name, key, request)

    def poll(ids, key, request: gr.Request):
        return _poll(ctx, ids, key, request)

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

    c["task"].change(_fill_task, [c["task"]], [c["target_prompt"], c["care_prompts"]], api_name=False,
                     show_progress="hidden")
    c["start"].click(start, [*settings, ctx.model_name, owner], [c["message"], c["evaluations"], c["timer"]],
                     api_name="evaluate_start", concurrency_limit=4)
    c["timer"].tick(poll, [c["evaluations"], owner], poll_out, api_name=False, show_progress="hidden")
    c["evaluations"].input(poll, [c["evaluations"], owner], poll_out, api_name=False, show_progress="hidden")
    c["status_btn"] = gr.Button(visible=False)  # API twin of the poll
    c["status_btn"].click(poll, [c["evaluations"], owner], poll_out, api_name="evaluate_status", show_progress="hidden")
    c["cancel"].click(cancel, [c["evaluations"], owner], [c["message"], c["timer"]], api_name="evaluate_cancel")
    c["refresh"].click(list_evaluations, [c["evaluations"], owner], [c["evaluations"]], api_name="evaluate_list")
    c["models_refresh"].click(list_models, [c["models"], owner], [c["models"]], api_name="evaluate_models")
    c["add"].click(add, [c["checkpoint"], ctx.model_name, c["models"], owner], [c["message"], c["models"]],
                   api_name="evaluate_add_checkpoint", concurrency_limit=1)
    c["export"].click(export, [c["evaluations"], owner], [c["json_file"], c["csv_file"], c["message"]],
                      api_name="evaluate_export")
    root = gr.context.Context.root_block
    if root is not None:  # a reopened page finds its models and evaluations
        root.load(list_models, [c["models"], owner], [c["models"]], api_visibility="private")
        root.load(list_evaluations, [c["evaluations"], owner], [c["evaluations"]], api_visibility="private")
    owner.change(list_models, [c["models"], owner], [c["models"]], api_visibility="private")
    owner.change(list_evaluations, [c["evaluations"], owner], [c["evaluations"]], api_visibility="private")
    return c


# ---------------------------------------------------------------------------------------------
# models


def _task_prompts(task) -> tuple[str, str]:
    """(target prompt, CARE prompts as JSON) of a mini-world task."""
    from recare.workflows import mini_world_task

    t = mini_world_task(task)
    return t.get("target_prompt", ""), json.dumps(t.get("care_prompts") or {}, indent=1)


def _fill_task(task):
    try:
        return _task_prompts(task)
    except RecareError as e:
        problem(str(e))
        return gr.skip(), gr.skip()


def _model_options(ctx: AppContext, owner: str) -> list[tuple[str, str]]:
    """(label, value) of every model the owner can compare: the base, finished training runs, checkpoints."""
    options = [("base model (header)", BASE)]
    for kind in ("train", CHECKPOINT_KIND):
        for run in ctx.runs.list(owner=owner, kind=kind):
            if run.bundled:
                continue
            try:
                if run.status().get("state") != DONE:
                    continue
                options.append((_model_label(run), run.id))
            except RecareError:
                continue
    return options


def _model_label(run) -> str:
    config = run.config()
    if "checkpoint" in config:
        return f"uploaded {config['checkpoint'].get('file')} ({run.id})"
    train = config.get("train") or {}
    concept = train.get("reference_word", "")
    return f"{run.id} ({train.get('method', '')}{', ' + concept if concept else ''})"


def _models_choices(ctx: AppContext, picked, key, request=None):
    try:
        options = _model_options(ctx, owner_key(key, request))
    except RecareError as e:
        problem(str(e))
        return gr.skip()
    values = {v for _, v in options}
    return gr.CheckboxGroup(choices=options, value=[p for p in (picked or []) if p in values] or [BASE])


def _add_checkpoint(ctx: AppContext, payload, model_name, picked, key, request=None):
    """Copy an uploaded checkpoint into a run folder once it is known to fit the base model; else refuse it."""
    run = None
    try:
        owner = owner_key(key, request)
        source = _uploaded(payload)
        if source.name not in CHECKPOINT_NAMES:
            raise ConfigError(f"{source.name} is not a trained checkpoint this workspace takes: upload "
                              f"{' or '.join(CHECKPOINT_NAMES)}.")
        model_name = str(model_name or models.MINI_WORLD)
        base = ctx.models.pipeline(model_name)
        run = ctx.runs.create(CHECKPOINT_KIND, {"checkpoint": {"file": source.name, "model": model_name}}, owner=owner)
        target = run.path / source.name
        shutil.copyfile(source, target)
        models.load_trained_unet_state(target, base.unet)  # ModelLoadError: another base, damaged file
        run.update_status(state=DONE, result={"file": source.name, "model": model_name})
    except RecareError as e:
        if run is not None:
            shutil.rmtree(run.path, ignore_errors=True)  # a refused checkpoint leaves nothing behind
        return problem(f"Checkpoint refused: {e}"), gr.skip()
    options = _model_options(ctx, owner)
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


def _care_prompts(text) -> dict[str, list[str]]:
    try:
        value = json.loads(text or "{}")
    except ValueError as e:
        raise ConfigError(f"the CARE prompts are not JSON ({e}).") from None
    if not isinstance(value, dict) or not value:
        raise ConfigError('the CARE prompts must map each CARE concept to a list of prompts: {"person": ["..."]}.')
    return value


def _start(ctx: AppContext, picked, task, target_prompt, care_prompts, attacks, seeds, care_images, clip_count,
           model_name, key, request=None):
    """One evaluation job per picked model. Returns (message, evaluations dropdown, timer)."""
    try:
        owner = owner_key(key, request)
        picked = [p for p in (picked or []) if isinstance(p, str)]
        if not picked:
            raise ConfigError("pick at least one model.")
        attacks = [a for a in (attacks or []) if isinstance(a, str)]
        if not attacks:
            raise ConfigError(f"pick at least one attack ({', '.join(ATTACK_CHOICES)}).")
        base_model = str(model_name or models.MINI_WORLD)
        common = {"task": task if base_model == models.MINI_WORLD and task else None,
                  "target_prompt": (target_prompt or "").strip() or None, "care_prompts": _care_prompts(care_prompts),
                  "attacks": attacks, "seeds": int(number(seeds, "seeds")),
                  "care_images_per_prompt": int(number(care_images, "CARE images per prompt")),
                  "clip_count": int(number(clip_count, "CLIP captions")), "device": str(ctx.models.device)}
        jobs = []
        for value in picked:  # check every model before any job starts
            if value == BASE:
                config = EvaluationConfig(model=base_model, **common)
                label = f"base ({base_model})"
            else:
                run = ctx.runs.get(value, owner)
                if run.status().get("state") != DONE:
                    raise RunError(f"run {run.id} has not finished.")
                settings = run.config()
                weights = run.path / settings["checkpoint"]["file"] if "checkpoint" in settings else run.path
                model = (settings.get("checkpoint") or settings.get("train") or {}).get("model") or base_model
                config = EvaluationConfig(model=model, unet=str(weights),
                                          **{**common, "task": common["task"] if model == models.MINI_WORLD else None})
                label = _model_label(run)
            jobs.append((config, label, value))
        runs = [ctx.jobs.submit("evaluate", TARGET, {"command": "app", "evaluation": config.to_dict(),
                                                     "compare": {"label": label, "model": value}},
                                owner=owner, device=str(ctx.models.device)) for config, label, value in jobs]
    except RecareError as e:
        return problem(f"Not started: {e}"), gr.skip(), gr.skip()
    ids = [r.id for r in runs]
    return (ok(f"Started {len(ids)} evaluation(s): {', '.join(ids)}."),
            gr.Dropdown(choices=_evaluation_choices(ctx, owner), value=ids), gr.Timer(active=True))


def _ids(ids) -> list[str]:
    if isinstance(ids, str):
        ids = [i for i in ids.replace(",", " ").split() if i]
    return [i for i in (ids or []) if isinstance(i, str) and i.strip()]


def _cancel(ctx: AppContext, ids, key, request=None):
    try:
        owner = owner_key(key, request)
        messages = [ctx.jobs.cancel(run_id, owner=owner) for run_id in _ids(ids)]
    except RecareError as e:
        return problem(str(e)), gr.skip()
    if not messages:
        return problem("no evaluation selected."), gr.skip()
    return ok(" ".join(messages)), gr.Timer(active=True)


def _evaluation_choices(ctx: AppContext, owner: str) -> list[tuple[str, str]]:
    choices = []
    for run in ctx.runs.list(owner=owner, kind="evaluate"):
        try:
            label = (run.config().get("compare") or {}).get("label", "")
            choices.append((f"{run.id} · {label}", run.id))
        except RecareError:
            continue
    return choices


def _list(ctx: AppContext, ids, key, request=None):
    try:
        choices = _evaluation_choices(ctx, owner_key(key, request))
    except RecareError as e:
        problem(str(e))
        return gr.skip()
    known = {v for _, v in choices}
    return gr.Dropdown(choices=choices, value=[i for i in _ids(ids) if i in known])


# ---------------------------------------------------------------------------------------------
# the live view


def _metrics(run) -> dict | None:
    """metrics.json of a finished evaluation run (None while it has none)."""
    path = run.path / "metrics.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _collect(ctx: AppContext, ids, owner: str) -> tuple[list[dict], list[dict]]:
    """(per-run states, metrics rows of the finished ones: metrics.json plus "model" and "run")."""
    states, rows = [], []
    for run_id in _ids(ids):
        run = ctx.runs.get(run_id, owner)
        status, label = run.status(), (run.config().get("compare") or {}).get("label", run_id)
        metrics = _metrics(run) if status.get("state") == DONE else None
        progress = status.get("progress") or {}
        states.append({"id": run.id, "model": label, "state": status.get("state"), "stage": progress.get("stage"),
                       "step": progress.get("step"), "total": progress.get("total"), "error": status.get("error")})
        if metrics is not None:
            rows.append({**metrics, "model": label, "run": run.id})
    return states, rows


def _tables(rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    numbers = []
    for row in rows:
        n = radar_numbers(row)
        if n is not None:
            numbers.append({**n, "run": row["run"]})
    ratio = pd.DataFrame([[n["model"], n["run"], n["attack"], round(n["asr"], 2), round(n["D"], 4), round(n["U"], 4),
                           round(n["C"], 4), round(n["ratio"], 4), round(n["clip_score"], 4)] for n in numbers],
                         columns=list(RATIO_COLUMNS))
    concepts = care_concepts(rows)
    care = pd.DataFrame([[row["model"], *[((row.get("care_score") or {}).get("per_concept") or {}).get(c)
                                          for c in concepts]] for row in rows], columns=["model", *concepts])
    return ratio, care, numbers


def _poll(ctx: AppContext, ids, key, request=None):
    """(status, RATIO radar, its table, CARE chart, its table, info, timer) of the selected evaluations."""
    try:
        owner = owner_key(key, request)
        states, rows = _collect(ctx, ids, owner)
    except RecareError as e:
        return md(str(e)), gr.skip(), gr.skip(), gr.skip(), gr.skip(), {"error": str(e)}, gr.Timer(active=False)
    if not states:
        return "No evaluation selected.", None, gr.skip(), None, gr.skip(), {"runs": []}, gr.Timer(active=False)
    lines = []
    for s in states:
        if s["state"] == RUNNING and s["total"]:
            what = f"running · {s['stage']} {s['step']}/{s['total']}"
        elif s["state"] in ("failed",):
            what = f"⚠ failed: {md(s['error'] or 'unknown error')}"
        else:
            what = {DONE: "✓ done", QUEUED: "queued", CANCELLED: "cancelled", RUNNING: "running"}.get(s["state"],
                                                                                                s["state"])
        lines.append(f"- **{md(s['model'])}** ({s['id']}): {what}")
    ratio, care, numbers = _tables(rows)
    active = any(s["state"] in (QUEUED, RUNNING) for s in states)
    info = {"runs": states, "ratio": numbers, "care": {r["model"]: (r.get("care_score") or {}).get("per_concept")
                                                       for r in rows}, "all_done": not active}
    return ("\n".join(lines), ratio_radar_figure(rows), ratio, care_radar_figure(rows), care, info,
            gr.Timer(active=active))


def _export(ctx: AppContext, ids, key, request=None):
    """metrics.json (every finished model's metrics and radar numbers) and metrics.csv (one row per model)."""
    try:
        owner = owner_key(key, request)
        _, rows = _collect(ctx, ids, owner)
        if not rows:
            raise RunError("no finished evaluation selected: nothing to export yet.")
    except RecareError as e:
        return gr.skip(), gr.skip(), problem(str(e))
    numbers = _tables(rows)[2]
    with tempfile.TemporaryDirectory(prefix="recare-compare-") as tmp:
        folder = Path(tmp)
        (folder / "metrics.json").write_text(json.dumps({"models": rows, "ratio_radar": numbers}, indent=1),
                                             encoding="utf-8")
        attacks = list(dict.fromkeys(a for r in rows for a in (r.get("asr") or {})))
        concepts = care_concepts(rows)
        by_run = {n["run"]: n for n in numbers}
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["model", "run", *[f"asr_{a}" for a in attacks], "clip_score", "care_score",
                         *[f"care_{c}" for c in concepts], "defense_attack", "defense", "utility", "care", "ratio"])
        for r in rows:
            n = by_run.get(r["run"]) or {}
            per = (r.get("care_score") or {}).get("per_concept") or {}
            writer.writerow([r["model"], r["run"], *[(r.get("asr") or {}).get(a, "") for a in attacks],
                             r.get("clip_score", ""), (r.get("care_score") or {}).get("mean", ""),
                             *[per.get(c, "") for c in concepts],
                             *[n.get(k, "") for k in ("attack", "D", "U", "C", "ratio")]])
        (folder / "metrics.csv").write_text(buffer.getvalue(), encoding="utf-8")
        return (served(folder / "metrics.json"), served(folder / "metrics.csv"),
                ok(f"Exported the metrics of {len(rows)} model(s)."))
