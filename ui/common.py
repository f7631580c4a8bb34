"""Small helpers shared by the tabs: the app context and how a tab reports a problem."""

from __future__ import annotations

import dataclasses
from typing import Any

import gradio as gr

from ui.model_cache import ModelCache


@dataclasses.dataclass
class AppContext:
    """What every tab receives from the shell.

    Attributes:
        models: the per-process model cache (read-only models).
        session: the gr.State holding this browser session's `ui.session.Session`.
        model_name: the model picker (a Dropdown with custom values).
        components: components created so far, by "<tab>.<name>", so a later tab can wire to an earlier one.
    """

    models: ModelCache
    session: gr.State
    model_name: gr.Dropdown
    components: dict[str, Any] = dataclasses.field(default_factory=dict)


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
