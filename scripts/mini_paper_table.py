"""The paper's Table 1 in miniature, from recipes/mini-paper.yaml: lambda per mode, the further seeds, the table.

    tvtool run recipes/mini-paper.yaml && python scripts/mini_paper_table.py [recipes/mini-paper.yaml]

The recipe fine-tunes the 8 mini tasks in each mode (full, attn, lora, linear) with lambda 0 and with the OrthoReg
candidates at seed 0 and runs task addition on each. This script then

1. chooses lambda per mode on Val only: the candidate (lambda > 0) whose merged model has the highest Val accuracy at
   its Val-chosen alpha, averaged over the seeds at which every candidate ran (the recipe's seed 0; the rule of
   scripts/choose_mini_lambda.py; test figures play no part);
2. trains and evaluates the further seeds (``--seeds``, default 1,2) of lambda 0 (FT) and of the chosen lambda
   (FT + OrthoReg): it writes them as a recipe, OUT_DIR/seeds.yaml, and runs it (outputs already made with the same
   settings are kept, as in `tvtool run`);
3. reports test Abs.Acc and Norm.Acc, mean +- sample std over the seeds, for FT and FT + OrthoReg;
4. adds the column-orthogonality statistic of `tvtool inspect --ortho` (per 2-D tensor of an update, the mean
   |angle - 90 deg| between pairs of its columns, averaged over the tensors and then over the 8 task vectors;
   lower = more orthogonal: the property dW^T dW ~ I that OrthoReg enforces) and the vectors' mean L2 norm, for
   every seed, and the weight-disentanglement error xi (`tvtool eval disentanglement`, mean over the alpha grid) of
   one task pair at the lowest seed; both are computed here on first use and stored beside the vectors (ortho.json,
   disentanglement-A-B.json), recomputed when the vectors change;
5. says per mode whether OrthoReg's effect exceeds seed noise, by a stated rule: |mean difference| > 2 standard
   errors of the difference, SE = sqrt(s_FT^2 / n_FT + s_OR^2 / n_OR) (Welch's t > 2; with 3 seeds a lenient bar,
   two-sided p about 0.1).

A recipe that already runs every seed of every candidate needs no second stage: lambda is then chosen on the mean
over all seeds. Prints the markdown table; writes the same figures as JSON (default OUT_DIR/table.json, replaced
each run).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

# Disentanglement is measured on one pair: the two digit tasks share their ten classes' meaning but not their
# images, so they are the pair most likely to interfere when added (and the two hardest tasks to fine-tune).
DEFAULT_PAIR = ("mini-digits", "mini-mnist")
DEFAULT_GRID = "0:1:0.5"  # the addition range; `tvtool eval disentanglement`'s -2:2:0.5 (81 points) costs ~1 min a pair
NOISE_SE = 2.0  # the verdict's bar, in standard errors of the difference
DEFAULT_SEEDS = "1,2"  # with the recipe's seed 0: 3 seeds per reported arm


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for fewer than two values."""
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def noise_verdict(ft: list[float], orth: list[float], bar: float = NOISE_SE) -> dict:
    """Does mean(orth) - mean(ft) exceed seed noise? |diff| > bar * sqrt(s_ft^2/n_ft + s_orth^2/n_orth)."""
    m_ft, s_ft = mean_std(ft)
    m_or, s_or = mean_std(orth)
    if s_ft is None or s_or is None:
        return {"diff": None if m_ft is None or m_or is None else m_or - m_ft, "se": None, "t": None,
                "exceeds_noise": None}
    diff = m_or - m_ft
    se = math.sqrt(s_ft ** 2 / len(ft) + s_or ** 2 / len(orth))
    if se == 0:  # identical runs in both arms: any difference at all exceeds a noise of zero
        return {"diff": diff, "se": 0.0, "t": None, "exceeds_noise": diff != 0}
    return {"diff": diff, "se": se, "t": diff / se, "exceeds_noise": abs(diff) > bar * se}


def addition_figures(path: Path) -> dict:
    """From one addition.json: the selection figure (mean Val accuracy of the merged model at the alpha chosen on
    Val) and the test figures."""
    res = json.loads(path.read_text())
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


