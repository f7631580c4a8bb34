"""Per-process cache of loaded models, shared read-only by every session.

Loading a pipeline or an encoder takes seconds to minutes, so each is loaded once per process,
keyed by its name, under a lock (two sessions asking for the same model wait for one load).
The models are only ever used for inference, never changed, so sharing them is safe. The
cache is created by `ui.create_app` and handed to the tabs; it is not a module global.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from recare import models


class ModelCache:
    """Load-once cache of pipelines and encoders.

    Args:
        device: "auto" or a torch device string, used for every model.
        max_pipelines: how many different pipelines to keep (the oldest is dropped first).
    """

    def __init__(self, device: str = "auto", max_pipelines: int = 2):
        self.device = models.resolve_device(device)
        self.max_pipelines = max_pipelines
        self._lock = threading.Lock()
        self._pipelines: dict[str, Any] = {}
        self._encoders: dict[str, Any] = {}

    def pipeline(self, name: str):
        """The diffusers pipeline called `name` (see recare.models.load_pipeline). Raises ModelLoadError."""
        return self._get(self._pipelines, name, lambda: models.load_pipeline(name, device=self.device), self.max_pipelines)

    def encoder(self, name: str):
        """The encoder called `name` (see recare.models.load_encoder). Raises ModelLoadError."""
        return self._get(self._encoders, name, lambda: models.load_encoder(name, device=self.device), 3)

    def _get(self, store: dict, name: str, load: Callable[[], Any], limit: int):
        name = str(name).strip()
        with self._lock:
            if name not in store:
                while len(store) >= limit:
                    store.pop(next(iter(store)))
                store[name] = load()
            return store[name]
