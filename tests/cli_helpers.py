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


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