def group_runs(recipe) -> dict:
    """mode -> lambda -> seed -> variant, with both arms present in every mode."""
    from tvtool.errors import TVToolError

    runs: dict = {}
    for v in recipe.variants:
        mode, lam = v.settings.get("mode", "full"), float(v.settings.get("lam", 0.0))
        seed = int(v.settings.get("seed", recipe.seed))
        if seed in runs.setdefault(mode, {}).setdefault(lam, {}):
            raise TVToolError(f"{recipe.path}: two variants for mode {mode}, lambda {lam:g}, seed {seed}")
        runs[mode][lam][seed] = v
    for mode, by_lam in runs.items():
        if 0.0 not in by_lam or len(by_lam) < 2:
            raise TVToolError(f"{recipe.path}: mode {mode} needs a lambda-0 arm and at least one lambda > 0")
    return runs


def _arm(recipe, lam: float, by_seed: dict, hint: str) -> dict:
    from tvtool.errors import TVToolError

    seeds = sorted(by_seed)
    figs = []
    for s in seeds:
        path = recipe.out_dir / by_seed[s].name / "addition.json"
        if not path.is_file():
            raise TVToolError(f"{path}: missing; {hint}")
        figs.append(addition_figures(path))
    arm = {"lambda": lam, "seeds": seeds, "variants": [by_seed[s].name for s in seeds], "per_seed": figs}
    for k in ("val_acc", "abs_acc", "norm_acc", "finetuned_acc"):
        arm[k], arm[f"{k}_std"] = mean_std([f[k] for f in figs])
    return arm


def select_lambda(arms: dict) -> tuple[dict, list[int], dict]:
    """The rule: among the lambda > 0 arms, the highest mean Val accuracy over the seeds every candidate ran
    (ties: the smallest lambda). Returns (the chosen arm, those seeds, lambda -> its selection figures)."""
    from tvtool.errors import TVToolError

    candidates = {lam: a for lam, a in sorted(arms.items()) if lam > 0}
    common = sorted(set.intersection(*(set(a["seeds"]) for a in candidates.values())))
    if not common:
        raise TVToolError(f"no seed at which every lambda candidate ran ({sorted(candidates)}); run them at one "
                          "shared seed")
    scores = {}
    for lam, a in candidates.items():
        at = [f for s, f in zip(a["seeds"], a["per_seed"]) if s in common]
        scores[lam] = {"val_acc": mean_std([f["val_acc"] for f in at]), "abs_acc": mean_std([f["abs_acc"] for f in at])}
    best = max(candidates, key=lambda lam: scores[lam]["val_acc"][0])  # max keeps the first of equals: smallest
    return candidates[best], common, scores


def choose_lambdas(recipe, hint: str) -> dict[str, float]:
    """The chosen lambda per mode from the recipe's own runs (stage 1)."""
    runs = group_runs(recipe)
    return {mode: select_lambda({lam: _arm(recipe, lam, by_seed, hint) for lam, by_seed in by_lam.items()})[0]
            ["lambda"] for mode, by_lam in runs.items()}


def plan_seeds(recipe, chosen: dict[str, float], seeds: list[int]) -> list:
    """Variants for the seeds of lambda 0 and of each mode's chosen lambda that the recipe does not run yet: the
    settings of that arm's first run with another seed."""
    from tvtool.recipes import Variant

    runs = group_runs(recipe)
    names = {v.name for v in recipe.variants}
    planned = []
    for mode, by_lam in runs.items():
        for lam in (0.0, chosen[mode]):
            first = by_lam[lam][min(by_lam[lam])]
            for seed in seeds:
                if seed in by_lam[lam]:
                    continue
                name = f"{mode}-lam{lam:g}-s{seed}"
                while name in names:
                    name += "-seed"
                names.add(name)
                planned.append(Variant(name, {**first.settings, "seed": seed}))
    return planned


