"""Small helpers shared by the tabs: the app context, how a tab reports a problem, and how it
shows the library's progress events."""

from __future__ import annotations

import dataclasses
import re
import secrets
from typing import Any, Callable

import gradio as gr

from recare.errors import RunError
from recare.jobs import JobRunner
from recare.model_cache import ModelCache
from recare.runs import RunStore
from recare.progress import ProgressEvent


@dataclasses.dataclass
class AppContext:
    """What every tab receives from the shell.

    Attributes:
        models: the per-process model cache (read-only models).
        session: the gr.State holding this browser session's `ui.session.Session`.
        model_name: the model picker (a Dropdown with custom values).
        components: components created so far, by "<tab>.<name>", so a later tab can wire to an earlier one.
        runs: the app's run store (training and evaluation runs that outlive a tab and the process).
        jobs: the app's job runner (starts, cancels and resumes runs in worker processes).
        owner: the gr.BrowserState holding this browser's random key; pass it to a handler as an
            input and turn it into the owner of runs with `owner_key(value, request)`.
    """

    models: ModelCache
    session: gr.State
    model_name: gr.Dropdown
    components: dict[str, Any] = dataclasses.field(default_factory=dict)
    runs: RunStore | None = None
    jobs: JobRunner | None = None
    owner: gr.BrowserState | None = None


_BROWSER_KEY = re.compile(r"^[A-Za-z0-9_-]{22,64}$")  # what new_browser_key makes; never contains ':'


def new_browser_key() -> str:
    """A random key for a browser that has none yet (kept in its gr.BrowserState)."""
    return secrets.token_urlsafe(16)


def owner_key(stored: str | None, request: gr.Request | None = None) -> str:
    """Who owns the runs a handler creates or lists: the signed-in user, else this browser's key.

    On a Space with login (`gr.Request.username` set) runs follow the user to any browser;
    otherwise they belong to the random key kept in this browser's localStorage, so a reloaded
    tab finds its runs and another browser does not.

    Args:
        stored: the value of `ctx.owner` (the gr.BrowserState) given to the handler.
        request: the handler's gr.Request.

    Raises:
        RunError: the browser has no key yet (the page has not finished loading).
    """
    username = getattr(request, "username", None) if request is not None else None
    if username:
        return f"user:{username}"  # a browser key never contains ':', so the two never collide
    if isinstance(stored, str) and _BROWSER_KEY.match(stored):
        return stored
    raise RunError("this browser has no key for its runs yet; reload the page.")


def problem(message: str) -> str:
    """Show `message` as a toast and return it as Markdown for the tab's status line.

    Use for bad input and load failures: the event finishes normally, so the session keeps
    working and API clients see the message in the status output.
    """
    gr.Warning(message)
    return f"⚠ **{message}**"


def ok(message: str) -> str:
    """A status line for something that worked."""
    return f"✓ {message}"


def skip_all(n: int) -> list:
    """`n` gr.skip() values: leave every output as it is."""
    return [gr.skip() for _ in range(n)]


def gradio_progress(progress, start: float = 0.0, end: float = 1.0) -> Callable[[ProgressEvent], None]:
    """A `progress` callback for the library that draws its events on a `gr.Progress` bar.

    A tab that runs several library calls in one event gives each its share of the bar: the
    event's own fraction (step / total) is mapped into [start, end].

    Args:
        progress: the `gr.Progress()` the event handler received.
        start, end: the part of the bar this call fills.
    """
    def show(event: ProgressEvent) -> None:
        desc = f"{event.stage}: {event.message}" if event.message else event.stage
        progress(start + (end - start) * event.fraction, desc=desc)

    return show
