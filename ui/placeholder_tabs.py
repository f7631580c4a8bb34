"""Workspaces that later issues fill in; each says what is coming and what it will use."""

from __future__ import annotations

from typing import Any

import gradio as gr

from ui.common import AppContext


def create_train_tab(ctx: AppContext) -> dict[str, Any]:
    """Placeholder for the training workspace (stage 1 adversarial tokens + stage 2 ReCARE)."""
    md = gr.Markdown(
        "### Train: coming next\n"
        "This workspace will run **stage 1** (erasure ⇄ textual inversion, adversarial tokens v1*, v2*) and "
        "**stage 2** (ReCARE: erase + retain with your CARE-set) on the selected model, with progress, cancel, "
        "and a run folder holding the config, `careset.json`, tokens and `ReCARE-Diffusers-UNet.pt`.\n\n"
        "It will use the image set from **Generate** and the CARE-set saved in **CARE-set** "
        "(the session's `careset.json`)."
    )
    return {"info": md}


def create_compare_tab(ctx: AppContext) -> dict[str, Any]:
    """Placeholder for the comparison workspace (base vs unlearned, metrics, radar)."""
    md = gr.Markdown(
        "### Compare: coming later\n"
        "Side-by-side images of the base and the unlearned model from the same seeds, and the paper's metrics: "
        "CARE score, CLIP score, attack success rate (CCE) and RATIO, drawn as a radar."
    )
    return {"info": md}
