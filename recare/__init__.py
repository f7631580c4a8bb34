"""ReCARE Studio: concept unlearning that keeps co-occurring benign concepts (ICLR 2026).

The library never imports gradio; the app (`ui/`) and the CLI (`python -m recare`) are two
views over the same calls. Importing it changes nothing in the process (no environment
variables, no threads): process-wide settings are the entry points' job, see `recare.runtime`.
"""

__version__ = "0.1.0"
