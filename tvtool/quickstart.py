"""The built-in offline job: the mini-world through the whole pipeline, FT vs FT + OrthoReg, in a paper-style table.

It is an ordinary recipe (``recipes/mini.yaml`` is the same document, checked by a test), so everything it does
can be rerun piece by piece with `tvtool finetune`, `tvtool eval` and `tvtool inspect`. The OrthoReg lambda was
chosen by the sweep in ``recipes/mini-lambda-sweep.yaml`` (docs/MINI_WORLD.md has the figures).
"""
from __future__ import annotations

from pathlib import Path

from .defaults import ALPHA_GRID

MINI_LAMBDA = 0.1  # chosen by recipes/mini-lambda-sweep.yaml on Val (docs/MINI_WORLD.md)

# Fine-tuning settings for the tiny model: the protocol's shape (AdamW, wd 0.1, cosine with warm-up, clip 1.0,
# frozen head) with a learning rate, warm-up and batch (64: twice the updates per epoch) suited to a 1M-parameter
# model trained for 60-210 steps; measured in docs/MINI_WORLD.md (every task >= 80%, mean ~92%).
MINI_FINETUNE = {"lr": 1e-3, "warmup_steps": 10, "batch_size": 64}


def quickstart_recipe(size: str = "full", out_dir: str | Path = "runs/quickstart", modes: str = "full") -> dict:
    """The quickstart recipe. ``modes="all"`` adds attn, lora and linear fine-tuning, each with and without OrthoReg
    (same lambda: it was swept for full fine-tuning only), about four times the work."""
    from .datasets.mini import MINI_CONTROL, MINI_TASKS

    finetune = dict(MINI_FINETUNE)
    tasks = list(MINI_TASKS)
    grid = ALPHA_GRID
    if size == "ci":  # the same code paths, small enough for the test suite
        finetune.update(max_steps=8, warmup_steps=2)
        tasks = tasks[:3]
        grid = "0:1:0.25"
    elif size != "full":
        raise ValueError(f"unknown size {size!r}")
    if modes not in ("full", "all"):
        raise ValueError(f"unknown modes {modes!r}")
    return {
        "name": f"mini-world quickstart ({size})",
        "model": "tvtool-mini",
        "pretrained": "builtin",
        "out_dir": str(out_dir),
        "tasks": tasks,
        "finetune": finetune,
        "variants": [
            {"name": "ft", "mode": "full"},
            {"name": "ft-orthoreg", "mode": "full", "lambda": MINI_LAMBDA},
        ] + ([v for mode in ("attn", "lora", "linear") for v in (
            {"name": mode, "mode": mode}, {"name": f"{mode}-orthoreg", "mode": mode, "lambda": MINI_LAMBDA})]
            if modes == "all" else []),
        "eval": {"addition": {"grid": grid}, "negation": {"control": MINI_CONTROL, "grid": grid},
                 "cosine": True},
    }


def json_summary(results: dict) -> dict:
    """What `tvtool quickstart --json` prints: :func:`tvtool.results.summary` (accuracies in %, None where a figure was
    not computed): ``{"zeroshot": {"abs_acc", "tar_acc", "con_acc"}, "variants": {name: {"settings", "baseline",
    "abs_acc", "norm_acc", "norm_acc_vs_baseline", "finetuned_acc", "alpha", "tar_acc", "con_acc", "cosine"}}}``;
    ``finetuned_acc`` is the mean single-task test accuracy (the paper's Norm.Acc denominators),
    ``norm_acc_vs_baseline`` Norm.Acc over the single-task accuracies of the lambda-0 variant of the same mode."""
    from .results import summary

    return summary(results)
