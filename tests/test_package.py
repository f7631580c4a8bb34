"""Process-wide settings: importing the library makes none; the programs set them when they start."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from recare.runtime import PROCESS_DEFAULTS, set_process_defaults

ROOT = Path(__file__).resolve().parent.parent

# Runs an entry point with --help (argparse exits before any work), then prints the wait policy it
# left and whether set_process_defaults complained that torch had been imported before it.
RUN_ENTRY = r"""
import os, runpy, sys, warnings
target = sys.argv[1]
sys.argv = [target, "--help"]
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    try:
        if target.endswith(".py"):
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
late = any("set_process_defaults" in str(w.message) for w in seen)
print(os.environ.get("OMP_WAIT_POLICY"), "late" if late else "first")
"""


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the variables the entry points set, plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if k not in PROCESS_DEFAULTS}, **extra}


def _python(*args: str, env: dict[str, str]) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_importing_recare_leaves_the_environment_alone():
    code = ("import os; before = dict(os.environ); import recare, recare.runtime, recare.cli; "
            "print(sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)))")
    assert _python("-c", code, env=_clean_env()) == "[]"


@pytest.mark.parametrize("entry", ["recare", "app.py", "recare.miniworld.train", "benchmarks.careset_speed",
                                   "benchmarks.miniworld_quality"])
def test_entry_points_set_a_passive_wait_policy_before_torch(entry):
    # Passive waiting keeps torch from collapsing when another process holds a core (recare/runtime.py).
    assert _python("-c", RUN_ENTRY, entry, env=_clean_env()) == "PASSIVE first"


def test_a_users_own_wait_policy_wins():
    assert _python("-c", RUN_ENTRY, "recare", env=_clean_env(OMP_WAIT_POLICY="ACTIVE")) == "ACTIVE first"


def test_set_process_defaults_reports_what_it_set_and_warns_after_torch(monkeypatch):
    import torch  # noqa: F401  (loaded: the setting can no longer take effect in this process)

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.warns(RuntimeWarning, match="after torch was imported"):
        assert set_process_defaults() == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set_process_defaults() == {}  # already set: nothing changes, nothing to warn about


@pytest.mark.slow
def test_pip_install_editable_gives_a_working_recare_command(tmp_path):
    # A fresh virtualenv gets the package alone (--no-deps: the dependencies are this venv's, put on
    # PYTHONPATH, so the test downloads nothing but the build backend); the console script then
    # runs from another folder, so the import comes from the install, not from the checkout.
    import site
    import venv

    venv.EnvBuilder(with_pip=True).create(tmp_path / "venv")
    bin_dir = tmp_path / "venv" / "bin"
    install = subprocess.run([str(bin_dir / "pip"), "install", "-q", "--no-deps", "-e", str(ROOT)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    env = _clean_env(PYTHONPATH=os.pathsep.join(site.getsitepackages()))
    result = subprocess.run([str(bin_dir / "recare"), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "evaluate" in result.stdout and "train" in result.stdout
    where = subprocess.run([str(bin_dir / "python"), "-c", "import recare; print(recare.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(ROOT / "recare" / "__init__.py")
