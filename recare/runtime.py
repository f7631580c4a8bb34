"""Process-wide settings that belong to the program, not to the library: `set_process_defaults`.

Importing `recare` changes nothing in the process. The programs this repository ships
(`python app.py`, `python -m recare`, `python -m recare.miniworld.train`, `python -m benchmarks.*`)
call `set_process_defaults()` first thing, before torch is imported. A script of your own can
do the same, or set the variables in its environment.

Why OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads spin while they wait for work. When another
process (or a second app session) holds a core, spinning threads fight it: on our 2-core
machine, generating 16 mini-world images took 182 s with 2 threads beside one busy core, 5.5 s
with 1 thread, and 4.4-6.1 s with 2 threads and the passive wait policy. libgomp reads the
variable once, when torch loads it, so setting it after `import torch` does nothing.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import MappingProxyType

# Environment defaults for a process that runs recare; a value the user already set wins.
PROCESS_DEFAULTS = MappingProxyType({
    "OMP_WAIT_POLICY": "PASSIVE",  # OpenMP threads sleep instead of spinning while they wait (see above)
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # lets cuBLAS be deterministic on CUDA (recare.train.determinism)
})


def set_process_defaults() -> dict[str, str]:
    """Set `PROCESS_DEFAULTS` in `os.environ` where the user has not set them; call before importing torch.

    Returns:
        The variables this call set (empty when the user had set them all, or on a second call).
    """
    changed = {name: value for name, value in PROCESS_DEFAULTS.items() if name not in os.environ}
    os.environ.update(changed)
    if changed and "torch" in sys.modules:
        warnings.warn(f"set_process_defaults() ran after torch was imported, so {sorted(changed)} take no effect "
                      "in this process: call it before importing torch.", RuntimeWarning, stacklevel=2)
    return changed
