"""The Train workspace's live view of a run: the status line, the progress bar with stage 1's token
strengths (`recare.train.stage1_probe`) under it, the loss plot, the previews, the runs table.

Read-only over the run folder (status.json, metrics.jsonl, previews/); `poll` is the Timer's handler.
"""

from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from recare.config import TrainConfig
from recare.errors import RecareError, RunError
from recare.limits import human_bytes
from recare.runs import CANCELLED, DONE, QUEUED, RUNNING
from recare.train import speed as train_speed
from recare.train.preview import BASE_FILE, PREVIEW_DIR, read_previews
from recare.train.stage1_probe import PROBE_STAGE, probe_rows
from ui.common import AppContext, md, no_paths, owner_key, served
from ui.figures import figure_json, loss_figure, placeholder_json

RUN_COLUMNS = ("run", "state", "method", "concept", "iterations", "size", "created")


def checked_run_id(run_id) -> str:
    if run_id is not None and not isinstance(run_id, str):
        raise RunError(f"the run must be a run id (text), not {type(run_id).__name__} {str(run_id)[:40]!r}.")
    if not run_id or not run_id.strip():
        raise RunError("no run selected: start one or pick one in the Run list.")
    return run_id.strip()


def runs_view(ctx: AppContext, owner: str):
    """(dropdown choices, table) of `owner`'s training runs, newest first."""
    choices, rows = [], []
    for run in ctx.runs.list(owner=owner, kind="train"):
        if run.bundled:
            continue
        try:
            status, settings = run.status(), run.config()
        except RecareError:
            continue
        train = settings.get("train") or {}
        try:
            plan = train_speed.training_plan(TrainConfig.from_dict(train))
        except (RecareError, TypeError):
            plan = []
        concept = train.get("reference_word", "")
        # no state in the label: a choice list is not refreshed by every poll, so a state there goes stale
        choices.append((f"{run.id} · {train.get('method', '')} · {concept}", run.id))
        rows.append([run.id, status.get("state"), train.get("method", ""),
                     f"{concept} ({settings['task']})" if settings.get("task") else concept,
                     " + ".join(f"{n} {phase_label(p, short=True)}" for p, n in plan),
                     human_bytes(run.size_bytes()), str(status.get("created") or "")[:19].replace("T", " ")])
    return choices, pd.DataFrame(rows, columns=list(RUN_COLUMNS))


def phase_label(phase: str, short: bool = False) -> str:
    """"stage1.erase[2]" -> "stage 1 round 2: erase"; short: "erase it (round 2)"."""
    import re

    m = re.fullmatch(r"stage1\.(erase|textual_inversion)\[(\d+)\]", phase)
    if m:
        what = "erase" if m.group(1) == "erase" else "textual inversion"
        return (f"{'erase it' if what == 'erase' else 'TI steps'} (round {m.group(2)})" if short
                else f"stage 1 round {m.group(2)}: {what}")
    m = re.fullmatch(r"closing\.(erase|textual_inversion)\[(\d+)\]", phase)
    if m:
        what = "stage 2 goes on" if m.group(1) == "erase" else "textual inversion against the trained UNet"
        return (f"{'stage-2 it' if m.group(1) == 'erase' else 'TI steps'} (closing {m.group(2)})" if short
                else f"closing round {m.group(2)}: {what}")
    if phase == "stage2":
        return "stage-2 it" if short else "stage 2 (ReCARE)"
    if phase == "esd":
        return "ESD it" if short else "ESD"
    return phase


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def current_phase(rows: list[dict], plan: list[tuple[str, int]], status: dict) -> tuple[str, int]:
    """(phase, steps done in the whole plan) from the metrics rows: each loop's rows end at its last step. A
    loop that repeats the one just finished (another inversion of a stage-1 round's search, which the plan
    cannot foresee) moves nothing: the bar waits there instead of jumping into the next phase."""
    done, index = 0, 0
    stage_of = [p.split("[")[0] for p, _ in plan]
    for row in rows:
        if 0 < index < len(plan) and row.get("stage") == stage_of[index - 1] != stage_of[index]:
            continue
        while index < len(plan) and row.get("stage") != stage_of[index]:
            done += plan[index][1]
            index += 1
        if index >= len(plan):
            break
        if row.get("step") == plan[index][1]:
            done += plan[index][1]
            index += 1
    progress = status.get("progress") or {}
    current = plan[index][0] if index < len(plan) else (plan[-1][0] if plan else "")
    step = int(progress.get("step") or 0) if progress.get("stage") == current.split("[")[0] else 0
    return current, min(done + step, sum(n for _, n in plan))


