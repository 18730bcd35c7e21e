"""Checks of numeric user options, shared by the trainer, recipes and the evaluation commands.

A NaN passes every ``<`` / ``>`` comparison unnoticed and an alpha of 1e300 turns every weight into inf, so each
number a user types goes through one of these before any work starts.
"""
from __future__ import annotations

import math

from .errors import TVToolError

# Task arithmetic uses alphas around 0..2 (disentanglement maps -3..3); far beyond this every weight overflows.
MAX_ABS_ALPHA = 1000.0


def check_finite(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """``value`` as a float if it is a finite real number in [low, high] (``(low, high]`` with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TVToolError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except OverflowError:  # an int too large for a float
        v = math.inf
    if not math.isfinite(v):
        raise TVToolError(f"{name} must be a finite number, got {value!r}")
    below = low is not None and (v <= low if low_open else v < low)
    if below or (high is not None and v > high):
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"<= {high:g}"
        raise TVToolError(f"{name} must be {' and '.join(p for p in (lo, hi) if p)}, got {value!r}")
    return v


def check_alpha(name: str, value) -> float:
    """A scaling coefficient of a task vector: finite and at most MAX_ABS_ALPHA in magnitude."""
    return check_finite(name, value, low=-MAX_ABS_ALPHA, high=MAX_ABS_ALPHA)


MAX_GRID_POINTS = 10_000


def parse_grid(text: str) -> list[float]:
    """``start:stop:step`` (inclusive of stop), a comma list ``0,0.3,0.5``, or a comma list of both
    (``0:0.3:0.01,0.35:1:0.05``: fine where the choice falls, coarse elsewhere) -> sorted unique floats."""
    text = text.strip()
    values: list[float] = []
    try:
        for piece in (p.strip() for p in text.split(",")):
            if not piece:
                continue
            if ":" not in piece:
                values.append(float(piece))
            else:
                parts = [float(p) for p in piece.split(":")]
                if len(parts) != 3:
                    raise ValueError
                start, stop, step = parts
                if not all(math.isfinite(p) for p in parts):
                    raise TVToolError(f"grid {text!r}: start, stop and step must be finite numbers, e.g. 0:1:0.05")
                if step <= 0 or stop < start:
                    raise TVToolError(f"grid {text!r}: needs start <= stop and step > 0, e.g. 0:1:0.05")
                span = (stop - start) / step  # may overflow to inf (1e308 / 1e-300): then it is far too many points
                if not span + len(values) < MAX_GRID_POINTS:
                    raise TVToolError(f"grid {text[:40]!r} has more than {MAX_GRID_POINTS} points; use a coarser step")
                n = int(math.floor(span + 1e-9)) + 1
                values += [round(start + i * step, 10) for i in range(n)]  # i*step, not repeated addition: no drift
            if len(values) > MAX_GRID_POINTS:
                raise TVToolError(f"grid {text[:40]!r}... has {len(values)} points; at most {MAX_GRID_POINTS}")
    except ValueError:
        raise TVToolError(f"cannot read grid {text!r}; write START:STOP:STEP (e.g. 0:1:0.05) or a list 0,0.3,0.5"
                          ) from None
    if not values or not all(math.isfinite(v) for v in values):
        raise TVToolError(f"grid {text!r} is empty or not finite; write START:STOP:STEP, e.g. 0:1:0.05")
    for v in values:
        check_alpha(f"grid {text!r}: alpha", v)
    return sorted(set(values))
