"""The paper's Table 1 in miniature, from recipes/mini-paper.yaml: lambda per mode, the further seeds, the table.

    tvtool run recipes/mini-paper.yaml && python scripts/mini_paper_table.py [recipes/mini-paper.yaml]

The recipe (with `seeds:`; stage 1) fine-tunes the 8 mini tasks in each mode (full, attn, lora, linear) with lambda 0
and with the OrthoReg candidates and runs task addition on each. This script then

1. chooses lambda per mode on Val only: the candidate (lambda > 0) whose merged model has the highest Val accuracy at
   its Val-chosen alpha, averaged over the recipe's seeds (the rule of scripts/choose_mini_lambda.py; test figures
   play no part);
2. writes the lambda-0 and the chosen variant of each mode as a recipe, OUT_DIR/seeds.yaml, with the recipe's seeds
   and the further ones (``--seeds``, default 1,2), and runs it like `tvtool run` (same out_dir: the stage-1 runs are
   kept, only the further seeds train);
3. reports, from that run's summary (tvtool.results), test Abs.Acc, the paper's Norm.Acc, Norm.Acc over plain FT's
   single-task accuracies (the fixed denominator) and the single-task accuracy, mean +- sample std over the seeds,
   and OrthoReg minus FT paired by seed (mean, SE, t; beyond noise when |t| exceeds the two-sided 5% critical value
   of Student's t with n - 1 degrees of freedom: 4.30 for 3 seeds);
4. adds the column-orthogonality statistic of `tvtool inspect --ortho` (per 2-D tensor of an update, the mean
   |angle - 90 deg| between pairs of its columns, averaged over the tensors and then over the 8 task vectors;
   lower = more orthogonal: the property dW^T dW ~ I that OrthoReg enforces) and the vectors' mean L2 norm, for
   every seed, and the weight-disentanglement error xi (`tvtool eval disentanglement`, mean over the alpha grid) of
   one task pair at the lowest seed; both are computed here on first use and stored beside the vectors (ortho.json,
   disentanglement-A-B.json), recomputed when the vectors change.

Prints the markdown table; writes the same figures as JSON (default OUT_DIR/table.json, replaced each run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Disentanglement is measured on one pair: the two digit tasks share their ten classes' meaning but not their
# images, so they are the pair most likely to interfere when added (and the two hardest tasks to fine-tune).
DEFAULT_PAIR = ("mini-digits", "mini-mnist")
DEFAULT_GRID = "0:1:0.5"  # the addition range; `tvtool eval disentanglement`'s -2:2:0.5 (81 points) costs ~1 min a pair
DEFAULT_SEEDS = "1,2"  # with the recipe's seed 0: 3 seeds per reported arm
SHOWN = ("finetuned_acc", "abs_acc", "norm_acc", "norm_acc_vs_baseline")  # per arm, mean +- std over seeds
DIFFS = ("abs_acc", "norm_acc_vs_baseline", "norm_acc", "finetuned_acc")  # OrthoReg - FT, paired by seed


def addition_figures(res: dict) -> dict:
    """From one addition result: the selection figure (mean Val accuracy of the merged model at the alpha chosen on
    Val) and the test figures (fractions)."""
    at = next(p for p in res["curve"] if p["alpha"] == res["alpha"])
    report = res["splits"]["report"]
    ft = res["finetuned_acc"][report]
    return {"val_acc": at["mean_val_acc"], "abs_acc": res["abs_acc"], "norm_acc": res["norm_acc"],
            "alpha": res["alpha"], "finetuned_acc": sum(ft.values()) / len(ft)}


def _fingerprints(paths: list[Path]) -> list[str]:
    from tvtool.taskvector import open_vector

    return [open_vector(p).fingerprint for p in paths]


def _stored(path: Path, key: dict, compute: bool) -> dict | None:
    """A stored extra result whose key matches (any stored one when not computing), else None."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if compute and doc.get("key") != key:
        return None
    return doc


def ortho_figures(recipe, variant, compute: bool) -> tuple[float | None, float | None]:
    """(mean over the variant's task vectors of `inspect --ortho`'s per-vector mean |angle - 90 deg|, mean L2 norm
    of the vectors); the norm matters for reading xi, which is measured at fixed alphas."""
    from tvtool.evaluate import write_json

    paths = [recipe.output(variant, t) for t in recipe.tasks]
    out = recipe.out_dir / variant.name / "ortho.json"
    key = {"vectors": _fingerprints(paths)} if compute else {}
    doc = _stored(out, key, compute)
    if doc is not None and compute and "mean_norm" not in doc:  # stored by an earlier version of this script
        doc = None
    if doc is None and compute:
        from tvtool import inspection

        res = inspection.compare(paths, ortho=True)
        per_vector = res["ortho_mean_abs_dev_deg"]
        doc = {"key": key, "tasks": recipe.tasks, "mean_abs_dev_deg": per_vector,
               "mean": sum(per_vector) / len(per_vector), "norms": res["norms"],
               "mean_norm": sum(res["norms"]) / len(res["norms"])}
        write_json(doc, out, force=True)
    return (None, None) if doc is None else (doc["mean"], doc.get("mean_norm"))