def seeds_recipe_yaml(recipe, variants: list) -> str:
    """The planned variants as a recipe that `tvtool run` reads (same model, tasks, evaluation; absolute out_dir)."""
    import yaml

    def absolute(path):  # the written recipe runs from any folder: paths that exist here are made absolute
        return os.path.abspath(path) if path is not None and os.path.exists(path) else path

    doc = {"name": f"{recipe.name or 'recipe'}: further seeds", "model": recipe.model,
           "pretrained": absolute(recipe.pretrained), "out_dir": str(recipe.out_dir.resolve()),
           "data_root": absolute(recipe.data_root), "tasks": list(recipe.tasks),
           "seed": recipe.seed,
           "variants": [{"name": v.name, **{("lambda" if k == "lam" else k): val for k, val in v.settings.items()}}
                        for v in variants],
           "eval": recipe.eval}
    doc = {k: val for k, val in doc.items() if val is not None}
    return (f"# Written by scripts/mini_paper_table.py from {recipe.path}: the further seeds of lambda 0 and of each "
            "mode's lambda chosen on Val.\n" + yaml.safe_dump(doc, sort_keys=False, width=120, default_flow_style=None))


def collect(recipe, *, pair=DEFAULT_PAIR, grid=DEFAULT_GRID, compute: bool = True, log=print,
            hint: str | None = None) -> dict:
    """Everything the table shows, as a JSON-ready dict (accuracies as fractions, as in the result files)."""
    runs = group_runs(recipe)
    hint = hint or f"run `tvtool run {recipe.path}` first"
    modes = {}
    for mode, by_lam in runs.items():
        arms = {lam: _arm(recipe, lam, by_seed, hint) for lam, by_seed in sorted(by_lam.items())}
        chosen, selection_seeds, scores = select_lambda(arms)
        shown = {"ft": arms[0.0], "orthoreg": chosen}
        for arm in shown.values():
            by_seed = runs[mode][arm["lambda"]]
            orth, norms = [], []
            for s in arm["seeds"]:
                if compute:
                    log(f"{mode} lambda {arm['lambda']:g} seed {s}: column orthogonality")
                o, n = ortho_figures(recipe, by_seed[s], compute)
                orth.append(o)
                norms.append(n)
            arm["ortho_deg_per_seed"], arm["norm_per_seed"] = orth, norms
            arm["ortho_deg"], arm["ortho_deg_std"] = mean_std([o for o in orth if o is not None])
            arm["norm"], arm["norm_std"] = mean_std([n for n in norms if n is not None])
            s0 = arm["seeds"][0]
            if compute:
                log(f"{mode} lambda {arm['lambda']:g} seed {s0}: disentanglement {pair[0]} x {pair[1]}")
            arm["xi_seed"] = s0
            arm["xi"] = disentanglement_figure(recipe, by_seed[s0], pair, grid, compute)
        modes[mode] = {
            "candidates": {f"{lam:g}": {"val_acc": sc["val_acc"][0], "val_acc_std": sc["val_acc"][1],
                                        "abs_acc": sc["abs_acc"][0], "seeds": selection_seeds}
                           for lam, sc in scores.items()},
            "chosen_lambda": chosen["lambda"], "ft": shown["ft"], "orthoreg": shown["orthoreg"],
            "verdict": {k: noise_verdict([f[k] for f in shown["ft"]["per_seed"]],
                                         [f[k] for f in shown["orthoreg"]["per_seed"]])
                        for k in ("abs_acc", "norm_acc")},
        }
    return {"recipe": recipe.path, "tasks": recipe.tasks, "pair": list(pair), "grid": grid,
            "rule": {"lambda": "per mode, the lambda > 0 with the highest Val accuracy of the merged model at its "
                               "Val-chosen alpha, mean over the seeds at which every candidate ran",
                     "noise": f"|mean(FT+OrthoReg) - mean(FT)| > {NOISE_SE:g} * sqrt(s1^2/n1 + s2^2/n2) "
                              "(sample std over seeds)"},
            "modes": modes}


def _pm(m, s, scale=100.0, digits=2) -> str:
    if m is None:
        return "-"
    return f"{scale * m:.{digits}f}" + ("" if s is None else f" +- {scale * s:.{digits}f}")


