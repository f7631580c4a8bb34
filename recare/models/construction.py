"""One process-wide lock for loading models and building torch modules.

Diffusers builds each model inside accelerate's `init_empty_weights`, which replaces
`torch.nn.Module.register_parameter` for the whole process (not the calling thread) while it
runs. A module built meanwhile in another thread (a training job, a Gradio handler, an evaluation
shard) gets meta parameters and fails later with "Cannot copy out of meta tensor"; a transformers
CLIP loaded meanwhile fails with "Unsupported device type 'meta'" (both seen in CI).

Hold `building_modules()` around every model load (diffusers, transformers, open_clip) and around
every place in recare that constructs a module (`nn.Embedding(...)`, the oracle's network) or adds
embedding rows (`load_textual_inversion`) in code that can run beside a load. Loads are short next
to what runs between them, so taking turns costs little.
"""
from __future__ import annotations

import threading

_LOCK = threading.RLock()


def building_modules() -> threading.RLock:
    """The lock, as a context manager (re-entrant: a load may build modules itself)."""
    return _LOCK