def disentanglement_figure(recipe, variant, pair: tuple[str, str], grid: str, compute: bool) -> float | None:
    """Mean of xi(a1, a2) over the grid for the pair's two vectors of this variant (test split)."""
    from tvtool import evaluate

    paths = [recipe.output(variant, t) for t in pair]
    out = recipe.out_dir / variant.name / f"disentanglement-{pair[0]}-{pair[1]}.json"
    key = {"vectors": _fingerprints(paths), "grid": grid} if compute else {}
    doc = _stored(out, key, compute)
    if doc is None and compute:
        from tvtool.models import load_clip

        vecs = evaluate.open_vectors(paths)
        bundle = load_clip(recipe.model or vecs[0].meta["base"]["model"],
                           recipe.pretrained or vecs[0].meta["base"]["pretrained"])
        ev = evaluate.Evaluator(bundle, list(pair), recipe.data_root, splits=["test"],
                                linearized=evaluate.wants_linearized(vecs))
        doc = evaluate.disentanglement(ev, vecs[0], vecs[1], evaluate.parse_grid(grid))
        doc["key"] = key
        evaluate.write_json(doc, out, force=True)
    return None if doc is None else doc["mean_error"]


def group_modes(recipe) -> dict:
    """mode -> lambda -> the recipe variant (group) name, with a lambda-0 arm and a candidate in every mode."""
    from tvtool.errors import TVToolError
    from tvtool.results import describe_runs

    if not recipe.seeds:
        raise TVToolError(f"{recipe.path}: the table needs a recipe with `seeds:` (e.g. seeds: [0]); its runs then "
                          "live in OUT_DIR/VARIANT/seed-S/")
    modes: dict = {}
    for name, run in describe_runs(recipe).items():
        by_lam = modes.setdefault(run["mode"], {})
        if by_lam.setdefault(run["lambda"], run["group"]) != run["group"]:
            raise TVToolError(f"{recipe.path}: variants {by_lam[run['lambda']]} and {run['group']} are both mode "
                              f"{run['mode']}, lambda {run['lambda']:g}; keep one per (mode, lambda)")
    for mode, by_lam in modes.items():
        if 0.0 not in by_lam or len(by_lam) < 2:
            raise TVToolError(f"{recipe.path}: mode {mode} needs a lambda-0 variant and at least one lambda > 0")
    return modes


def read_results(recipe, hint: str) -> dict:
    """What `run_recipe` would return for a finished recipe, from its stored addition results (nothing computed)."""
    from tvtool.errors import TVToolError
    from tvtool.results import describe_runs

    variants = {}
    for v in recipe.variants:
        path = recipe.out_dir / v.name / "addition.json"
        if not path.is_file():
            raise TVToolError(f"{path}: missing; {hint}")
        variants[v.name] = {"addition": json.loads(path.read_text())}
    return {"recipe": recipe.path, "variants": variants, "runs": describe_runs(recipe), "seeds": recipe.seeds}


def choose_lambdas(recipe, results: dict) -> tuple[dict[str, float], dict]:
    """Per mode, the lambda > 0 whose merged model has the highest mean Val accuracy at its Val-chosen alpha over
    the recipe's seeds (ties: the smallest lambda). Returns (mode -> lambda, mode -> {lambda: selection figures})."""
    from tvtool.results import mean_std

    runs = results["runs"]
    chosen, scores = {}, {}
    for mode, by_lam in group_modes(recipe).items():
        scores[mode] = {}
        for lam, group in sorted(by_lam.items()):
            if lam == 0:
                continue
            figs = [addition_figures(results["variants"][name]["addition"]) for name, run in runs.items()
                    if run["group"] == group]
            val, val_std = mean_std([100 * f["val_acc"] for f in figs])  # in %, as the run summary
            scores[mode][lam] = {"val_acc": val, "val_acc_std": val_std,
                                 "abs_acc": mean_std([100 * f["abs_acc"] for f in figs])[0],
                                 "seeds": sorted(run["seed"] for run in runs.values() if run["group"] == group)}
        chosen[mode] = max(scores[mode], key=lambda lam: scores[mode][lam]["val_acc"])  # max keeps the first: smallest
    return chosen, scores