def markdown(table: dict) -> str:
    pair = " x ".join(table["pair"])
    lines = [f"| mode | variant | lambda | single-task FT | Abs.Acc | Norm.Acc | column orthogonality "
             f"(mean abs(angle - 90 deg)) | mean vector norm | xi ({pair}, lowest seed) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, m in table["modes"].items():
        for label, key in (("FT", "ft"), ("FT + OrthoReg", "orthoreg")):
            a = m[key]
            lines.append(f"| {mode} | {label} | {a['lambda']:g} | {_pm(a['finetuned_acc'], a['finetuned_acc_std'])} | "
                         f"{_pm(a['abs_acc'], a['abs_acc_std'])} | {_pm(a['norm_acc'], a['norm_acc_std'])} | "
                         f"{_pm(a['ortho_deg'], a['ortho_deg_std'], 1.0)} | {_pm(a['norm'], a['norm_std'], 1.0)} | "
                         f"{'-' if a['xi'] is None else format(a['xi'], '.3f')} |")
    lines += ["", "Lambda chosen on Val (the merged model's Val accuracy at its Val-chosen alpha, mean over the seeds at "
                  "which every candidate ran):",
              "", "| mode | seeds | lambda: Val acc (test Abs.Acc) | chosen |", "|---|---|---|---|"]
    for mode, m in table["modes"].items():
        cells = ", ".join(f"{lam}: {_pm(c['val_acc'], c['val_acc_std'])} ({_pm(c['abs_acc'], None)})"
                          for lam, c in m["candidates"].items())
        seeds = ", ".join(map(str, next(iter(m["candidates"].values()))["seeds"]))
        lines.append(f"| {mode} | {seeds} | {cells} | {m['chosen_lambda']:g} |")
    lines += ["", f"Does OrthoReg's effect exceed seed noise? Rule: {table['rule']['noise']}.", "",
              "| mode | Abs.Acc diff (t) | exceeds noise | Norm.Acc diff (t) | exceeds noise |", "|---|---|---|---|---|"]

    def cell(v):
        if v["diff"] is None:
            return "-", "-"
        t = "-" if v["t"] is None else f"{v['t']:+.2f}"
        return f"{100 * v['diff']:+.2f} ({t})", {True: "yes", False: "no", None: "-"}[v["exceeds_noise"]]

    for mode, m in table["modes"].items():
        a, n = cell(m["verdict"]["abs_acc"]), cell(m["verdict"]["norm_acc"])
        lines.append(f"| {mode} | {a[0]} | {a[1]} | {n[0]} | {n[1]} |")
    return "\n".join(lines)


def run_seeds(recipe, planned: list, log) -> Path:
    """Write the planned variants as OUT_DIR/seeds.yaml and run it like `tvtool run` (finished outputs kept)."""
    from tvtool.fileio import atomic_path
    from tvtool.recipes import load_recipe, run_recipe

    path = recipe.out_dir / "seeds.yaml"
    recipe.out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, force=True) as tmp:  # the script owns this file: rewritten from the current choice
        tmp.write_text(seeds_recipe_yaml(recipe, planned))
    log(f"{len(planned)} further runs: {path}")
    run_recipe(load_recipe(path), quiet=True, log=log)
    return path


def main(argv: list[str] | None = None) -> int:
    from tvtool.errors import TVToolError
    from tvtool.recipes import load_recipe

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
            seeds = sorted({int(x) for x in args.seeds.split(",") if x.strip()})
            if any(x < 0 for x in seeds):
                raise ValueError
        except ValueError:
            raise TVToolError(f"--seeds {args.seeds!r}: give whole numbers >= 0, comma-separated (e.g. 1,2)") from None
        hint = f"run `tvtool run {recipe.path}` first"
        planned = plan_seeds(recipe, choose_lambdas(recipe, hint), seeds)
        if planned:
            if args.no_compute:
                hint = f"run `python scripts/mini_paper_table.py {recipe.path}` without --no-compute to train it"
            else:
                run_seeds(recipe, planned, log)
        table = collect(dataclasses.replace(recipe, variants=recipe.variants + planned), pair=pair, grid=args.grid,
                        compute=not args.no_compute, log=log, hint=hint)
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
