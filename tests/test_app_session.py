"""Per-session workspaces: private folders, cleanup on close, age-based sweep, no module state."""

from __future__ import annotations

import copy
import os
import time

from ui import session as S


def test_sessions_get_distinct_private_folders(tmp_path):
    template = S.new_session(tmp_path)  # what gr.State holds; Gradio deep-copies it per browser session
    a = S.ensure_session(copy.deepcopy(template))
    b = S.ensure_session(copy.deepcopy(template))
    assert a.id and b.id and a.id != b.id and len(a.id) >= 16
    assert a.folder != b.folder and a.folder.parent == b.folder.parent == tmp_path
    assert not template.id, "the template itself is never opened"
    assert S.ensure_session(a) is a and a.folder.is_dir()


def test_close_session_deletes_only_its_folder(tmp_path):
    a = S.ensure_session(S.new_session(tmp_path))
    b = S.ensure_session(S.new_session(tmp_path))
    (a.folder / "careset.json").write_text("{}")
    S.close_session(a)
    assert not a.folder.exists() and b.folder.is_dir()
    S.close_session(S.new_session(tmp_path))  # never opened: nothing to delete, no error
    S.close_session(None)


def test_sweep_removes_idle_sessions_only(tmp_path):
    old = S.ensure_session(S.new_session(tmp_path))
    fresh = S.ensure_session(S.new_session(tmp_path))
    other = tmp_path / "not-a-session"
    other.mkdir()
    long_ago = time.time() - 10 * 3600
    os.utime(old.folder, (long_ago, long_ago))
    os.utime(other, (long_ago, long_ago))
    removed = S.sweep_sessions(tmp_path, max_age_s=3600)
    assert removed == [old.folder]
    assert fresh.folder.is_dir() and other.is_dir()
    # A swept session that comes back gets a new folder instead of failing.
    reopened = S.ensure_session(old)
    assert reopened.folder.is_dir() and reopened.images == []


def test_ui_modules_hold_no_mutable_globals():
    import importlib
    import pkgutil

    import ui

    for info in pkgutil.iter_modules(ui.__path__):
        module = importlib.import_module(f"ui.{info.name}")
        for name, value in vars(module).items():
            if name.startswith("__") or getattr(value, "__module__", None) not in (None, module.__name__):
                continue
            assert not isinstance(value, (list, dict, set)), f"ui.{info.name}.{name} is a mutable module global"


def test_cluster_legend_names_follow_manual_cluster_edits():
    from recare.careset import build_care_set
    from recare.config import CareSetConfig
    from tests.test_careset import toy_world
    from ui.figures import careset_figure

    images, vocab, tokens, target = toy_world()
    built = build_care_set(images, vocab, tokens, target, CareSetConfig(reference_word="syn", top_k=20, top_n=40, n_clusters=4))
    nearest = next(k for k in range(4) if built.cluster_fate(k) != "kept")

    def legend(careset):
        return {t.meta["cluster"]: t.name for t in careset_figure(careset).data if t.meta}

    assert "dropped: nearest" in legend(built)[nearest] or "dropped: farthest" in legend(built)[nearest]
    kept = built.with_edits(toggle_clusters=[nearest])
    size = int((built.labels == nearest).sum())
    assert legend(kept)[nearest] == f"cluster {nearest} · kept: manual ({size}/{size})"
    # Toggling again removes the manual edit: Algorithm 1's decision and label come back.
    again = kept.with_edits(toggle_clusters=[nearest])
    assert legend(again)[nearest] == legend(built)[nearest]
    kept_cluster = next(k for k in range(4) if built.cluster_fate(k) == "kept")
    forced = built.with_edits(drop_clusters=[kept_cluster])
    kept_size = int((built.labels == kept_cluster).sum())
    assert legend(forced)[kept_cluster] == f"cluster {kept_cluster} · dropped: manual (0/{kept_size})"
