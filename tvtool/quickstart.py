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


def summarize(results: dict) -> list[dict]:
    """A zero-shot row (theta_0 itself; from the negation results, which measure it), then one row per variant:
    Abs.Acc, Norm.Acc (addition), Tar.Acc, Con.Acc (negation), mean inter-task cosine."""
    rows = []
    zs = zeroshot_row(results)
    if zs is not None:
        rows.append(zs)
    for name, res in results["variants"].items():
        add = res.get("addition") or {}
        neg = res.get("negation") or {}
        rows.append({"variant": name, "abs_acc": add.get("abs_acc"), "norm_acc": add.get("norm_acc"),
                     "alpha": add.get("alpha"), "tar_acc": neg.get("tar_acc"), "con_acc": neg.get("con_acc"),
                     "negation_qualified": f"{neg.get('qualified', 0)}/{neg.get('tasks', 0)}",
                     "cosine": (res.get("cosine") or {}).get("mean")})
    return rows


def json_summary(results: dict) -> dict:
    """What `tvtool quickstart --json` prints: accuracies in %, cosine as is, None where a figure was not computed.
    ``{"zeroshot": {"abs_acc", "con_acc"}, "variants": {name: {"abs_acc", "norm_acc", "finetuned_acc", "alpha",
    "tar_acc", "con_acc", "cosine"}}}``; ``finetuned_acc`` is the mean single-task test accuracy (Norm.Acc's
    denominators)."""
    def pct(x):
        return None if x is None else 100 * x

    zs = zeroshot_row(results)
    variants = {}
    for name, res in results["variants"].items():
        add = res.get("addition") or {}
        neg = res.get("negation") or {}
        ft = (add.get("finetuned_acc") or {}).get((add.get("splits") or {}).get("report")) or {}
        variants[name] = {
            "abs_acc": pct(add.get("abs_acc")), "norm_acc": pct(add.get("norm_acc")),
            "finetuned_acc": pct(sum(ft.values()) / len(ft)) if ft else None, "alpha": add.get("alpha"),
            "tar_acc": pct(neg.get("tar_acc")), "con_acc": pct(neg.get("con_acc")),
            "cosine": (res.get("cosine") or {}).get("mean")}
    return {"zeroshot": {"abs_acc": pct(zs["abs_acc"]) if zs else None, "con_acc": pct(zs["con_acc"]) if zs else None},
            "variants": variants}


def zeroshot_row(results: dict) -> dict | None:
    """The pre-trained model's own figures: mean zero-shot test accuracy over the tasks (its Abs.Acc and its Tar.Acc)
    and the control task's zero-shot test accuracy; None when no variant ran negation."""
    for res in results["variants"].values():
        per_task = (res.get("negation") or {}).get("per_task") or []
        if per_task:
            target = [r["zeroshot"]["target_test_acc"] for r in per_task]
            control = [r["zeroshot"]["control_test_acc"] for r in per_task]
            mean = sum(target) / len(target)
            return {"variant": "zero-shot", "abs_acc": mean, "norm_acc": None, "alpha": None, "tar_acc": mean,
                    "con_acc": sum(control) / len(control), "negation_qualified": "-", "cosine": None}
    return None


README_VARIANTS = {"ft": "FT", "ft-orthoreg": f"FT + OrthoReg (lambda {MINI_LAMBDA:g}, chosen on Val by "
                                             "`recipes/mini-lambda-sweep.yaml`)"}
MINI_WORLD_VARIANTS = {"ft": "FT", "ft-orthoreg": f"FT + OrthoReg (lambda {MINI_LAMBDA:g})"}


def _cell(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown_rows(summary: dict, *, detailed: bool = False) -> list[str]:
    """The quickstart table of README (``detailed``: docs/MINI_WORLD.md's, with single-task FT and alpha) as
    markdown rows, from what `tvtool quickstart --json` prints; tests keep both documents equal to
    docs/quickstart.json, the committed output of that command."""
    zs, names = summary["zeroshot"], MINI_WORLD_VARIANTS if detailed else README_VARIANTS
    rows = [["zero-shot", *(["-"] if detailed else []), _cell(zs["abs_acc"]), "-", *(["-"] if detailed else []),
             _cell(zs["abs_acc"]), _cell(zs["con_acc"]), "-"]]
    for key, label in names.items():
        v = summary["variants"][key]
        rows.append([label, *([_cell(v["finetuned_acc"])] if detailed else []), _cell(v["abs_acc"]),
                     _cell(v["norm_acc"]), *([_cell(v["alpha"])] if detailed else []), _cell(v["tar_acc"]),
                     _cell(v["con_acc"]), _cell(v["cosine"], 4)])
    return ["| " + " | ".join(r) + " |" for r in rows]
