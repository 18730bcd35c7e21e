"""Running the installed `tvtool` entry point in a subprocess, on this checkout's code."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def entry_point() -> str:
    """The console script pip installed beside this interpreter (what a user runs), not `python -m tvtool`."""
    found = Path(sys.executable).with_name("tvtool")
    if found.exists():
        return str(found)
    which = shutil.which("tvtool")
    assert which, "the `tvtool` entry point is not installed: pip install -e ."
    return which


def run_tvtool(*args, cwd=None, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """``tvtool ARGS`` (paths are turned into text) with this checkout first on the path; ``env`` adds variables."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "COLUMNS": "120", "NO_COLOR": "1", **(env or {})}
    return subprocess.run([entry_point(), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def run_tvtool_patient(*args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """:func:`run_tvtool` with room for a loaded machine: a command that must fail at once still starts Python and
    imports its modules first."""
    return run_tvtool(*args, timeout=timeout, **kw)


def assert_one_line(r: subprocess.CompletedProcess, *needles: str) -> None:
    """A refused command: exit 1, exactly one ``error: `` line on stderr (no traceback), naming ``needles``."""
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
