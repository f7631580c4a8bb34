"""Per-session workspaces: every browser session gets its own folder and its own state.

A session is created lazily by the first callback that needs it and travels in a `gr.State`
(Gradio keeps one copy per browser session, so nothing here is shared between users). Its folder
lives under the workspace root (`$RECARE_WORKSPACE`, default `<tmp>/recare-workspace`) and is
named by a random id, so one session can neither see nor overwrite another's files. Folders go
away when Gradio drops the session's state (`close_session`, the State's delete_callback) and,
as a safety net, when they have been idle longer than `max_age_s` (`sweep_sessions`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SESSION_PREFIX = "s-"
DEFAULT_MAX_AGE_S = 6 * 3600  # idle sessions older than this are swept (override: $RECARE_SESSION_MAX_AGE_S)


def workspace_root() -> Path:
    """The folder that holds every session folder ($RECARE_WORKSPACE or <tmp>/recare-workspace)."""
    env = os.environ.get("RECARE_WORKSPACE")
    root = Path(env).expanduser() if env else Path(tempfile.gettempdir()) / "recare-workspace"
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def max_session_age_s() -> float:
    """Idle age after which a session folder is swept ($RECARE_SESSION_MAX_AGE_S, default 6 h)."""
    try:
        return float(os.environ.get("RECARE_SESSION_MAX_AGE_S", DEFAULT_MAX_AGE_S))
    except ValueError:
        return float(DEFAULT_MAX_AGE_S)


@dataclasses.dataclass
class Session:
    """What one browser session has made so far.

    The shell puts an unopened Session (no id yet) in gr.State; Gradio deep-copies it for each
    browser session, and the first callback that needs files opens it (`ensure_session`).

    Attributes:
        root: the workspace root that holds the session folder.
        id: random, unguessable id ("" until opened); the folder is root / (SESSION_PREFIX + id).
        images: paths of the current image set (originals), in order.
        seeds: seed of each image (None for uploaded images).
        flags: True where the safety check flagged the image (it is then shown blurred).
        checked: False when the detector was unavailable (every image is then hidden by default).
        revealed: indices the user chose to reveal.
        show_unchecked: the user opted in to see images that could not be checked.
        careset: the current CareSet (recare.careset.CareSet) or None.
        official: an OfficialCareSet loaded from a plain careset.json while no CareSet is built.
        source: a line saying where the image set came from (plain text: escape it before Markdown).
    """

    root: Path
    id: str = ""
    images: list[Path] = dataclasses.field(default_factory=list)
    seeds: list[Any] = dataclasses.field(default_factory=list)
    flags: list[bool] = dataclasses.field(default_factory=list)
    checked: bool = True
    revealed: set[int] = dataclasses.field(default_factory=set)
    show_unchecked: bool = False
    careset: Any = None
    official: Any = None
    source: str = ""
    run_id: int = 0  # bumped to cancel the running generation: a late batch of an old run is dropped
    active_run: int = 0  # run_id of the generation whose code is still running (0: none), cancelled or not

    def __post_init__(self) -> None:
        # Makes "is this run still current? then append its images" atomic with respect to Cancel,
        # so the count Cancel reports is the count kept. A plain attribute, not a field: Gradio
        # serialises the State's default value with dataclasses.asdict, which copies every field.
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> Session:
        """A deep copy of every field, with a lock of its own (a Lock cannot be copied).

        gr.State deep-copies its default Session once per browser session: each copy is a new
        session, so a fresh, unlocked lock is right. Gradio hands the live object to every event
        of that session without copying it, so all of a session's events share one lock.
        """
        clone = copy.copy(self)
        memo[id(self)] = clone
        for field in dataclasses.fields(self):
            setattr(clone, field.name, copy.deepcopy(getattr(self, field.name), memo))
        clone._lock = threading.Lock()
        return clone

    @property
    def folder(self) -> Path:
        """The session's private folder."""
        if not self.id:
            raise RuntimeError("the session is not open yet: call ensure_session first")
        return self.root / f"{SESSION_PREFIX}{self.id}"

    @property
    def image_dir(self) -> Path:
        return self.folder / "images"

    @property
    def careset_path(self) -> Path:
        """Official-format careset.json: the file the training workspace will use."""
        return self.folder / "careset.json"

    @property
    def rich_careset_path(self) -> Path:
        return self.folder / "careset.rich.json"

    @property
    def lock(self) -> threading.Lock:
        """The session's lock: hold it while changing the image set from a running job."""
        return self._lock

    def touch(self) -> None:
        """Mark the session as active so the age-based sweep leaves it alone."""
        self.folder.mkdir(parents=True, exist_ok=True)
        os.utime(self.folder)

    def clear_images(self) -> None:
        """Forget the current image set and delete its files."""
        shutil.rmtree(self.image_dir, ignore_errors=True)
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self.images, self.seeds, self.flags, self.revealed = [], [], [], set()
        self.checked = True

    def is_hidden(self, index: int) -> bool:
        """Whether image `index` is shown blurred right now."""
        if index in self.revealed:
            return False
        if not self.checked:
            return not self.show_unchecked
        return bool(self.flags[index])


def new_session(root: Path | None = None) -> Session:
    """An unopened session under `root` (default `workspace_root()`): the gr.State default value."""
    return Session(root=Path(root) if root is not None else workspace_root())


def open_session(session: Session) -> Session:
    """Give `session` a fresh random id and folder (sweeping stale folders first); returns it.

    Args:
        session: an unopened session (its root is used).
    """
    session.root.mkdir(parents=True, exist_ok=True)
    sweep_sessions(session.root, max_session_age_s())
    session.id = secrets.token_urlsafe(16).replace("-", "x").replace("_", "y")
    session.folder.mkdir(parents=True, exist_ok=False)
    return session


def ensure_session(session: Session | None) -> Session:
    """The session held in gr.State, opened on first use; marks it active."""
    if session is None:
        session = new_session()
    if not session.id or not session.folder.is_dir():
        session.id = ""
        session.images, session.seeds, session.flags, session.revealed = [], [], [], set()
        open_session(session)
    session.touch()
    return session


def close_session(session: Session | None) -> None:
    """Delete a session's folder (the gr.State delete_callback)."""
    if isinstance(session, Session) and session.id:
        shutil.rmtree(session.folder, ignore_errors=True)


def sweep_sessions(root: Path, max_age_s: float, now: float | None = None) -> list[Path]:
    """Delete session folders idle for longer than `max_age_s`; return what was deleted.

    Args:
        root: workspace root.
        max_age_s: idle age (seconds since the folder's mtime) that counts as abandoned.
        now: current time (for tests); default time.time().
    """
    now = time.time() if now is None else now
    removed = []
    for folder in root.glob(f"{SESSION_PREFIX}*"):
        try:
            idle = now - folder.stat().st_mtime
        except OSError:
            continue
        if folder.is_dir() and idle > max_age_s:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
