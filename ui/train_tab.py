"""Train workspace: start an unlearning run as a job, watch it live, cancel, resume, download, delete.

Layout first, event wiring last. Nothing here trains: Start builds a `recare.jobs.requests.TrainRequest`
(the model policy, every number bounded, the session's images and CARE-set copied into the run when it
is submitted) and submits it to the app's JobRunner (one GPU job at a time, the rest queue), and a gr.Timer polls the run folder (status.json, metrics.jsonl, previews/previews.jsonl)
while the selected run is queued or running. Runs belong to the browser's owner key, so a
reloaded page lists them again. Every event is also a named API endpoint (`train_*`).

Preview grids (the target prompt and one CARE prompt on fixed seeds, every N erase iterations,
beside the base model's grid of the same seeds) are made inside the training job by
`recare.train.preview.PreviewWriter` with the student UNet, the cheapest place: the weights
are already in memory there.

ZeroGPU (Hugging Face Spaces): nothing here changes. `spaces.GPU` only lends a GPU to a decorated
function called from the Gradio process for a bounded time, so on a ZeroGPU Space the JobRunner
runs a GPU job in a thread of this process instead of a spawned worker (`recare.jobs.zerogpu`): each
chunk is one `spaces.GPU(duration=D)` call that runs the same job target until a budget a bit
under D, stops it through the cancel protocol (state/ saved), and the next chunk resumes from
state/; the page polls the run as for any job.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from recare import models, worldspec
from recare.config import TRAIN_METHODS, TrainConfig
from recare.errors import ConfigError, RecareError, RunError
from recare.limits import human_bytes
from recare.runs import DONE, QUEUED, RUNNING
from recare.train import speed as train_speed
from ui.cluster_plot import cluster_plot
from ui.common import AppContext, client_key, md, no_paths, number, ok, owner_key, problem, served, submitter
from ui.figures import placeholder_json
from ui.session import Session
from ui.train_view import RUN_COLUMNS, checked_run_id, duration, phase_label, poll_run, runs_view

NO_TASK = "session"  # the task dropdown's "use this session's images and CARE-set"
METHODS = (("ReCARE (stage 1 + 2)", "recare"), ("ESD (baseline)", "esd"),
           ("ReCARE without adversarial tokens", "recare-no-adv"), ("ReCARE without retain loss (λ = 0)", "recare-no-retain"))
DOWNLOADS = (("trained parameters (.safetensors)", "trained_params"), ("diffusers UNet folder (.zip)", "unet_folder"),
             ("official ReCARE-Diffusers-UNet.pt", "official_pt"))
POLL_S = 1.5
PREVIEW_SEEDS = (0, 1)


def _official() -> dict[str, Any]:
    """The official values shown beside each parameter (TrainConfig.for_method presets)."""
    recare, esd = TrainConfig.for_method("recare"), TrainConfig.for_method("esd")
    return {"iterations": recare.stage2.iterations, "esd_iterations": esd.esd.iterations,
            "stage1_iterations": recare.stage1.esd.iterations, "ti_steps": recare.stage1.textual_inversion.steps,
            "lr": recare.stage2.learning_rate, "esd_lr": esd.esd.learning_rate, "train_method": recare.train_method,
            "seed": recare.seed, "num_images": recare.num_images}


def create_train_tab(ctx: AppContext) -> dict[str, Any]:
    """Build the Train workspace inside the current gr.Tab.

    Args:
        ctx: the shell's context (model picker, session state, run store, job runner, owner key).
    """
    tasks = [t.get("name") or t["reference_word"] for t in worldspec.mini_world_tasks()]
    off = _official()
    start = _preset(tasks[0], "recare") if tasks else _preset(None, "recare")
    c: dict[str, Any] = {}
    with gr.Row(equal_height=False):
        # ---- settings ----
        with gr.Column(scale=1, min_width=320):
            c["task"] = gr.Dropdown(
                [("this session's images and CARE-set", NO_TASK)] + [(f"mini world: {t}", t) for t in tasks],
                value=tasks[0] if tasks else NO_TASK, label="Inputs", elem_id="train-task",
                info="A mini-world task fills everything with the world's recommended settings and makes its "
                     "images and CARE-set in the job when this session has none.")
            c["method"] = gr.Radio(list(METHODS), value="recare", label="Method", elem_id="train-method")
            with gr.Row():
                c["target_prompt"] = gr.Textbox(start["target_prompt"], label="Target prompt", scale=2)
                c["reference_word"] = gr.Textbox(start["reference_word"], label="Concept to erase", scale=1)
            c["initializer_token"] = gr.Textbox(start["initializer_token"], label="Adversarial tokens start from",
                                                info="one word of the tokenizer (official: person / art / an object)")
            c["careset_file"] = gr.File(label="CARE-set (optional): careset.json or rich JSON; default: the CARE-set "
                                              "workspace's", file_types=[".json"], height=90, elem_id="train-careset")
            with gr.Accordion("Parameters", open=True):
                with gr.Row():
                    c["iterations"] = gr.Number(start["iterations"], precision=0, label="Iterations (stage 2 / ESD)",
                                                info=f"official {off['iterations']}; ESD {off['esd_iterations']}",
                                                elem_id="train-iterations")
                    c["lr"] = gr.Number(start["lr"], label="Learning rate (stage 2 / ESD)",
                                        info=f"official {off['lr']:g}; ESD {off['esd_lr']:g}", elem_id="train-lr")
                with gr.Row():
                    c["stage1_iterations"] = gr.Number(start["stage1_iterations"], precision=0,
                                                       label="Stage-1 erase iterations per round",
                                                       info=f"official {off['stage1_iterations']}",
                                                       elem_id="train-s1-iterations")
                    c["ti_steps"] = gr.Number(start["ti_steps"], precision=0, label="Textual-inversion steps per round",
                                              info=f"official {off['ti_steps']}", elem_id="train-ti-steps")
                with gr.Row():
                    c["train_method"] = gr.Dropdown(list(TRAIN_METHODS), value=start["train_method"],
                                                    label="Trained parameters", info=f"official {off['train_method']}")
                    c["seed"] = gr.Number(start["seed"], precision=0, label="Seed", info=f"official {off['seed']}")
                with gr.Row():
                    c["num_images"] = gr.Number(start["num_images"], precision=0, label="Images made for a task",
                                                info=f"when the session has none (official 500; default {off['num_images']})",
                                                elem_id="train-num-images")
                    c["preview_every"] = gr.Number(start["preview_every"], precision=0, label="Preview every N iterations",
                                                   info="0: no previews", elem_id="train-preview-every")
            c["estimate"] = gr.Markdown("", elem_id="train-estimate")
            with gr.Row():
                c["start"] = gr.Button("Start", variant="primary", elem_id="train-start")
                c["cancel"] = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
                c["resume"] = gr.Button("Resume", elem_id="train-resume")
            c["message"] = gr.Markdown("", elem_id="train-message")
        # ---- the selected run, live ----
        with gr.Column(scale=2):
            with gr.Row():
                c["run"] = gr.Dropdown([], value=None, label="Run", elem_id="train-run", scale=4, allow_custom_value=True,
                                       info="your runs (this browser's); the newest is selected after Start")
                c["refresh"] = gr.Button("Refresh", scale=1, size="sm", elem_id="train-refresh")
            c["status"] = gr.Markdown("No run selected.", elem_id="train-status")
            c["progress"] = gr.HTML("", elem_id="train-progress")
            c["loss"] = cluster_plot(placeholder_json("The loss curve appears here once training starts."),
                                     height=360, elem_id="train-loss")
            c["previews"] = gr.Gallery(label="Previews: base model | latest (rows: target prompt, CARE prompt; "
                                             "columns: seeds 0, 1)", columns=2, height="auto", object_fit="contain",
                                       preview=False, interactive=False, elem_id="train-previews")
            c["info"] = gr.JSON(visible=False)  # the poll's numbers for API clients
    with gr.Accordion("Runs", open=True):
        c["runs"] = gr.Dataframe(value=pd.DataFrame(columns=list(RUN_COLUMNS)), interactive=False,
                                 label="Your training runs (newest first)", elem_id="train-runs")
        with gr.Row():
            c["download_format"] = gr.Radio(list(DOWNLOADS), value="trained_params", label="Download as", scale=3)
            c["download"] = gr.Button("Prepare download of the selected run", scale=1, elem_id="train-download")
            c["file"] = gr.File(label="Download", interactive=False, scale=2, elem_id="train-file")
            c["delete"] = gr.Button("Delete the selected run", variant="stop", scale=1, elem_id="train-delete")
    c["timer"] = gr.Timer(POLL_S, active=False)

    # ---- wiring ------------------------------------------------------------------------------
    owner = ctx.owner
    params = [c[k] for k in ("task", "method", "target_prompt", "reference_word", "initializer_token", "careset_file",
                             "iterations", "lr", "stage1_iterations", "ti_steps", "train_method", "seed", "num_images",
                             "preview_every")]
    preset_out = [c[k] for k in ("target_prompt", "reference_word", "initializer_token", "iterations", "lr",
                                 "stage1_iterations", "ti_steps", "train_method", "seed", "num_images", "preview_every")]
    poll_out = [c["status"], c["progress"], c["loss"], c["previews"], c["info"], c["runs"], c["timer"]]
    list_out = [c["run"], c["runs"]]

    def start_run(task, method, target_prompt, reference_word, initializer_token, careset_file, iterations, lr,
                  stage1_iterations, ti_steps, train_method, seed, num_images, preview_every, model_name, session, key,
                  request: gr.Request):
        return _start(ctx, task, method, target_prompt, reference_word, initializer_token, careset_file, iterations,
                      lr, stage1_iterations, ti_steps, train_method, seed, num_images, preview_every, model_name,
                      session, key, request)

    def estimate(*args):
        return _estimate(ctx, *args)

    def poll(run_id, key, request: gr.Request):
        return poll_run(ctx, run_id, key, request)

    def cancel(run_id, key, request: gr.Request):
        return _cancel(ctx, run_id, key, request)

    def resume(run_id, key, request: gr.Request):
        return _resume(ctx, run_id, key, request)

    def list_runs(run_id, key, request: gr.Request):
        return _list(ctx, run_id, key, request)

    def delete(run_id, key, request: gr.Request):
        return _delete(ctx, run_id, key, request)

    def download(run_id, fmt, key, request: gr.Request):
        return _download(ctx, run_id, fmt, key, request)

    def reopen(key, request: gr.Request):
        return _reopen(ctx, key, request)

    for trigger in (c["task"], c["method"]):
        trigger.change(_fill_preset, [c["task"], c["method"]], preset_out, api_name=False, show_progress="hidden")
    gr.on([p.change for p in params[1:] if not isinstance(p, gr.File)] + [c["task"].change, ctx.model_name.change],
          estimate, [*params, ctx.model_name], [c["estimate"]], api_name=False, show_progress="hidden",
          trigger_mode="always_last")
    # preprocess=False: the handler checks every raw value itself (a message, not a bare "Error")
    c["start"].click(start_run, [*params, ctx.model_name, ctx.session, owner], [c["message"], *list_out, c["timer"]],
                     api_name="train_start", preprocess=False, concurrency_limit=4)
    c["timer"].tick(poll, [c["run"], owner], poll_out, api_name=False, show_progress="hidden")
    c["run"].input(poll, [c["run"], owner], poll_out, api_name=False, show_progress="hidden")
    # API twin of the poll (a script passes the run id and its owner key)
    c["status_btn"] = gr.Button(visible=False)
    c["status_btn"].click(poll, [c["run"], owner], poll_out, api_name="train_status", show_progress="hidden")
    c["cancel"].click(cancel, [c["run"], owner], [c["message"], c["timer"]], api_name="train_cancel")
    c["resume"].click(resume, [c["run"], owner], [c["message"], c["timer"]], api_name="train_resume")
    c["refresh"].click(list_runs, [c["run"], owner], list_out, api_name="train_list")
    c["delete"].click(delete, [c["run"], owner], [c["message"], *list_out], api_name="train_delete")
    c["download"].click(download, [c["run"], c["download_format"], owner], [c["file"], c["message"]],
                        api_name="train_download")
    # a reopened page finds its runs: on load (a returning browser) and when the shell gives a new key
    reopen_out = [c["run"], *poll_out]
    root = gr.context.Context.root_block
    if root is not None:
        root.load(reopen, [owner], reopen_out, api_visibility="private")
        root.load(estimate, [*params, ctx.model_name], [c["estimate"]], api_visibility="private",
                  show_progress="hidden")
    owner.change(reopen, [owner], reopen_out, api_visibility="private")
    return c


# ---------------------------------------------------------------------------------------------
# settings


def _preset(task: str | None, method: str) -> dict[str, Any]:
    """The values the parameter boxes show for a task (the world's recommended settings) or none (official)."""
    from recare.workflows import mini_world_task, task_train_config

    try:
        config = task_train_config(mini_world_task(task), method) if task and task != NO_TASK \
            else TrainConfig.for_method(method)
    except RecareError:
        config = TrainConfig.for_method(method)
    final = config.stage2 or config.esd
    s1 = config.stage1 or TrainConfig.for_method("recare").stage1
    return {"target_prompt": config.target_prompt, "reference_word": config.reference_word,
            "initializer_token": config.initializer_token, "iterations": final.iterations,
            "lr": final.learning_rate, "stage1_iterations": s1.esd.iterations, "ti_steps": s1.textual_inversion.steps,
            "train_method": config.train_method, "seed": config.seed, "num_images": config.num_images,
            "preview_every": max(1, final.iterations // 10)}


def _fill_preset(task, method):
    p = _preset(task, method if method in dict((v, k) for k, v in METHODS) else "recare")
    keep_text = task == NO_TASK  # the session's own concept: keep what the user typed
    return [gr.skip() if keep_text else p["target_prompt"], gr.skip() if keep_text else p["reference_word"],
            gr.skip() if keep_text else p["initializer_token"], p["iterations"], p["lr"], p["stage1_iterations"],
            p["ti_steps"], p["train_method"], p["seed"], p["num_images"], p["preview_every"]]


def _train_config(ctx: AppContext, task, method, target_prompt, reference_word, initializer_token, iterations, lr,
                  stage1_iterations, ti_steps, train_method, seed, num_images, model_name) -> TrainConfig:
    """The TrainConfig the boxes ask for: the method's preset (+ the task's world settings), then the boxes.

    The one override path of `python -m recare train` (`recare.workflows.training_config`).
    """
    from recare.workflows import mini_world_task, training_config

    if method not in dict((v, k) for k, v in METHODS):
        raise ConfigError(f"unknown method {str(method)[:40]!r}: use one of {[v for _, v in METHODS]}.")
    if not isinstance(model_name, str) or not model_name.strip():
        raise ConfigError("pick a model in the header first.")
    model_name = ctx.models.policy.check_name(model_name, "model")
    fields = {"model": model_name, "device": str(ctx.models.device), "train_method": train_method,
              "seed": number(seed, "the seed"), "num_images": number(num_images, "the number of images")}
    for name, value in (("target_prompt", target_prompt), ("reference_word", reference_word),
                        ("initializer_token", initializer_token)):
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{name.replace('_', ' ')} is empty.")
        fields[name] = value.strip()
    if task and task != NO_TASK and model_name != models.MINI_WORLD:
        raise ConfigError(f"a mini-world task needs the model {models.MINI_WORLD!r} (the header picks "
                          f"{model_name!r}); choose “this session's images and CARE-set” for other models.")
    config = training_config(mini_world_task(task) if task and task != NO_TASK else None, method,
                             iterations=number(iterations, "iterations"), lr=number(lr, "the learning rate", float),
                             stage1_iterations=number(stage1_iterations, "stage-1 erase iterations"),
                             ti_steps=number(ti_steps, "textual-inversion steps"), **fields)
    return dataclasses.replace(config, save_every=max(1, min(config.save_every or 50, 10)))  # a cancel loses little


def _estimate(ctx: AppContext, task, method, target_prompt, reference_word, initializer_token, careset_file,
              iterations, lr, stage1_iterations, ti_steps, train_method, seed, num_images, preview_every, model_name):
    try:
        config = _train_config(ctx, task, method, target_prompt, reference_word, initializer_token, iterations, lr,
                               stage1_iterations, ti_steps, train_method, seed, num_images, model_name)
    except RecareError as e:
        return f"Estimate: not yet ({md(e)})"
    plan = train_speed.training_plan(config)
    steps = " + ".join(f"{n} {phase_label(p, short=True)}" for p, n in plan)
    speed = train_speed.measured_speed(ctx.runs, config.model, config.device)
    seconds = train_speed.estimate_seconds(config, speed)
    if seconds is None:
        return (f"**Plan:** {steps}.  \nEstimate on **{md(config.device)}**: not measured yet for {md(config.model)} "
                "here; the first run measures it (the live ETA shows meanwhile).")
    longest = train_speed.estimate_seconds(config, speed, longest=True)
    s2 = config.stage2
    closing = (f" and the closing search all {s2.closing_rounds} rounds of {s2.closing_attempts} inversions"
               if config.stage1 is not None and s2 is not None and s2.closing_rounds else "")
    search = (f" (up to **{duration(longest)}** if stage 1's search runs all {config.stage1.max_inversions} "
              f"inversions of every round{closing})" if longest and longest > seconds else "")
    return (f"**Plan:** {steps}.  \nEstimate on **{md(config.device)}**: about **{duration(seconds)}** of training"
            f"{search} ({md(speed['source'])}; model loading, image making, probes and previews not counted).")


# ---------------------------------------------------------------------------------------------
# start, cancel, resume, list, delete, download


def _key(ctx: AppContext, stored, request) -> str:
    return owner_key(stored, request)


def _session_inputs(session: Session | None, careset_file, config: TrainConfig, task) -> dict:
    """The "inputs" section for the job: the CARE-set (upload or session) and the session's images.

    Raises a RecareError when the method needs something the session does not have and no task makes it.
    """
    from recare.careset_io import read_careset_json

    has_task = bool(task and task != NO_TASK)
    inputs: dict[str, Any] = {}
    if config.stage2 is not None:
        path = _uploaded_path(careset_file)
        if not path and session is not None and session.id and session.careset_path.is_file():
            path = str(session.careset_path)
        if path:
            careset = read_careset_json(path)
            if not careset.tokens:
                raise ConfigError("the CARE-set is empty: keep at least one CARE token (CARE-set workspace), "
                                  "or upload a careset.json that has some.")
            inputs["careset"] = careset.to_dict()
        elif not has_task:
            raise ConfigError("no CARE-set: build one in the CARE-set workspace, upload a careset.json, or pick a "
                              "mini-world task (its CARE-set is made in the job).")
    if config.stage1 is not None:
        images = [str(p) for p in (session.images if session is not None and session.id else []) if Path(p).is_file()]
        if images:
            if len(images) < config.stage1.n_iterations:
                raise ConfigError(f"stage 1 needs at least {config.stage1.n_iterations} target images (one per round); "
                                  f"this session has {len(images)}.")
            inputs["images"] = images
        elif not has_task:
            raise ConfigError("no target images: generate or upload some in the Generate workspace, or pick a "
                              "mini-world task (its images are made in the job).")
    return inputs


def _uploaded_path(payload) -> str | None:
    """The path of an uploaded file (a raw gr.File payload); only files in Gradio's upload cache are read."""
    from gradio import utils

    if not payload:
        return None
    path = payload.get("path") if isinstance(payload, dict) else payload if isinstance(payload, str) else None
    if not isinstance(path, str) or not path:
        raise ConfigError("the uploaded CARE-set could not be read; upload it again.")
    resolved, cache = Path(path).resolve(), Path(utils.get_upload_folder()).resolve()
    if cache not in resolved.parents or not resolved.is_file():
        raise ConfigError("the uploaded CARE-set is not an uploaded file; upload it again.")
    return str(resolved)


def _preview_config(config: TrainConfig, inputs: dict, task, every: int) -> dict | None:
    """Preview prompts: the target prompt and the first CARE prompt (the CARE-set's, else the task's)."""
    if every <= 0:
        return None
    prompts = [config.target_prompt]
    careset = inputs.get("careset") or {}
    retain = next((v for k, v in careset.items() if not k.endswith("_care_word") and v), None)
    if retain:
        prompts.append(retain[0])
    elif task and task != NO_TASK:
        from recare.workflows import mini_world_task

        care = mini_world_task(task).get("care_prompts") or {}
        first = next((v for v in care.values() if v), None)
        if first:
            prompts.append(first[0])
    gen = worldspec.generate_defaults() if config.model == models.MINI_WORLD else None
    return {"prompts": prompts, "seeds": list(PREVIEW_SEEDS), "every": every, "steps": gen.steps if gen else 25,
            "guidance": gen.guidance if gen else 7.5, "height": gen.height if gen else None,
            "width": gen.width if gen else None}


def _start(ctx: AppContext, task, method, target_prompt, reference_word, initializer_token, careset_file, iterations,
           lr, stage1_iterations, ti_steps, train_method, seed, num_images, preview_every, model_name,
           session: Session | None, stored_key, request: gr.Request | None = None):
    """Check everything, then submit the job. Returns (message, run dropdown, runs table, timer)."""
    from recare.jobs.requests import TrainRequest, submit_requests

    try:
        owner = _key(ctx, stored_key, request)
        if task is not None and not isinstance(task, str):
            raise ConfigError(f"the task must be a mini-world task's name (text), not {type(task).__name__}.")
        config = _train_config(ctx, task, method, target_prompt, reference_word, initializer_token, iterations, lr,
                               stage1_iterations, ti_steps, train_method, seed, num_images, model_name)
        inputs = _session_inputs(session, careset_file, config, task)
        preview = _preview_config(config, inputs, task, number(preview_every, "preview every"))
        job = TrainRequest(config=config, task=task if task and task != NO_TASK else None,
                           images=tuple(inputs.get("images") or ()), careset=inputs.get("careset"), preview=preview)
        (run,) = submit_requests(ctx.jobs, [job], submitter(ctx, owner, request), device=config.device)
    except RecareError as e:
        return problem(f"Not started: {no_paths(ctx, e)}"), gr.skip(), gr.skip(), gr.skip()
    position = ctx.jobs.queue_position(run.id)
    wait = f" Waiting: position {position} in the queue." if position and position > 1 else ""
    choices, table = runs_view(ctx, owner)
    return (ok(f"Started **{run.id}**.{wait}"), gr.Dropdown(choices=choices, value=run.id), table,
            gr.Timer(active=True))


def _cancel(ctx: AppContext, run_id, stored_key, request=None):
    try:
        message = ctx.jobs.cancel(checked_run_id(run_id), owner=_key(ctx, stored_key, request))
    except RecareError as e:
        return problem(no_paths(ctx, e)), gr.skip()
    if message.startswith("Nothing to cancel") or message.startswith("Cancel of"):
        return problem(message), gr.Timer(active=True)
    return ok(message + " It can be resumed."), gr.Timer(active=True)


def _resume(ctx: AppContext, run_id, stored_key, request=None):
    try:
        run = ctx.jobs.resume(checked_run_id(run_id), owner=_key(ctx, stored_key, request), client=client_key(request))
    except RecareError as e:
        return problem(no_paths(ctx, e)), gr.skip()
    return ok(f"Resumed **{run.id}** from its saved state."), gr.Timer(active=True)


def _list(ctx: AppContext, run_id, stored_key, request=None):
    try:
        owner = _key(ctx, stored_key, request)
    except RecareError as e:
        problem(str(e))
        return gr.skip(), gr.skip()
    choices, table = runs_view(ctx, owner)
    ids = [v for _, v in choices]
    return gr.Dropdown(choices=choices, value=run_id if run_id in ids else (ids[0] if ids else None)), table


def _delete(ctx: AppContext, run_id, stored_key, request=None):
    try:
        owner = _key(ctx, stored_key, request)
        run_id = checked_run_id(run_id)
        ctx.runs.delete(run_id, owner)
    except RecareError as e:
        return problem(str(e)), gr.skip(), gr.skip()
    choices, table = runs_view(ctx, owner)
    return ok(f"Deleted {run_id}."), gr.Dropdown(choices=choices, value=choices[0][1] if choices else None), table


def _download(ctx: AppContext, run_id, fmt, stored_key, request=None):
    """The selected run's weights in the format asked for, exported from the trained parameters when missing."""
    try:
        run = ctx.runs.get(checked_run_id(run_id), _key(ctx, stored_key, request))
        if run.bundled or run.kind != "train":
            raise RunError(f"run {run.id} is not one of your training runs; only those have weights to download.")
        if run.status().get("state") != DONE:
            raise RunError(f"run {run.id} has not finished; downloads are ready when it is done.")
        path = _export(run, fmt)
    except RecareError as e:
        return gr.skip(), problem(no_paths(ctx, e))
    return served(path), ok(f"{Path(path).name} of {run.id} ({human_bytes(Path(path).stat().st_size)}).")


def _export(run, fmt) -> Path:
    """The file to hand out (`recare.train.downloads.weights_file`: a full UNet is exported once, then served)."""
    from recare.train.downloads import weights_file

    if fmt not in dict((v, k) for k, v in DOWNLOADS):
        raise ConfigError(f"unknown download format {str(fmt)[:40]!r}: use one of {[v for _, v in DOWNLOADS]}.")
    return weights_file(run.path, fmt)


def _reopen(ctx: AppContext, stored_key, request=None):
    """On page load: list the browser's runs and select the active one (else the newest)."""
    try:
        owner = _key(ctx, stored_key, request)
    except RecareError:
        return [gr.skip()] * 8
    choices, table = runs_view(ctx, owner)
    ids = [v for _, v in choices]
    active = next((r for r in ids if ctx.runs.get(r, owner).status().get("state") in (QUEUED, RUNNING)), None)
    selected = active or (ids[0] if ids else None)
    view = list(poll_run(ctx, selected, stored_key, request)) if selected else [gr.skip()] * 7
    view[5], view[6] = table, view[6] if selected else gr.Timer(active=False)
    return [gr.Dropdown(choices=choices, value=selected), *view]

