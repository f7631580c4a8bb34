"""Per-session workspaces: private folders, cleanup on close, age-based sweep, no module state."""

from __future__ import annotations

import copy
import dataclasses
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


def _immutable(value) -> bool:
    """True for what may live at module level in ui/: code, constants, and frozen structures of them."""
    import dataclasses
    import enum
    import logging
    import re
    import types
    import typing

    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, range, enum.Enum, re.Pattern)):
        return True
    if isinstance(value, (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return True  # code: modules, classes, functions
    if isinstance(value, (typing.TypeVar, types.GenericAlias, types.UnionType)) or type(value).__module__ == "typing":
        return True  # annotations: Callable, Sequence, dict[str, Any], ...
    if isinstance(value, logging.Logger) or type(value).__name__ == "_Feature":  # loggers; `from __future__ import annotations`
        return True
    if isinstance(value, (tuple, frozenset)):
        return all(_immutable(v) for v in value)
    if isinstance(value, types.MappingProxyType):
        return all(_immutable(k) and _immutable(v) for k, v in value.items())
    if dataclasses.is_dataclass(value) and type(value).__dataclass_params__.frozen:
        return all(_immutable(getattr(value, f.name)) for f in dataclasses.fields(value))
    return False  # lists, dicts, sets, locks, registries, caches, any other object


def test_ui_modules_hold_no_mutable_globals():
    """Per-session state lives in gr.State, per-app state in objects create_app owns; never in a module."""
    import importlib
    import pkgutil

    import ui

    found = []
    for info in pkgutil.iter_modules(ui.__path__):
        module = importlib.import_module(f"ui.{info.name}")
        for name, value in vars(module).items():
            if not name.startswith("__") and not _immutable(value):
                found.append(f"ui.{info.name}.{name} ({type(value).__name__})")
    assert not found, f"mutable module-level objects in ui/: {found}"


def test_the_globals_check_flags_what_it_should():
    import threading
    import types

    from ui.shell import TABS

    class Registry:
        pass

    for mutable in ([], {}, set(), threading.Lock(), Registry(), types.SimpleNamespace(), (1, []),
                    types.MappingProxyType({"a": []})):
        assert not _immutable(mutable), mutable
    assert _immutable(TABS) and _immutable(("a", 1, None, frozenset({2}))) and _immutable(types.MappingProxyType({1: "x"}))


def test_each_session_has_its_own_lock_that_survives_copies(tmp_path):
    template = S.new_session(tmp_path)
    a, b = copy.deepcopy(template), copy.deepcopy(template)  # two browser sessions, before either is opened
    assert a.lock is not b.lock and a.lock is not template.lock
    opened = S.ensure_session(a)
    assert opened.lock is a.lock  # opening the session (a new id) keeps its lock
    with a.lock:
        assert not b.lock.locked()  # one session's running job never blocks another
        assert not copy.deepcopy(a).lock.locked()
    assert a.images == copy.deepcopy(a).images and copy.deepcopy(a).id == a.id  # everything else is copied
    assert dataclasses.asdict(template)["id"] == ""  # how Gradio serialises a State's default value: no lock in it


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
