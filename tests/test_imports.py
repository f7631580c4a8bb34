"""Every module of `recare` imports alone, as the first recare module of its interpreter, and importing
it changes no environment variable (no import cycles, no process-wide side effects at import).

Alone matters: in a shared interpreter a cycle hides whenever another module happened to import one
side of it first (`import recare.careset_io` failed alone while `import recare.careset` worked). The
modules are found on disk, so new ones are checked without being listed here.

Speed: torch's import is most of each module's cost (2-6 s on CI). One helper interpreter imports
the heavy third-party libraries once (never a recare module), then forks one child per module; each
child starts with no recare module loaded and imports only its own. Without os.fork, each module
gets a fresh interpreter of its own instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "recare"

# Imports one module; prints a JSON report: did it import, and what did the import change in os.environ.
IMPORT_ONE = r"""
import importlib, json, os, sys, traceback

def report(module):
    assert not any(m == "recare" or m.startswith("recare.") for m in sys.modules), "a recare module is preloaded"
    before = dict(os.environ)
    try:
        importlib.import_module(module)
    except BaseException:
        return {"ok": False, "error": traceback.format_exc()}
    after = dict(os.environ)
    return {"ok": True, "env": {k: [before.get(k), after.get(k)] for k in set(before) | set(after)
                                if before.get(k) != after.get(k)}}
"""

# Preloads third-party libraries only, then forks a child per module (argv) and collects the reports.
FORK_EACH = IMPORT_ONE + r"""
for heavy in ("numpy", "torch", "PIL.Image"):
    try:
        importlib.import_module(heavy)
    except ImportError:
        pass
results = {}
for module in sys.argv[1:]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        with os.fdopen(write_end, "w") as out:
            out.write(json.dumps(report(module)))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()  # read before waiting: a long report must not block the child
    _, status = os.waitpid(pid, 0)
    results[module] = json.loads(text) if text else {"ok": False, "error": f"child died (wait status {status})"}
print(json.dumps(results))
"""


def recare_modules() -> list[str]:
    """Dotted names of every module under recare/ (packages included), except `__main__` (it runs the CLI)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if "__pycache__" in parts or parts[-1] == "__main__":
            continue
        if not all((REPO.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts))):
            continue  # a stray script in a folder that is not a package
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _python(code: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def import_each_alone(modules: list[str]) -> dict[str, dict]:
    """{module: {"ok": bool, "error": traceback, "env": {name: [before, after]}}}, one interpreter per module."""
    if hasattr(os, "fork"):
        return json.loads(_python(FORK_EACH, *modules))
    one = IMPORT_ONE + "print(json.dumps(report(sys.argv[1])))\n"
    return {m: json.loads(_python(one, m)) for m in modules}


def test_module_list_is_complete():
    modules = recare_modules()
    for expected in ("recare", "recare.careset", "recare.careset_io", "recare.cli", "recare.errors",
                     "recare.progress", "recare.runtime", "recare.miniworld", "recare.miniworld.world"):
        assert expected in modules
    assert "recare.__main__" not in modules


def test_every_recare_module_imports_alone():
    results = import_each_alone(recare_modules())
    failed = {m: r["error"].strip().splitlines()[-1] for m, r in results.items() if not r["ok"]}
    assert not failed, f"modules that do not import alone: {failed}"
    changed = {m: r["env"] for m, r in results.items() if r["env"]}
    assert not changed, f"importing these changed os.environ: {changed}"


def test_the_check_catches_a_cycle(tmp_path):
    """The same machinery on a two-module cycle like the old careset <-> careset_io one: it must fail."""
    package = tmp_path / "cyclepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("X = 1\nfrom cyclepkg.b import Y  # noqa: E402\n")
    (package / "b.py").write_text("from cyclepkg.a import X\nY = 2\n")
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n" + IMPORT_ONE + "print(json.dumps(report(sys.argv[1])))\n"
    assert json.loads(_python(code, "cyclepkg.a"))["ok"]  # a first: b finds X already defined
    assert not json.loads(_python(code, "cyclepkg.b"))["ok"]  # b alone: a asks b for Y before b defines it
