"""Generate workspace: make the target images (or upload them); they feed the CARE-set.

Layout first, event wiring last. Every callback works on the session in gr.State and calls the
library (`recare.generate`, `recare.safety` through ui.image_set).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import gradio as gr

from recare.config import GenerateConfig
from recare.errors import RecareError
from recare.generate import ImageInputError, check_generate_limits, iter_generation, load_images
from recare.models import MINI_WORLD, ModelLoadError
from recare.progress import CancelToken
from recare import worldspec
from ui.common import AppContext, gradio_progress, md, number, ok, problem
from ui.image_set import add_images, gallery_items, summary_line, write_image_manifest
from ui.session import Session, ensure_session

MAX_IMAGES = 64  # the slider's end; RECARE_MAX_GENERATE_IMAGES can only lower it in the app
WAIT_FOR_CANCELLED_S = 30.0  # at most this long a new run waits for a cancelled run's last batch


def create_generate_tab(ctx: AppContext) -> dict[str, Any]:
    """Build the Generate workspace inside the current gr.Tab (mini-world defaults when installed).

    Args:
        ctx: the shell's context (model cache, session state, model picker).
    """
    d = worldspec.generate_defaults()
    c: dict[str, Any] = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300):
            c["prompt"] = gr.Textbox(label="Prompt", value=d.prompt, lines=2, elem_id="gen-prompt",
                                     info="What the target images show; the concept you will erase.")
            tasks = worldspec.mini_world_tasks()
            if tasks:
                gr.Examples([[t["target_prompt"]] for t in tasks], [c["prompt"]], label="Mini-world tasks")
            with gr.Row():
                c["num_images"] = gr.Slider(0, MAX_IMAGES, value=d.num_images, step=1, label="Images", elem_id="gen-num")
                c["seed"] = gr.Number(value=d.base_seed, precision=0, label="Base seed",
                                      info="image i uses seed base + i")
            with gr.Row():
                c["steps"] = gr.Slider(1, 100, value=d.steps, step=1, label="Steps", elem_id="gen-steps")
                c["guidance"] = gr.Slider(0, 15, value=d.guidance, step=0.5, label="Guidance")
            with gr.Row():
                c["generate"] = gr.Button("Generate", variant="primary", elem_id="gen-run")
                c["cancel"] = gr.Button("Cancel", variant="stop", elem_id="gen-cancel")
            with gr.Accordion("…or upload your own images", open=False):
                c["upload"] = gr.File(label="Images or a .zip of images", file_count="multiple",
                                      file_types=[".png", ".jpg", ".jpeg", ".webp", ".zip"], elem_id="gen-upload")
                c["use_upload"] = gr.Button("Use these images", elem_id="gen-use-upload")
            with gr.Accordion("Safety", open=False):
                gr.Markdown(
                    "Images flagged by the NudeNet detector (exposed-body labels ≥ 0.75, as in the paper) are "
                    "**blurred by default**. Select an image and press *Reveal / hide* to see it."
                )
                c["show_unchecked"] = gr.Checkbox(
                    False, label="Show images the detector could not check (only matters when NudeNet is unavailable)")
        with gr.Column(scale=2):
            c["status"] = gr.Markdown("No images yet: generate some or upload images / a zip.", elem_id="gen-status")
            c["gallery"] = gr.Gallery(label="Target images", columns=4, height=520, object_fit="contain",
                                      preview=False, elem_id="gen-gallery", interactive=False)
            with gr.Row():
                c["selected"] = gr.Number(value=None, precision=0, label="Image # (click one in the gallery)", scale=1, minimum=0)
                c["reveal"] = gr.Button("Reveal / hide selected image", scale=1, elem_id="gen-reveal")

    # ---- wiring ------------------------------------------------------------------------------
    inputs = [c["prompt"], c["num_images"], c["seed"], c["steps"], c["guidance"], ctx.model_name, ctx.session]
    outputs = [ctx.session, c["gallery"], c["status"]]

    def generate(prompt, num_images, seed, steps, guidance, model_name, session, progress=gr.Progress()):
        # Size and batch size come from the mini world's spec only when generating on the mini world.
        base = d if isinstance(model_name, str) and model_name.strip() == MINI_WORLD else GenerateConfig()
        yield from _generate(ctx, base, prompt, num_images, seed, steps, guidance, model_name, session, progress)

    # preprocess=False: the handler checks every raw value itself (a non-number in a number box is a
    # message, not a bare "Error" from the component's own conversion)
    c["generate_event"] = c["generate"].click(generate, inputs, outputs, api_name="generate", concurrency_limit=2,
                                              preprocess=False)
    c["cancel"].click(_cancelled, [ctx.session], [c["status"]], cancels=[c["generate_event"]], api_name="cancel")
    c["use_upload"].click(lambda files, session: _use_upload(ctx, files, session), [c["upload"], ctx.session], outputs,
                          api_name="upload_images")
    c["gallery"].select(_select, None, [c["selected"]], api_name=False)
    c["reveal"].click(_toggle_reveal, [c["selected"], ctx.session], outputs, api_name="toggle_reveal", preprocess=False)
    c["show_unchecked"].input(_show_unchecked, [c["show_unchecked"], ctx.session], outputs, api_name="show_unchecked")
    return c


def _generate(ctx: AppContext, base: GenerateConfig, prompt, num_images, seed, steps, guidance, model_name, session: Session | None,
              progress):
    """Generator: yields (session, gallery, status) after each batch of `recare.generate.iter_generation`.

    Everything is checked before the session changes (settings, limits, the model), and the old
    image set is replaced only when the first new batch arrives, so a request that fails keeps
    the images the session had. Cancel (`_cancelled`) bumps `session.run_id`, so a batch that
    finishes after it is dropped, and sets this run's cancel token, so the library starts no
    further batch.
    """
    session = ensure_session(session)
    try:
        config = dataclasses.replace(
            base, prompt=("" if prompt is None else prompt).strip() if isinstance(prompt, (str, type(None))) else prompt,
            num_images=number(num_images, "the number of images"), base_seed=number(seed, "the seed"),
            steps=number(steps, "steps"), guidance=number(guidance, "guidance", float))
        config.validate()
        limit = min(MAX_IMAGES, ctx.limits.generate_images)
        if config.num_images > limit:
            raise RecareError(f"at most {limit} images per request here (asked for {config.num_images:,}).")
        check_generate_limits(config, ctx.limits)
    except RecareError as e:
        yield session, gr.skip(), problem(str(e))
        return
    total = config.num_images
    yield session, gr.skip(), f"Generating {total} image{'s' if total != 1 else ''}: loading {md(model_name)}…"
    try:
        progress(0, desc=f"loading {model_name}")
        pipe = ctx.models.pipeline(model_name)
    except ModelLoadError as e:
        yield session, gr.skip(), problem(f"Could not load the model: {e}")
        return
    if session.active_run:  # a cancelled run is finishing the batch it had started: say so, then wait
        yield session, gr.skip(), "Waiting for the cancelled run to finish its last batch…"
        _wait_for_previous_run(session)
    with session.lock:
        session.run_id += 1
        run_id = session.active_run = session.run_id
    cancel = CancelToken(path=_cancel_file(session, run_id))
    for stale in session.folder.glob(".cancel-generate-*"):  # left by Cancel pressed while nothing ran
        if stale != cancel.path:
            stale.unlink(missing_ok=True)
    source = f"“{config.prompt}” · {model_name} · {config.steps} steps · guidance {config.guidance}"
    started = time.perf_counter()
    try:
        for batch in iter_generation(pipe, config, progress=gradio_progress(progress), cancel=cancel,
                                     limits=ctx.limits):
            if not add_images(session, batch.images, batch.seeds, run_id=run_id, replace=batch.start == 0,
                              source=source):
                return  # cancelled (or superseded) while this batch ran: keep what was there
            write_image_manifest(session, pipe, config, model=model_name, seconds=time.perf_counter() - started,
                                 run_id=run_id)
            done = len(session.images)
            status = summary_line(session) if done == total else f"Generated {done} of {total}… " + summary_line(session)
            yield session, gallery_items(session), status
        if cancel.is_set():
            return  # Cancel already answered with the count kept
    except RecareError as e:  # nothing of the old set is lost unless a new batch had replaced it
        yield session, gr.skip(), problem(f"Generation stopped: {e}")
        return
    finally:
        cancel.path.unlink(missing_ok=True)
        with session.lock:
            if session.active_run == run_id:
                session.active_run = 0
    yield session, gallery_items(session), ok(f"Done. {summary_line(session)}")


def _wait_for_previous_run(session: Session, timeout: float = WAIT_FOR_CANCELLED_S) -> None:
    """Wait (at most `timeout` seconds) until no generation of this session is running.

    Only to spare the CPU two runs at once: going on earlier is safe, since a cancelled run's
    late batch is dropped anyway (its run id is no longer the session's).
    """
    deadline = time.monotonic() + timeout
    while session.active_run and time.monotonic() < deadline:
        time.sleep(0.05)


def _cancel_file(session: Session, run_id: int) -> Path:
    """The file whose existence cancels generation run `run_id` of this session (a CancelToken's path)."""
    return session.folder / f".cancel-generate-{run_id}"


def _cancelled(session: Session | None) -> str:
    if session is None or not session.id:
        return "Nothing to cancel."
    with session.lock:  # the running generator drops its in-flight batch and starts no other
        CancelToken(path=_cancel_file(session, session.run_id)).cancel()
        session.run_id += 1
        n = len(session.images)
    return f"Cancelled. The {n} image{'s' if n != 1 else ''} made so far are kept."


def _use_upload(ctx: AppContext, files, session: Session | None):
    session = ensure_session(session)
    paths = [f if isinstance(f, str) else getattr(f, "name", f) for f in (files or [])]
    if not paths:
        return session, gr.skip(), problem("No files uploaded: drop images or a .zip of images first.")
    try:
        images = load_images(paths, limits=ctx.limits)  # every image checked before the session changes
    except ImageInputError as e:
        return session, gr.skip(), problem(f"Could not use the upload: {e}")
    with session.lock:
        session.run_id += 1  # a generation still running must not add its batches to this set
    add_images(session, images, [None] * len(images), replace=True,
               source=f"uploaded, {len(paths)} file{'s' if len(paths) != 1 else ''}")
    return session, gallery_items(session), ok(summary_line(session))


def _select(evt: gr.SelectData):
    return evt.index if isinstance(evt.index, int) else (evt.index[0] if evt.index else None)


def _toggle_reveal(index, session: Session | None):
    session = ensure_session(session)
    try:
        index = None if index is None else number(index, "the image number")
    except RecareError as e:
        return session, gr.skip(), problem(str(e))
    if index is None or not (0 <= int(index) < len(session.images)):
        msg = "Select an image in the gallery first." if session.images else "There are no images to reveal yet."
        return session, gr.skip(), problem(msg)
    i = int(index)
    if i in session.revealed:
        session.revealed.discard(i)
    elif session.is_hidden(i):
        session.revealed.add(i)
    else:
        return session, gr.skip(), f"Image #{i} is not hidden."
    return session, gallery_items(session), summary_line(session)


def _show_unchecked(value: bool, session: Session | None):
    session = ensure_session(session)
    session.show_unchecked = bool(value)
    return session, gallery_items(session), summary_line(session)