def seeds_recipe_yaml(recipe, chosen: dict[str, float], seeds: list[int]) -> str:
    """Each mode's lambda-0 and chosen variant as a recipe `tvtool run` reads: the same model, tasks, evaluation and
    out_dir (absolute), the given seeds."""
    import yaml

    keep = {group for mode, by_lam in group_modes(recipe).items() for lam, group in by_lam.items()
            if lam in (0.0, chosen[mode])}
    variants, seen = [], set()
    for v in recipe.variants:
        if v.group in keep and v.group not in seen:
            seen.add(v.group)
            variants.append({"name": v.group, **{("lambda" if k == "lam" else k): val for k, val in v.settings.items()
                                                 if k != "seed"}})

    def absolute(path):  # the written recipe runs from any folder: paths that exist here are made absolute
        return os.path.abspath(path) if path is not None and os.path.exists(path) else path

    doc = {"name": f"{recipe.name or 'recipe'}: chosen lambdas, all seeds", "model": recipe.model,
           "pretrained": absolute(recipe.pretrained), "out_dir": str(recipe.out_dir.resolve()),
           "data_root": absolute(recipe.data_root), "tasks": list(recipe.tasks), "seeds": seeds,
           "variants": variants, "eval": recipe.eval}
    doc = {k: val for k, val in doc.items() if val is not None}
    return (f"# Written by scripts/mini_paper_table.py from {recipe.path}: lambda 0 and each mode's lambda chosen on "
            "Val, every seed.\n" + yaml.safe_dump(doc, sort_keys=False, width=120, default_flow_style=None))


def collect(recipe, second, results: dict, chosen: dict, scores: dict, *, pair=DEFAULT_PAIR, grid=DEFAULT_GRID,
            compute: bool = True, log=print) -> dict:
    """Everything the table shows, as a JSON-ready dict (accuracies in %, as in the run summary)."""
    from tvtool.results import mean_std, summary

    summ = summary(results)
    groups = summ["groups"]
    variants = {v.name: v for v in second.variants}
    modes = {}
    for mode, by_lam in group_modes(recipe).items():
        arms = {}
        for key, lam in (("ft", 0.0), ("orthoreg", chosen[mode])):
            g = groups[by_lam[lam]]
            arm = {"lambda": lam, "group": by_lam[lam], "seeds": g["seeds"], "variants": g["variants"],
                   "settings": g["settings"]}
            for m in SHOWN:
                arm[m], arm[f"{m}_std"] = g["figures"][m]["mean"], g["figures"][m]["std"]
                arm[f"{m}_per_seed"] = g["figures"][m]["per_seed"]
            orth, norms = [], []
            for name in g["variants"]:
                if compute:
                    log(f"{name}: column orthogonality")
                o, n = ortho_figures(second, variants[name], compute)
                orth.append(o)
                norms.append(n)
            arm["ortho_deg_per_seed"], arm["norm_per_seed"] = orth, norms
            arm["ortho_deg"], arm["ortho_deg_std"] = mean_std([o for o in orth if o is not None])
            arm["norm"], arm["norm_std"] = mean_std([n for n in norms if n is not None])
            first = g["variants"][g["seeds"].index(min(g["seeds"]))]
            if compute:
                log(f"{first}: disentanglement {pair[0]} x {pair[1]}")
            arm["xi_seed"] = min(g["seeds"])
            arm["xi"] = disentanglement_figure(second, variants[first], pair, grid, compute)
            arms[key] = arm
        paired = groups[by_lam[chosen[mode]]]["paired_vs_baseline"] or {}
        modes[mode] = {"candidates": {f"{lam:g}": sc for lam, sc in scores[mode].items()},
                       "chosen_lambda": chosen[mode], **arms, "paired": {m: paired.get(m) for m in DIFFS}}
    return {"recipe": recipe.path, "tasks": recipe.tasks, "pair": list(pair), "grid": grid,
            "rule": {"lambda": "per mode, the lambda > 0 with the highest Val accuracy of the merged model at its "
                               "Val-chosen alpha, mean over the recipe's seeds",
                     "noise": "OrthoReg minus FT per seed; beyond noise when |mean / SE| exceeds the two-sided 5% "
                              "critical value of Student's t with n - 1 degrees of freedom (SE = sd / sqrt(n))"},
            "modes": modes}


def _pm(m, s, digits=2) -> str:
    if m is None:
        return "-"
    return f"{m:.{digits}f}" + ("" if s is None else f" +- {s:.{digits}f}")


