"""The Gradio app: a view over the `recare` library (one module per workspace, no math here)."""

from ui.shell import TABS, TabSpec, create_app, launch_kwargs

__all__ = ["TABS", "TabSpec", "create_app", "launch_kwargs"]
