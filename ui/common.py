"""Small helpers shared by the tabs: the app context, how a tab reports a problem, how it shows
the library's progress events, how text from users and files is escaped before it is shown as
Markdown, and how a file is handed to Gradio for serving."""

from __future__ import annotations

import dataclasses
import html
import math
import re
import secrets
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from recare.errors import ConfigError, RunError
from recare.jobs import JobRunner
from recare.limits import Limits
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
        limits: the app's resource limits (`recare.limits.Limits`), passed to every library call
            that reads user input.
    """

    models: ModelCache
    session: gr.State
    model_name: gr.Dropdown
    components: dict[str, Any] = dataclasses.field(default_factory=dict)
    runs: RunStore | None = None
    jobs: JobRunner | None = None
    owner: gr.BrowserState | None = None
    limits: Limits = dataclasses.field(default_factory=Limits.from_env)


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


def client_key(request: gr.Request | None = None) -> str:
    """Who sent a request, for the server's per-client job limit: a hash of the client's address.

    Behind a proxy (a Hugging Face Space) the address is the one the proxy appended last to
    X-Forwarded-For (a client can write the header's first entries itself, not the proxy's); set
    `RECARE_PROXY_HOPS` to the number of proxies in front of the app (default 1 on a Space, else 0).

    Args:
        request: the handler's gr.Request ("" without one: a call from Python).
    """
    import os

    from recare.jobs.checks import client_hash

    if request is None:
        return ""
    address = getattr(getattr(request, "client", None), "host", None) or ""
    try:
        hops = int(os.environ.get("RECARE_PROXY_HOPS", "1" if os.environ.get("SPACE_ID") else "0"))
    except ValueError:
        hops = 0
    headers = getattr(request, "headers", None) or {}
    forwarded = [a.strip() for a in str(headers.get("x-forwarded-for") or "").split(",") if a.strip()]
    if hops > 0 and len(forwarded) >= hops:
        address = forwarded[-hops]
    return client_hash(address or "unknown")


def submitter(ctx: "AppContext", owner: str, request: gr.Request | None = None):
    """The `recare.jobs.checks.Submitter` of a handler: this app's model policy and limits, the owner
    key and the client's address."""
    from recare.jobs.checks import Submitter

    return Submitter.of(ctx.models.policy, ctx.limits, owner=owner, client=client_key(request))


_ABS_PATH = re.compile(r"(?<![\w.:/])(?:/[^\s/'\"`,;:()]+)+/?")


def no_paths(ctx: "AppContext", message: Any) -> str:
    """`message` with every absolute server path cut to its last part, in public mode (as it is elsewhere).

    Args:
        ctx: the app's context (its model policy says whether this app is public).
        message: an error's text.
    """
    text = str(message)
    if not ctx.models.policy.public_mode:
        return text
    return _ABS_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "/", text)


def page_owner(stored: str | None, request: gr.Request | None = None) -> str | None:
    """`owner_key`, or None while a first visit's page is still getting its key (no warning then).

    Page-load handlers run before `ensure_browser_key` has given a new browser its key; they
    skip quietly and run again when the key arrives (`owner.change`). A malformed key still raises.
    """
    if not stored and not (getattr(request, "username", None) if request is not None else None):
        return None
    return owner_key(stored, request)


def problem(message: str) -> str:
    """Show `message` as a toast and return it as Markdown for the tab's status line.

    Use for bad input and load failures: the event finishes normally, so the session keeps
    working and API clients see the message in the status output. The message is plain text
    (it often quotes a file or what the user typed) and is escaped: nothing in it renders.
    """
    gr.Warning(html.escape(" ".join(str(message).split()), quote=False))
    return f"⚠ **{md(message)}**"


# Markdown that could turn text into markup: HTML is escaped as entities; these get a backslash.
_MD_SPECIAL = re.compile(r"([\\`*\[\]!~@])")
_AUTOLINK = re.compile(r"(://|(?<![A-Za-z0-9])www\.)", re.IGNORECASE)


def md(text: Any) -> str:
    """`text` (from a user or a file) escaped for a Markdown line: it shows as typed and renders nothing.

    HTML becomes entities, the characters of links, images, code and emphasis get a backslash,
    autolinks (`http://`, `www.`, e-mail addresses) are broken up, and line breaks become spaces.

    Args:
        text: anything; str() is applied.
    """
    text = html.escape(" ".join(str(text).split()), quote=False)
    text = _MD_SPECIAL.sub(r"\\\1", text)
    return _AUTOLINK.sub(lambda m: m.group(1).replace("/", "\\/").replace(".", "\\."), text)


def number(value: Any, name: str, kind: type = int) -> int | float:
    """A number box's value as `kind`; ConfigError for an empty, non-numeric, non-finite or fractional entry.

    Args:
        value: what the component (or an API client) sent.
        name: the field, for the message.
        kind: int or float.
    """
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise ConfigError(f"{name} must be a number (got {str(value)[:40]!r}).")
    try:
        as_float = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name} must be a number (got {str(value)[:40]!r}).") from None
    if not math.isfinite(as_float):
        raise ConfigError(f"{name} must be a finite number (got {str(value)[:40]!r}).")
    if kind is float:
        return as_float
    if isinstance(value, int):
        return value  # exact, however large (the config says whether it is in range)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    if as_float != int(as_float):
        raise ConfigError(f"{name} must be a whole number (got {str(value)[:40]!r}).")
    return int(as_float)


def served(path: str | Path) -> str:
    """The copy of `path` Gradio serves: in Gradio's cache, under a folder named by a keyed hash of its bytes.

    Session folders and run folders are never in `allowed_paths`, so no URL reaches them; a
    handler returns only the files it means to show, each copied here. Knowing one file's URL
    tells nothing about any other file (no shared folder, no predictable name), so a session's
    manifest, CARE-set files and originals of blurred images stay private. Gradio deletes the
    copies on its `delete_cache` schedule.

    Args:
        path: a file the user is meant to see (an image, a careset file to download).
    """
    from gradio import processing_utils, utils

    return processing_utils.save_file_to_cache(str(path), utils.get_upload_folder())


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
