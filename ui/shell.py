"""The app shell: header with the model picker, one tab per workspace, per-session state.

Workspaces plug in through the tab registry `TABS`: each entry names a tab and the function
that builds it inside a `gr.Tab` and returns its components; a new workspace is one more entry.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from recare import models
from recare.errors import RunError
from recare.limits import Limits
from recare.runs import runs_root
from ui.careset_tab import create_careset_tab
from ui.cluster_plot import plotly_js_path
from ui.common import AppContext, md, new_browser_key, ok, owner_key, problem
from ui.generate_tab import create_generate_tab
from ui.compare_tab import create_compare_tab
from ui.train_tab import create_train_tab
from ui.session import close_session, max_session_age_s, new_session, sweep_sessions, workspace_root


@dataclasses.dataclass(frozen=True)
class TabSpec:
    """One workspace: its title, the key its components are stored under, and its builder."""

    title: str
    key: str
    build: Callable[[AppContext], dict[str, Any]]


TABS: tuple[TabSpec, ...] = (
    TabSpec("1 · Generate", "generate", create_generate_tab),
    TabSpec("2 · CARE-set", "careset", create_careset_tab),
    TabSpec("3 · Train", "train", create_train_tab),
    TabSpec("4 · Compare", "compare", create_compare_tab),
)

MODEL_CHOICES = (models.MINI_WORLD, models.DEFAULT_HUB_MODEL)

CSS = """
.gradio-container { max-width: 1400px !important; }
#recare-header h1 { margin-bottom: 0; }
#recare-header p { margin-top: 2px; color: var(--body-text-color-subdued); }
#careset-plot { border: 1px solid var(--border-color-primary); border-radius: 8px; background: white; }
#careset-final textarea { font-family: var(--font-mono); }
.recare-guide p, .recare-guide { font-size: 13px; line-height: 1.3; margin: 0; min-height: 2.6em; }
#compare-grid img, #train-previews img { image-rendering: pixelated; }
#demo-banner h3 { margin: 0; } #model-status p { margin: 0; }
#demo-headline table { font-size: 13px; margin: 0; } #demo-headline th, #demo-headline td { padding: 2px 8px; }
"""


def create_app(model: str = models.MINI_WORLD, device: str = "auto", workspace: str | Path | None = None,
               tabs: tuple[TabSpec, ...] = TABS, runs_dir: str | Path | None = None,
               policy: models.ModelPolicy | None = None, limits: Limits | None = None,
               demo_dir: str | Path | None = None) -> gr.Blocks:
    """Build the Gradio app (not launched). Launch it with `demo.queue().launch(**launch_kwargs(workspace))`.

    Args:
        model: the model picked when a page opens ("mini-world", a hub id or a local diffusers folder).
        device: "auto" or a torch device for every model.
        workspace: root of the per-session folders; default $RECARE_WORKSPACE or a temp dir.
        tabs: the workspaces to show (default: the registry TABS).
        runs_dir: the run store's folder; default $RECARE_HOME/runs or ~/.cache/recare/runs.
        policy: which model and encoder names visitors may load (`recare.models.ModelPolicy`); a
            public deployment passes `ModelPolicy.public(allowed_dirs)`. Default: any name (local use).
        limits: resource limits for every request (default `Limits.from_env()`).
        demo_dir: a reviewer-demo bundle (`recare.demo`, e.g. the repository's assets/demo): its results
            are read-only runs every browser sees, and on the mini world the app opens on Compare
            with them drawn. None or a folder without a bundle: no demo.
    """
    from recare.demo import bundled_runs
    from recare.jobs import JobRunner
    from recare.model_cache import ModelCache
    from recare.runs import RunStore

    root = Path(workspace).expanduser().resolve() if workspace is not None else workspace_root()
    root.mkdir(parents=True, exist_ok=True)
    sweep_sessions(root, max_session_age_s())
    policy = policy or models.LOCAL_USE
    limits = limits or Limits.from_env()
    cache = ModelCache(device=device, policy=policy)
    store = RunStore(runs_dir, bundled=bundled_runs(demo_dir), limits=limits)
    runner = JobRunner(store)
    runner.recover()  # runs left RUNNING by a crashed app read FAILED (resumable); QUEUED ones start
    with gr.Blocks(title="ReCARE Studio", delete_cache=(3600, 6 * 3600), analytics_enabled=False) as demo:
        session = gr.State(new_session(root), delete_callback=close_session)
        # this browser's key for its runs; the secret is kept with the runs, so keys survive restarts
        owner = gr.BrowserState("", storage_key="recare-owner", secret=browser_secret(store.root))
        with gr.Row(elem_id="recare-header", equal_height=True):
            with gr.Column(scale=3):
                gr.Markdown(
                    "# ReCARE Studio\n"
                    "Erase a concept from a text-to-image model while keeping the benign concepts that co-occur "
                    "with it (the **CARE-set**), after *ReCARE* (ICLR 2026)."
                )
            with gr.Column(scale=2):
                with gr.Row():
                    model_name = gr.Dropdown(
                        choices=list(dict.fromkeys([model, *MODEL_CHOICES])), value=model, allow_custom_value=True,
                        label="Model", info="mini-world (bundled, offline) or a hub id" if policy.public_mode
                        else "mini-world (bundled, offline), a hub id, or a local diffusers folder",
                        elem_id="model-name", scale=3)
                    load = gr.Button("Load", scale=1, elem_id="model-load")
                model_status = gr.Markdown(f"Device: **{cache.device}**", elem_id="model-status")
        ctx = AppContext(models=cache, session=session, model_name=model_name, runs=store, jobs=runner, owner=owner,
                         limits=limits)
        # a fresh start on the mini world with a demo bundle opens on Compare, its results drawn
        opening = "compare" if store.bundled and model == models.MINI_WORLD and "compare" in {t.key for t in tabs} \
            else None
        with gr.Tabs(selected=opening):
            for spec in tabs:
                with gr.Tab(spec.title, id=spec.key):
                    for name, component in spec.build(ctx).items():
                        ctx.components[f"{spec.key}.{name}"] = component

        def load_model(name: str) -> str:
            try:
                cache.pipeline(name)
            except models.ModelLoadError as e:
                return problem(f"Could not load the model: {e}") + f"  \nDevice: **{cache.device}**"
            return ok(f"Loaded **{md(name)}** on **{cache.device}**.")

        load.click(load_model, [model_name], [model_status], api_name="load_model")
        demo.load(ensure_browser_key, [owner], [owner], api_visibility="private")
    return demo


def ensure_browser_key(stored: str | None) -> str:
    """The browser's key for its runs: the one it keeps, or a new random one on its first visit.

    Args:
        stored: the gr.BrowserState value ("" on a first visit).
    """
    try:
        return owner_key(stored)
    except RunError:
        return new_browser_key()


def browser_secret(runs_root: Path) -> str:
    """The key that encrypts browser keys in localStorage, created once beside the runs.

    gr.BrowserState's default secret is new at every start, which would make every browser lose
    its runs when the app restarts.

    Args:
        runs_root: the run store's folder (the secret lives in `.browser-state-secret` there).
    """
    path = Path(runs_root) / ".browser-state-secret"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another process may be writing it right now
            secret = path.read_text(encoding="utf-8").strip()
            if secret:
                return secret
            time.sleep(0.02)
        raise RunError(f"{path} is empty; delete it and restart the app.") from None
    secret = secrets.token_urlsafe(24)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(secret + "\n")
    return secret


def launch_kwargs(workspace: str | Path | None = None, runs_dir: str | Path | None = None,
                  limits: Limits | None = None) -> dict[str, Any]:
    """Arguments for `demo.launch`: what may be served, the upload size limit, theme and CSS.

    The only allowed path is plotly.min.js. Session folders and run folders are never served as
    folders: a handler hands Gradio each file it shows (`ui.common.served`), and Gradio serves
    that copy from its cache under a folder named by a keyed hash of the bytes, so one file's URL
    leads to no other file. The workspace root and the runs folder are also blocked outright (a
    second fence, should a handler ever return one of their paths).

    Args:
        workspace: the same root given to create_app (default $RECARE_WORKSPACE or a temp dir).
        runs_dir: the same runs folder given to create_app (default $RECARE_HOME/runs or ~/.cache/recare/runs).
        limits: `upload_bytes` becomes Gradio's max_file_size (default `Limits.from_env()`).
    """
    from gradio import utils as gradio_utils

    root = Path(workspace).expanduser().resolve() if workspace is not None else workspace_root()
    limits = limits or Limits.from_env()
    gradio_cache = Path(gradio_utils.get_upload_folder()).resolve()
    # never block a folder that holds Gradio's own cache (a workspace set to /tmp itself, say)
    blocked = [str(p) for p in (root, runs_root(runs_dir)) if p != gradio_cache and p not in gradio_cache.parents]
    return {
        "allowed_paths": [str(plotly_js_path())],
        "blocked_paths": blocked,
        "max_file_size": limits.upload_bytes,
        "theme": gr.themes.Soft(primary_hue="indigo", secondary_hue="rose"),
        "css": CSS,
        "ssr_mode": False,
        "footer_links": ["api", "gradio"],
    }
