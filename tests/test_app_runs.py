"""The app's run plumbing: one RunStore and one JobRunner per app, a key per browser for its runs."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace

import gradio as gr
import pytest

from recare import runs as R
from recare.errors import RunError
from ui.common import owner_key
from ui.shell import TabSpec, create_app, ensure_browser_key

ACCUMULATE = "tests.jobs_fixture:accumulate"


def test_browser_keys_and_signed_in_users():
    key = ensure_browser_key("")
    assert len(key) >= 22 and ensure_browser_key(key) == key and ensure_browser_key(None) != key
    assert owner_key(key, SimpleNamespace(username=None)) == key
    assert owner_key(key, SimpleNamespace(username="alice")) == "user:alice"
    for forged in ("", None, "user:alice", "../x", "short"):
        with pytest.raises(RunError, match="reload the page"):
            owner_key(forged)
        assert ensure_browser_key(forged) not in ("user:alice", "../x")


def test_each_app_gets_its_own_store_runner_and_owner_state(tmp_path):
    runs_dir = tmp_path / "runs"
    crashed = R.RunStore(runs_dir).create("train", {}, target=ACCUMULATE)
    crashed.save_state(lambda folder: (folder / "state.json").write_text("{}"))
    crashed.update_status(state=R.RUNNING, pid=2 ** 22 + 12345, host=socket.gethostname())
    contexts = []
    tabs = (TabSpec("Probe", "probe", lambda ctx: contexts.append(ctx) or {}),)
    for _ in range(2):
        create_app(workspace=tmp_path / "ws", device="cpu", tabs=tabs, runs_dir=runs_dir)
    first, second = contexts
    try:
        assert first.runs.root == runs_dir.resolve() and first.jobs.store is first.runs
        assert first.runs is not second.runs and first.jobs is not second.jobs
        assert isinstance(first.owner, gr.BrowserState) and first.owner.storage_key == "recare-owner"
        # the localStorage secret survives a restart (a second app on the same runs folder)
        assert first.owner.secret == second.owner.secret and len(first.owner.secret) >= 24
        assert (runs_dir / ".browser-state-secret").stat().st_mode & 0o077 == 0
        # recover() ran at start: the crashed run is failed on disk, resumable
        on_disk = json.loads(crashed.status_path.read_text())
        assert on_disk["state"] == R.FAILED and on_disk["resumable"] is True
        assert [r.id for r in first.runs.list()] == [crashed.id]  # the secret file is not a run
    finally:
        for ctx in contexts:
            ctx.jobs.shutdown()