def markdown(table: dict) -> str:
    pair = " x ".join(table["pair"])
    lines = [f"| mode | variant | lambda | single-task | Abs.Acc | Norm.Acc (own) | Norm.Acc vs FT | column "
             f"orthogonality (mean abs(angle - 90 deg)) | mean vector norm | xi ({pair}, lowest seed) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, m in table["modes"].items():
        for label, key in (("FT", "ft"), ("FT + OrthoReg", "orthoreg")):
            a = m[key]
            lines.append(f"| {mode} | {label} | {a['lambda']:g} | "
                         + " | ".join(_pm(a[k], a[f"{k}_std"]) for k in SHOWN)
                         + f" | {_pm(a['ortho_deg'], a['ortho_deg_std'])} | {_pm(a['norm'], a['norm_std'])} | "
                         f"{'-' if a['xi'] is None else format(a['xi'], '.3f')} |")
    lines += ["", "Lambda chosen on Val (the merged model's Val accuracy at its Val-chosen alpha, mean over the "
                  "recipe's seeds):",
              "", "| mode | seeds | lambda: Val acc (test Abs.Acc) | chosen |", "|---|---|---|---|"]
    for mode, m in table["modes"].items():
        cells = ", ".join(f"{lam}: {_pm(c['val_acc'], c['val_acc_std'])} ({_pm(c['abs_acc'], None)})"
                          for lam, c in m["candidates"].items())
        seeds = ", ".join(map(str, next(iter(m["candidates"].values()))["seeds"]))
        lines.append(f"| {mode} | {seeds} | {cells} | {m['chosen_lambda']:g} |")
    lines += ["", f"OrthoReg minus FT, paired by seed: mean (SE, t); rule: {table['rule']['noise']}.", "",
              "| mode | pairs | " + " | ".join(("Abs.Acc", "Norm.Acc vs FT", "Norm.Acc (own)", "single-task"))
              + " | Abs.Acc beyond noise |", "|---|---|---|---|---|---|---|"]

    def cell(d):
        if not d or d["mean"] is None:
            return "-"
        return f"{d['mean']:+.2f}" + ("" if d["se"] is None else
                                      f" ({d['se']:.2f}, {'-' if d['t'] is None else format(d['t'], '+.2f')})")

    for mode, m in table["modes"].items():
        p = m["paired"]
        n = (p.get("abs_acc") or {}).get("n", "-")
        verdict = {True: "yes", False: "no", None: "-"}[(p.get("abs_acc") or {}).get("beyond_noise")]
        lines.append(f"| {mode} | {n} | " + " | ".join(cell(p.get(k)) for k in DIFFS) + f" | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from tvtool.errors import TVToolError
    from tvtool.fileio import atomic_path
    from tvtool.recipes import load_recipe, run_recipe

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", nargs="?", default="recipes/mini-paper.yaml")
    p.add_argument("--seeds", default=DEFAULT_SEEDS,
                   help="the further seeds of lambda 0 and of the chosen lambda, comma-separated ('' for none)")
    p.add_argument("--json-out", type=Path, help="where the JSON goes (default OUT_DIR/table.json)")
    p.add_argument("--pair", default=",".join(DEFAULT_PAIR), help="the disentanglement pair, TASK1,TASK2")
    p.add_argument("--grid", default=DEFAULT_GRID, help="the disentanglement alpha grid (START:STOP:STEP)")
    p.add_argument("--no-compute", action="store_true",
                   help="train and compute nothing, only read stored results (orthogonality / disentanglement "
                        "figures not stored show as -)")
    args = p.parse_args(argv)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    try:
        recipe = load_recipe(args.recipe)
        pair = tuple(args.pair.split(","))
        if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(recipe.tasks):
            raise TVToolError(f"--pair {args.pair}: give two different tasks of the recipe, TASK1,TASK2")
        try:
            further = {int(x) for x in args.seeds.split(",") if x.strip()}
            if any(x < 0 for x in further):
                raise ValueError
        except ValueError:
            raise TVToolError(f"--seeds {args.seeds!r}: give whole numbers >= 0, comma-separated (e.g. 1,2)") from None
        group_modes(recipe)
        chosen, scores = choose_lambdas(recipe, read_results(recipe, f"run `tvtool run {recipe.path}` first"))
        seeds = sorted(set(recipe.seeds) | further)
        path = recipe.out_dir / "seeds.yaml"
        text = seeds_recipe_yaml(recipe, chosen, seeds)
        if args.no_compute:
            from tvtool.recipes import parse_recipe
            import yaml

            second = parse_recipe(yaml.safe_load(text), str(path))
            results = read_results(second, f"run `python scripts/mini_paper_table.py {recipe.path}` without "
                                           "--no-compute to train it")
        else:
            recipe.out_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(path, force=True) as tmp:  # the script owns this file: rewritten from the current choice
                tmp.write_text(text)
            log(f"lambda per mode {chosen}; seeds {seeds}: {path}")
            second = load_recipe(path)
            results = run_recipe(second, quiet=True, log=log)
        table = collect(recipe, second, results, chosen, scores, pair=pair, grid=args.grid,
                        compute=not args.no_compute, log=log)
        out = args.json_out or recipe.out_dir / "table.json"
        from tvtool.evaluate import write_json

        write_json(table, out, force=True)
    except TVToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(markdown(table))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
