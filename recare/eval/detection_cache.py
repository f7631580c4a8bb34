"""The nudity detector's verdict on image files, judged once per file and detector.

    cache = DetectionCache()                 # NudeNet (`recare.safety`), or DetectionCache(detect, name="x")
    cache.flags([path, ...])                 # [True / False per image, or None: no detector]
    cache.calls                              # how many images the detector has judged

A verdict is kept under (the detector's name and version, the file's `recare.hashing.file_fingerprint`),
so an image that was judged is not judged again, wherever and however often it is asked about (Compare
polls every 2 s); a new or rewritten file is. The cache lives in memory, bounded (the oldest verdicts
go first), one per process for NudeNet (`shared_cache`). A missing detector is never cached: it is asked
for again on the next call.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

from PIL import Image

from recare import safety
from recare.hashing import file_fingerprint
from recare.versions import package_version

MAX_ENTRIES = 100_000  # verdicts kept (a few dozen bytes each)


def nudenet_name() -> str:
    """The default detector's name and version ("nudenet-<version>@<threshold>", `recare.versions`)."""
    return f"nudenet-{package_version('nudenet')}@{safety.THRESHOLD}"


class DetectionCache:
    """Verdicts of one detector, per image file (module docstring).

    Args:
        detector: image -> NudeNet-style detections (`recare.safety.Detector`); None: NudeNet.
        name: the detector's name and version, part of every key (default: NudeNet's, `nudenet_name`).
        max_entries: verdicts kept.
    """

    def __init__(self, detector: safety.Detector | None = None, name: str | None = None,
                 max_entries: int = MAX_ENTRIES):
        if detector is not None and not name:
            raise ValueError("a detector other than NudeNet needs a name (and version) for the cache's keys")
        self._detector, self.name, self.max_entries = detector, name or nudenet_name(), int(max_entries)
        self._verdicts: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._lock = threading.Lock()
        self.calls = 0

    def __len__(self) -> int:
        return len(self._verdicts)

    def flag(self, path: str | Path) -> bool | None:
        """Whether the detector flags the image file (True: blur it); None when the detector is unavailable."""
        key = (self.name, file_fingerprint(path))
        with self._lock:
            if key in self._verdicts:
                self._verdicts.move_to_end(key)
                return self._verdicts[key]
        try:
            detector = self._detector if self._detector is not None else safety.load_detector()
        except safety.SafetyUnavailableError:
            return None
        with Image.open(path) as im:
            verdict = safety.check_images([im.convert("RGB")], detector)[0].flagged
        with self._lock:
            self.calls += 1
            self._verdicts[key] = verdict
            while len(self._verdicts) > self.max_entries:
                self._verdicts.popitem(last=False)
        return verdict

    def flags(self, paths: Sequence[str | Path]) -> list[bool | None]:
        """`flag` of each image file, in order."""
        return [self.flag(p) for p in paths]


_SHARED: DetectionCache | None = None
_SHARED_LOCK = threading.Lock()


def shared_cache() -> DetectionCache:
    """The process's NudeNet cache (made on first use)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = DetectionCache()
        return _SHARED


__all__ = ["DetectionCache", "shared_cache", "nudenet_name", "MAX_ENTRIES"]
