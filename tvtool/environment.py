"""Checks of the installed packages that tvtool cannot work around.

torchvision is built against one torch release; a pair that does not match (or a torchvision whose C extension is
missing) fails at ``import torchvision`` with errors such as "operator torchvision::nms does not exist". Images are
decoded in worker threads that skip unreadable files, so left alone that failure reads as "skipped 20 of 20
unreadable images ... re-download the data". :func:`require_torchvision` names the real problem once, before any
image is touched; the CLI turns the same failure met anywhere else (open_clip imports torchvision) into that line.
"""
from __future__ import annotations

import functools
from importlib import metadata

from .errors import TVToolError


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "(not installed)"


@functools.lru_cache(maxsize=None)
def torchvision_problem() -> str | None:
    """Why torchvision cannot be imported with the installed torch, or None when it can."""
    try:
        import torchvision  # noqa: F401
        import torchvision.transforms.functional  # noqa: F401  what the image decoding uses
    except Exception as exc:  # RuntimeError (missing operators), ImportError, OSError (a broken .so): all fatal
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        return f"{type(exc).__name__}: {first}"
    return None


def torchvision_error(problem: str) -> TVToolError:
    return TVToolError(f"torchvision {_version('torchvision')} cannot be loaded with torch {_version('torch')} "
                       f"({problem}); the two are built for each other: reinstall the matching pair, e.g. pip "
                       "install --force-reinstall torch torchvision (from the same index URL)")


def require_torchvision() -> None:
    problem = torchvision_problem()
    if problem is not None:
        raise torchvision_error(problem)
