"""Loading a peer library's source files (FusionBench's) by path under stand-in modules, leaving ``sys.modules``
as it was."""
from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from typing import Iterable, Iterator


@contextlib.contextmanager
def sys_modules_restored(names: Iterable[str]) -> Iterator[None]:
    """Inside: set or stub ``sys.modules[name]`` freely for these names; on exit each is put back as it was (or
    removed), so the stubs leave no trace beyond the loaded modules' own globals."""
    saved = {name: sys.modules.get(name) for name in names}
    try:
        yield
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


def load_by_path(name: str, path: Path, *, register: bool = True):
    """Execute the file at ``path`` as module ``name`` (registered in ``sys.modules`` first, so its relative and
    self-imports resolve, unless ``register`` is False)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
