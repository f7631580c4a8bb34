"""Shared pieces for the app tests (no tests here): a world to run on and a launched app.

The world is the bundled mini world when it is installed; otherwise tiny random models
(tests/helpers_tiny.py) stand in for it, through $RECARE_MINI_WORLD, so the app code takes
exactly the same path ("mini-world") either way.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import pytest

from recare import models

# A harmless word list: small and fast, enough candidates for a few clusters.
WORDS = (
    "cat dog person tree car house flower sky water bird fish boat mountain road grass chair table cup book "
    "phone red blue green yellow river beach snow city street window bridge lamp cloud field forest"
).split()


def installed_mini_world() -> Path | None:
    """The real mini world's folder when its pipeline and CLIP are installed, else None."""
    folder = models.mini_world_dir()
    if (folder / "pipeline" / "model_index.json").is_file() and (folder / "clip" / "config.json").is_file():
        return folder
    return None


def tiny_world(base: Path) -> Path:
    """A folder laid out like the mini world, holding tiny random models (built once per test run)."""
    from tests.helpers_tiny import make_tiny_clip, make_tiny_pipeline

    folder = base / "tiny-world"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "tiny-world.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist workers may race to build it
        if not (folder / "clip" / "config.json").is_file():
            make_tiny_pipeline(folder / "pipeline")
            make_tiny_clip(folder / "clip")
    return folder


@contextlib.contextmanager
def world_env(tmp_root: Path):
    """Point 'mini-world' at the installed mini world, or at a tiny world; yields (folder, is_real)."""
    real = installed_mini_world()
    folder = real or tiny_world(tmp_root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECARE_MINI_WORLD", str(folder))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield folder, real is not None


def runs_dir_of(workspace: Path) -> Path:
    """The run store of the app launched on `workspace` (never the user's ~/.cache/recare/runs)."""
    return workspace.parent / f"{workspace.name}-runs"


@contextlib.contextmanager
def launched_app(workspace: Path):
    """Create and launch the app on a free port; yields (demo, url). Closed on exit."""
    import ui

    runs = runs_dir_of(workspace)
    demo = ui.create_app(workspace=workspace, device="cpu", runs_dir=runs)
    demo.queue(default_concurrency_limit=4)
    try:
        _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **ui.launch_kwargs(workspace, runs_dir=runs))
    except ValueError as e:  # Gradio's reachability check (a 3-s HEAD) timed out on a loaded machine: once more
        if "localhost is not accessible" not in str(e):
            raise
        demo.close()
        _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **ui.launch_kwargs(workspace, runs_dir=runs))
    try:
        yield demo, url
    finally:
        demo.close()


def write_words(path: Path, words=WORDS) -> Path:
    path.write_text("\n".join(words) + "\n")
    return path


def session_dirs(workspace: Path) -> list[Path]:
    return sorted(p for p in workspace.glob("s-*") if p.is_dir())


@contextlib.contextmanager
def app_for_module(tmp_path_factory):
    """A launched app (the session's one is tests/conftest.py's `app_url`) on the (mini or tiny) world with its own workspace and run store: yields
    {"url", "workspace", "runs", "demo", "world", "real_world"}."""
    base = tmp_path_factory.getbasetemp().parent / "recare-app-shared"
    with world_env(base) as (folder, is_real):
        workspace = tmp_path_factory.mktemp("workspace")
        with launched_app(workspace) as (demo, url):
            yield {"url": url, "workspace": workspace, "runs": runs_dir_of(workspace), "demo": demo, "world": folder,
                   "real_world": is_real}


def mini_world_client(app: dict, workspace_name: str):
    """A gradio_client for `app`; skips when the app runs on the tiny stand-in world (no tasks)."""
    from gradio_client import Client

    if not app["real_world"]:
        pytest.skip(f"the {workspace_name} tests use the mini world's tasks (checkpoints/mini-world)")
    return Client(app["url"], verbose=False, download_files=str(app["workspace"].parent / "downloads"))


def env_cache_dir() -> str:
    return os.environ.get("RECARE_CACHE", "")