def json_safe(value):
    """`value` with whole numbers beyond what JSON readers keep exactly (2**53) written as text."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
        return str(value)
    return value


def poll_run(ctx: AppContext, run_id, stored_key, request=None):
    """(status, progress bar, loss plot, previews, info, runs table, timer) of the selected run."""
    try:
        owner = owner_key(stored_key, request)
        run = ctx.runs.get(checked_run_id(run_id), owner)
        status, settings = run.status(), run.config()
    except RecareError as e:
        text = no_paths(ctx, e)
        return md(text), "", gr.skip(), gr.skip(), {"error": text}, gr.skip(), gr.Timer(active=False)
    state = status.get("state")
    rows = run.read_metrics()
    probes = probe_rows(rows)
    rows = [r for r in rows if r.get("stage") != PROBE_STAGE]   # the loss, the plan and the ETA: loop steps only
    try:
        config = TrainConfig.from_dict(settings.get("train") or {})
        plan = train_speed.training_plan(config)
    except RecareError:
        config, plan = None, []
    phase, done = current_phase(rows, plan, status)
    total = sum(n for _, n in plan) or 1
    if state == DONE:   # a search that ended early (the closing search, stage 1's) skips planned loops
        done = total
    progress = status.get("progress") or {}
    position = ctx.jobs.queue_position(run.id)
    if state == QUEUED:
        line = f"**{run.id}** · queued" + (f" · position **{position}** in the queue" if position else "")
        if status.get("note"):
            line += f" · {md(status['note'])}"
    elif state == RUNNING:
        stage = progress.get("stage")
        if stage in (None, "generate", "vocabulary", "careset"):
            what = {"generate": "making the task's target images", "vocabulary": "encoding the vocabulary",
                    "careset": "building the CARE-set"}.get(stage, "loading the model")
            line = f"**{run.id}** · running · {what}"
        else:
            line = (f"**{run.id}** · running · **{phase_label(phase)}** · step {progress.get('step', 0)} of "
                    f"{progress.get('total', '?')}")
    elif state == DONE:
        seconds = (status.get("result") or {}).get("seconds")
        line = f"**{run.id}** · ✓ done" + (f" in {duration(seconds)}" if isinstance(seconds, (int, float)) else "")
    elif state == CANCELLED:
        line = f"**{run.id}** · cancelled at {phase_label(phase)}; press **Resume** to continue from its saved state"
    else:
        error = no_paths(ctx, status.get("error") or "unknown error")
        line = f"**{run.id}** · ⚠ failed: {md(error)}" + (" (resumable)" if status.get("resumable") else "")
    fraction = 1.0 if state == DONE else done / total
    eta = ""
    if state == RUNNING and rows:
        timed = [r.get("seconds") for r in rows[-20:] if isinstance(r.get("seconds"), (int, float))]
        if timed and done < total:
            eta = f" · about {duration((total - done) * sum(timed) / len(timed))} left"
    bar = (f'<div style="display:flex;gap:10px;align-items:center"><progress value="{fraction:.4f}" max="1" '
           f'style="flex:1;height:14px"></progress><span>{100 * fraction:.0f}% · {done} / {total} steps'
           f'{html.escape(eta)}</span></div>') + probe_table(probes, config, (status.get("result") or {}))
    previews = read_previews(run.path)
    gallery = []
    base = run.path / PREVIEW_DIR / BASE_FILE
    latest = next((p for p in reversed(previews) if p.get("phase") != "base"), None)
    if base.is_file():
        gallery.append((served(base), "base model"))
    if latest and (run.path / PREVIEW_DIR / latest["file"]).is_file():
        gallery.append((served(run.path / PREVIEW_DIR / latest["file"]),
                        f"{phase_label(str(latest.get('phase')))} · iteration {latest.get('step')}"))
    info = {"id": run.id, "state": state, "phase": phase, "stage": progress.get("stage"), "step": progress.get("step"),
            "steps_done": done, "steps_total": total, "queue_position": position, "loss_points": len(rows),
            "previews": len([p for p in previews if p.get("phase") != "base"]),
            "error": no_paths(ctx, status["error"]) if status.get("error") else None,
            "resumable": status.get("resumable"), "result": status.get("result"), "note": status.get("note"),
            "stage1_probe": [{"round": r.get("step"), "original": r.get("original"), "erased": r.get("erased"),
                              "seeds": r.get("seeds"), "norm": r.get("norm"),
                              "joins_h": r.get("joins_h", 1.0) != 0} for r in probes]}
    info = json_safe(info)  # a run stored with numbers past 2**53 (before they were bounded) still shows
    active = state in (QUEUED, RUNNING)
    figure = figure_json(loss_figure(rows, title=f"{run.id} · {config.method if config else ''}")) if rows \
        else placeholder_json("The loss curve appears here once training starts.")
    table = gr.skip() if active else runs_view(ctx, owner)[1]  # a run that ended changes the list
    return line, bar, figure, gallery, info, table, gr.Timer(active=active)


def probe_table(probes: list[dict], config: TrainConfig | None, result: dict) -> str:
    """HTML: each stage-1 round's token and how often it draws the target on the original and the erased model."""
    if not probes:
        skipped = result.get("stage1_probe_skipped")
        return f'<p id="train-probe-skipped">{html.escape(str(skipped))}</p>' if skipped else ""
    from recare.train.search import round_placeholder

    template = config.stage1.textual_inversion.placeholder if config and config.stage1 else "<v*>"
    concept = config.reference_word if config else "the target"
    body = []
    for row in probes:
        r = int(row.get("step") or 0)
        tries = int(row.get("inversions") or 1)
        best_of = f" (strongest of {tries} inversions)" if tries > 1 else ""
        closing = int(row.get("closing") or 0)   # a closing round: its "erased" model is stage 2's trained UNet
        label = f"closing round {closing} (the trained model)" if closing else f"round {r}"
        cells = [label, html.escape(round_placeholder(template, r - 1)) + best_of,
                 *[f"{100 * v:.0f}%" if isinstance(v, (int, float)) else "–" for v in (row.get("original"),
                                                                                        row.get("erased"))],
                 f"{row.get('norm'):.2f}" if isinstance(row.get("norm"), (int, float)) else "–",
                 ("no: the search ends" if closing else "no (too weak)") if row.get("joins_h") == 0 else "yes"]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    closing_note = ("; a closing round searches against the model stage 2 trained"
                    if any(row.get("closing") for row in probes) else "")
    seeds = probes[-1].get("seeds")
    seeds = f"{seeds:.0f}" if isinstance(seeds, (int, float)) else "?"
    return (f'<table id="train-probe" style="margin-top:6px"><caption style="text-align:left">Stage 1 as a search: '
            f'how often each round\'s token draws {html.escape(concept)} ({seeds} seeds per model{closing_note})</caption>'
            '<tr><th>round</th><th>token</th><th>original model</th><th>erased model</th><th>norm</th>'
            '<th>in stage 2\'s H</th></tr>'
            + "".join(body) + "</table>")
