"""Defaults that more than one module needs, each written once here.

Training defaults live with ``TrainConfig`` (tvtool/trainconfig.py) and merge options with their method (tvtool/merge/);
this module holds the ones shared across layers: the protocol's alpha grids, where caches go, which device computes.
Nothing here imports torch at module level: every command, even ``--help``, imports this file.
"""
from __future__ import annotations

import os
from pathlib import Path

# Task addition and negation choose alpha on the Val splits from 0 to 1 in steps of 0.05 (PROTOCOL.md "Evaluation").
ALPHA_GRID = "0:1:0.05"
# Both axes of the weight-disentanglement map: -2 .. 2, 9 points.
DISENTANGLEMENT_GRID = "-2:2:0.5"


def cache_root() -> Path:
    """Where tvtool caches what it can rebuild (heads, decoded datasets, metrics): ``$TVTOOL_CACHE``, else
    ``~/.cache/tvtool``."""
    return Path(os.environ.get("TVTOOL_CACHE") or "~/.cache/tvtool").expanduser()


def default_device() -> str:
    """"cuda" when a GPU is available, else "cpu" (imports torch: only code that computes calls it)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
