"""ReCARE Studio: concept unlearning that keeps co-occurring benign concepts (ICLR 2026).

The library never imports gradio; the app (`ui/`) and the CLI (`python -m recare`) are two
views over the same calls.
"""

import os as _os

# torch's OpenMP threads spin while they wait for work. When another process (or a second app
# session) holds a core, spinning threads fight it: on this 2-core machine, generating 16 mini-
# world images took 182 s with 2 threads beside one busy core, 5.5 s with 1 thread, and 4.4 s
# with 2 threads and a passive wait policy. libgomp reads the variable when torch loads it, so
# this works when recare is imported before torch; a user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
