"""Process-wide settings the library makes on import."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _wait_policy_after_import(env_value):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    code = "import recare, os, sys; print(os.environ['OMP_WAIT_POLICY']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_import_sets_a_passive_omp_wait_policy_before_torch_loads():
    # Passive waiting keeps torch from collapsing when another process holds a core (see recare/__init__.py).
    assert _wait_policy_after_import(None) == ["PASSIVE", "False"]


def test_a_users_own_wait_policy_wins():
    assert _wait_policy_after_import("ACTIVE") == ["ACTIVE", "False"]
