"""The built-in offline job: the mini-world through the whole pipeline, FT vs FT + OrthoReg, in a paper-style table.

It is an ordinary recipe (``recipes/mini.yaml`` is the same document, checked by a test), so everything it does
can be rerun piece by piece with `tvtool finetune`, `tvtool eval` and `tvtool inspect`. The OrthoReg lambda was
chosen by the sweep in ``recipes/mini-lambda-sweep.yaml`` (docs/MINI_WORLD.md has the figures).
"""
from __future__ import annotations

from pathlib import Path

from .trainconfig import FAMILY_DEFAULTS, FAMILY_FIELDS
from .defaults import ALPHA_GRID

MINI_LAMBDA = 0.1  # chosen by recipes/mini-lambda-sweep.yaml on Val (docs/MINI_WORLD.md)

# Fine-tuning settings for the tiny model: the mini-world's defaults (tvtool/trainconfig.py FAMILY_DEFAULTS, where
# the reasons are), written out in the recipe so that it reads the same as recipes/mini.yaml.
MINI_FINETUNE = {k: FAMILY_DEFAULTS["mini"][k] for k in FAMILY_FIELDS}


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


README_VARIANTS = {"ft": "FT", "ft-orthoreg": f"FT + OrthoReg (lambda {MINI_LAMBDA:g}, chosen on Val by "
                                             "`recipes/mini-lambda-sweep.yaml`)"}
MINI_WORLD_VARIANTS = {"ft": "FT", "ft-orthoreg": f"FT + OrthoReg (lambda {MINI_LAMBDA:g})"}


def _cell(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown_rows(summary: dict, *, detailed: bool = False) -> list[str]:
    """The quickstart table of README (``detailed``: docs/MINI_WORLD.md's, which adds the chosen alpha) as markdown
    rows, from what `tvtool quickstart --json` prints; tests keep both documents equal to docs/quickstart.json, the
    committed output of that command. Columns: variant, mean single-task accuracy, Abs.Acc, the paper's Norm.Acc
    (own denominators), Norm.Acc over plain FT's single-task accuracies, [alpha], Tar.Acc, Con.Acc, mean cosine."""
    zs, names = summary["zeroshot"], MINI_WORLD_VARIANTS if detailed else README_VARIANTS
    rows = [["zero-shot", "-", _cell(zs["abs_acc"]), "-", "-", *(["-"] if detailed else []),
             _cell(zs["abs_acc"]), _cell(zs["con_acc"]), "-"]]
    for key, label in names.items():
        v = summary["variants"][key]
        rows.append([label, _cell(v["finetuned_acc"]), _cell(v["abs_acc"]), _cell(v["norm_acc"]),
                     _cell(v["norm_acc_vs_baseline"]), *([_cell(v["alpha"])] if detailed else []),
                     _cell(v["tar_acc"]), _cell(v["con_acc"]), _cell(v["cosine"], 4)])
    return ["| " + " | ".join(r) + " |" for r in rows]
