"""Workspaces that later issues fill in; each says what is coming and what it will use."""

from __future__ import annotations

from typing import Any

import gradio as gr

from ui.common import AppContext


def create_compare_tab(ctx: AppContext) -> dict[str, Any]:
    """Placeholder for the comparison workspace (base vs unlearned, metrics, radar)."""
    md = gr.Markdown(
        "### Compare: coming later\n"
        "Side-by-side images of the base and the unlearned model from the same seeds, and the paper's metrics: "
        "CARE score, CLIP score, attack success rate (CCE) and RATIO, drawn as a radar."
    )
    return {"info": md}
