"""The figures of a recipe run, as one summary: per variant, per seed group, and OrthoReg against plain fine-tuning.

:func:`summary` turns what :func:`tvtool.recipes.run_recipe` returns into the JSON `tvtool run --json` and
`tvtool quickstart --json` print (and `run` writes to ``OUT_DIR/summary.json``); :func:`tables` lays it out as the
tables the CLI prints and :func:`markdown` as Markdown. Accuracies are in percent.

Three addition figures sit side by side, because the paper's own one can mislead:

* ``abs_acc``: mean test accuracy of the merged model (Abs.Acc);
* ``norm_acc``: the paper's Norm.Acc, mean of merged / single-task accuracy with each variant's *own* single-task
  accuracies as denominators: a regularizer that fine-tunes worse raises it without a better merged model;
* ``norm_acc_vs_baseline``: the same ratio over a *fixed* baseline's single-task accuracies, the lambda-0 variant of
  the same mode (same settings but OrthoReg's, same seed): it moves only with the merged model;
* ``finetuned_acc``: the mean single-task test accuracy (the paper's denominators), to see why the two differ.

With ``seeds:`` in the recipe every variant ran once per seed: a group's figures are mean +- sample std over its
seeds, and each OrthoReg group gets the paired difference to its baseline group (per seed OrthoReg minus baseline;
mean, standard error sd / sqrt(n), t = mean / SE with n - 1 degrees of freedom, and whether |t| exceeds the
two-sided 5% critical value).
"""
from __future__ import annotations

import math
from typing import Any

# figures per variant, in table order; PERCENT ones are accuracies (fractions in the result files)
METRICS = ("finetuned_acc", "abs_acc", "norm_acc", "norm_acc_vs_baseline", "alpha", "tar_acc", "con_acc", "cosine")
PERCENT = {"finetuned_acc", "abs_acc", "norm_acc", "norm_acc_vs_baseline", "tar_acc", "con_acc"}
LABELS = {"finetuned_acc": "single-task", "abs_acc": "Abs.Acc", "norm_acc": "Norm.Acc (own)",
          "norm_acc_vs_baseline": "Norm.Acc vs baseline", "alpha": "alpha", "tar_acc": "Tar.Acc",
          "con_acc": "Con.Acc", "cosine": "mean cos"}
PAIRED = ("abs_acc", "norm_acc_vs_baseline", "norm_acc", "finetuned_acc", "tar_acc", "con_acc", "cosine")

# two-sided 5% critical values of Student's t by degrees of freedom (beyond 30: the normal's 1.96)
T_CRIT_05 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
             11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
             20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
             29: 2.045, 30: 2.042}


def t_critical(df: int) -> float:
    return T_CRIT_05.get(df, 1.96)


# ------------------------------------------------------------------------------------------------ statistics
def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for fewer than two values."""
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def paired(differences: list[float]) -> dict:
    """Mean, standard error, t (df = n - 1) of per-seed differences, and whether |t| > the 5% critical value."""
    n = len(differences)
    m, s = mean_std(differences)
    out = {"mean": m, "se": None, "t": None, "n": n, "df": n - 1 if n else None, "t_crit_05": None,
           "beyond_noise": None, "per_seed": differences}
    if s is None:
        return out
    se = s / math.sqrt(n)
    out.update(se=se, t_crit_05=t_critical(n - 1))
    if se > 0:
        out.update(t=m / se, beyond_noise=abs(m / se) > t_critical(n - 1))
    else:  # every seed the same difference: beyond noise unless it is zero
        out.update(beyond_noise=m != 0)
    return out


# ------------------------------------------------------------------------------------------------ per variant
def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def variant_figures(res: dict, baseline: dict | None) -> dict:
    """One variant's figures as fractions (None where the step did not run); ``baseline`` is the baseline
    variant's results (its addition step gives the fixed denominators)."""
    from .evaluate import norm_vs_baseline

    add = res.get("addition") or {}
    neg = res.get("negation") or {}
    report = (add.get("splits") or {}).get("report", "test")
    ft = (add.get("finetuned_acc") or {}).get(report) or {}
    vs_base = None
    base_add = (baseline or {}).get("addition") or {}
    base_ft = (base_add.get("finetuned_acc") or {}).get(report)
    if add.get("test_acc") and base_ft:
        vs_base = norm_vs_baseline(add["test_acc"], base_ft)[1]
    return {"finetuned_acc": _mean(ft.values()) if ft else None, "abs_acc": add.get("abs_acc"),
            "norm_acc": add.get("norm_acc"), "norm_acc_vs_baseline": vs_base, "alpha": add.get("alpha"),
            "tar_acc": neg.get("tar_acc"), "con_acc": neg.get("con_acc"),
            "cosine": (res.get("cosine") or {}).get("mean")}


def merge_figures(res: dict) -> dict:
    """Each merge step of one variant (its results hold a ``merged`` vector), in recipe order: the method, the
    Val-chosen alpha (and tuned option), test Abs.Acc and Norm.Acc in percent."""
    out = {}
    for step, r in res.items():
        if not isinstance(r, dict) or not r.get("merged") or step in ("addition", "negation"):
            continue
        tuned = r.get("tuned")
        out[step] = {"method": r.get("method") or step.removeprefix("merge-"), "alpha": r.get("alpha"),
                     "tuned": {"option": tuned["option"], "chosen": tuned["chosen"]} if tuned else None,
                     "abs_acc": _shown("abs_acc", r.get("abs_acc")), "norm_acc": _shown("norm_acc", r.get("norm_acc"))}
    return out


def _shown(metric: str, value):
    return None if value is None else (100 * value if metric in PERCENT else value)


def zeroshot(results: dict) -> dict | None:
    """The pre-trained model's own figures (fractions): mean zero-shot test accuracy over the tasks (its Abs.Acc and
    its Tar.Acc) and the control task's zero-shot test accuracy; None when no variant ran negation."""
    for res in results["variants"].values():
        per_task = (res.get("negation") or {}).get("per_task") or []
        if per_task:
            target = [r["zeroshot"]["target_test_acc"] for r in per_task]
            control = [r["zeroshot"]["control_test_acc"] for r in per_task]
            return {"abs_acc": sum(target) / len(target), "tar_acc": sum(target) / len(target),
                    "con_acc": sum(control) / len(control)}
    return None


def settings_label(run: dict) -> str:
    """The settings a table row was made with: mode, lambda and, with OrthoReg, its form and scope."""
    if "mode" not in run:  # results assembled without the recipe: nothing known
        return "-"
    text = f"{run['mode']}, lambda {run.get('lambda', 0):g}"
    if run.get("lambda"):
        text += f" {run.get('orthoreg_form')}/{run.get('orthoreg_scope')}"
    extra = run.get("distinct") or {}
    return text + "".join(f", {k} {v:g}" if isinstance(v, float) else f", {k} {v}" for k, v in extra.items())


# ------------------------------------------------------------------------------------------------ the runs
ORTHOREG_KEYS = ("lam", "orthoreg_form", "orthoreg_scope", "orthoreg_estimator", "orthoreg_probes",
                 "orthoreg_precision")
NOT_SETTINGS = ("seed", "device", "eval", "eval_batch_size", "checkpoint_every", "checkpoint_dir", "log_every",
                "keep_checkpoints", "task", "data_root")


def describe_runs(recipe) -> dict[str, dict]:
    """Per variant (run) of a recipe: its recipe variant (``group``), ``seed``, ``mode``, ``lambda``,
    ``orthoreg_form`` / ``orthoreg_scope`` (None without OrthoReg), ``distinct`` (the other settings that differ
    between the recipe's variants, e.g. a LoRA learning rate) and ``baseline``: the run its fixed-denominator
    Norm.Acc and paired differences compare with, the lambda-0 run of the same mode and seed whose settings are the
    same but OrthoReg's (if several or none match: the only lambda-0 run of that mode and seed, else None).
    A lambda-0 run is its own baseline."""
    import dataclasses

    cfgs = {v.name: recipe.train_config(v, recipe.tasks[0]).resolved() for v in recipe.variants}
    fields = [f.name for f in dataclasses.fields(next(iter(cfgs.values())))
              if f.name not in ORTHOREG_KEYS + NOT_SETTINGS + ("mode",)]
    distinct = [k for k in fields if len({repr(getattr(c, k)) for c in cfgs.values()}) > 1]

    def rest(c):
        return tuple(getattr(c, k) for k in fields)

    runs = {}
    for v in recipe.variants:
        c = cfgs[v.name]
        if c.lam == 0:
            base = v.name
        else:
            plain = [u.name for u in recipe.variants if cfgs[u.name].lam == 0 and cfgs[u.name].mode == c.mode
                     and cfgs[u.name].seed == c.seed]
            same = [u for u in plain if rest(cfgs[u]) == rest(c)]
            base = same[0] if len(same) == 1 else plain[0] if len(plain) == 1 else None
        runs[v.name] = {"group": getattr(v, "group", None) or v.name, "seed": c.seed, "mode": c.mode,
                        "lambda": c.lam, "orthoreg_form": c.orthoreg_form if c.lam > 0 else None,
                        "orthoreg_scope": c.orthoreg_scope if c.lam > 0 else None,
                        "distinct": {k: getattr(c, k) for k in distinct}, "baseline": base}
    return runs


# ------------------------------------------------------------------------------------------------ the summary
def summary(results: dict) -> dict:
    """The JSON of a run (accuracies in %): ``zeroshot``, ``variants`` (per run: its settings, its ``baseline`` and
    :data:`METRICS`) and, for a recipe with ``seeds:``, ``groups`` (per recipe variant: ``seeds``, ``baseline``,
    ``figures`` {metric: {mean, std, n, per_seed}} and ``paired_vs_baseline`` {metric: {mean, se, t, n, df,
    t_crit_05, beyond_noise, per_seed}} for OrthoReg groups)."""
    runs = results.get("runs") or {}
    zs = zeroshot(results)
    variants: dict[str, dict] = {}
    raw: dict[str, dict] = {}
    for name, res in results["variants"].items():
        run = runs.get(name) or {}
        base = run.get("baseline")
        raw[name] = variant_figures(res, results["variants"].get(base) if base else None)
        neg = res.get("negation") or {}
        variants[name] = {"settings": {k: run[k] for k in ("mode", "lambda", "orthoreg_form", "orthoreg_scope",
                                                           "seed", "distinct") if k in run},
                          "baseline": base, **{m: _shown(m, raw[name][m]) for m in METRICS},
                          "negation_qualified": [neg["qualified"], neg["tasks"]] if "qualified" in neg else None}
        merges = merge_figures(res)
        if merges:
            variants[name]["merges"] = merges
    out: dict[str, Any] = {"zeroshot": None if zs is None else {k: 100 * v for k, v in zs.items()},
                           "variants": variants}
    if results.get("seeds"):
        out["groups"] = _groups(results, runs, raw)
    return out


def _groups(results: dict, runs: dict, raw: dict) -> dict:
    groups: dict[str, dict] = {}
    for name in results["variants"]:
        run = runs.get(name) or {}
        g = groups.setdefault(run.get("group", name), {"settings": {k: run[k] for k in (
            "mode", "lambda", "orthoreg_form", "orthoreg_scope", "distinct") if k in run}, "seeds": [], "variants": [],
            "baseline_variants": []})
        g["seeds"].append(run.get("seed"))
        g["variants"].append(name)
        g["baseline_variants"].append(run.get("baseline"))
    for name, g in groups.items():
        negs = [n for n in ((results["variants"][v].get("negation") or {}) for v in g["variants"]) if "qualified" in n]
        g["negation_qualified"] = [sum(n["qualified"] for n in negs), sum(n["tasks"] for n in negs)] if negs else None
        g["figures"] = {}
        for m in METRICS:
            values = [raw[v][m] for v in g["variants"] if raw[v][m] is not None]
            mean, std = mean_std([_shown(m, x) for x in values])
            g["figures"][m] = {"mean": mean, "std": std, "n": len(values),
                               "per_seed": [_shown(m, raw[v][m]) for v in g["variants"]]}
        base_groups = {(runs.get(b) or {}).get("group") for b in g.pop("baseline_variants") if b}
        g["baseline"] = base_groups.pop() if len(base_groups) == 1 and None not in base_groups else None
        g["paired_vs_baseline"] = None
        if g["baseline"] is not None and g["baseline"] != name:
            pairs = [(v, (runs.get(v) or {}).get("baseline")) for v in g["variants"]]
            g["paired_vs_baseline"] = {
                m: paired([_shown(m, raw[v][m]) - _shown(m, raw[b][m]) for v, b in pairs
                           if raw[v][m] is not None and b in raw and raw[b][m] is not None])
                for m in PAIRED if any(raw[v][m] is not None for v, _ in pairs)}
    return groups


# ------------------------------------------------------------------------------------------------ tables
def _fmt(metric: str, value, digits: int | None = None) -> str:
    if value is None:
        return "-"
    if metric == "alpha":
        return f"{value:.2f}"
    if metric == "cosine":
        return f"{value:.4f}"
    return f"{value:.{digits or 2}f}"


def _present(summary_: dict) -> list[str]:
    """The metrics some variant has (a recipe without negation gets no Tar.Acc column)."""
    rows = list(summary_["variants"].values())
    return [m for m in METRICS if any(r.get(m) is not None for r in rows)]


def tables(summary_: dict) -> list[dict]:
    """The summary as tables of strings: ``{"title", "columns", "rows", "caption"}`` each. Without seeds one row per
    variant (and a zero-shot row); with seeds one row per group (mean +- std) and a table of paired differences."""
    metrics = _present(summary_)
    has_add = "abs_acc" in metrics
    caption = []
    if has_add:
        caption.append("Norm.Acc (own): the paper's, over each variant's own single-task accuracies; Norm.Acc vs "
                       "baseline: over the single-task accuracies of the baseline (the lambda-0 variant of the same "
                       "mode and seed), the same denominator for every variant; single-task: mean single-task "
                       "accuracy.")
    if "tar_acc" in metrics:
        caption.append("neg. ok: tasks whose negation found an alpha keeping control Val accuracy >= threshold "
                       "(default 0.95) x zero-shot; Tar.Acc (lower is better) and Con.Acc average those tasks.")
    if "cosine" in metrics:
        caption.append("mean cos: mean pairwise cosine of the task vectors.")
    title = "task arithmetic: test accuracy (%), alpha chosen on Val"
    neg = ["neg. ok"] if "tar_acc" in metrics or any(
        v.get("negation_qualified") for v in summary_["variants"].values()) else []
    groups = summary_.get("groups")
    merges = _merge_table(summary_)
    if not groups:
        columns = ["variant", "settings", "baseline"] + [LABELS[m] for m in metrics] + neg
        rows = []
        zs = summary_.get("zeroshot")
        if zs is not None:
            rows.append(["zero-shot", "-", "-"] + [_fmt(m, zs.get(m)) if m in ("abs_acc", "tar_acc", "con_acc")
                                                   else "-" for m in metrics] + ["-"] * len(neg))
        for name, v in summary_["variants"].items():
            rows.append([name, settings_label(v["settings"]), v.get("baseline") or "-"]
                        + [_fmt(m, v.get(m)) for m in metrics] + [_qualified(v)] * len(neg))
        return [{"title": title, "columns": columns, "rows": rows, "caption": " ".join(caption) or None}] + merges
    columns = ["variant", "settings", "seeds"] + [LABELS[m] for m in metrics]
    rows = []
    for name, g in groups.items():
        cells = []
        for m in metrics:
            f = g["figures"][m]
            cells.append("-" if f["mean"] is None else _fmt(m, f["mean"]) + (
                "" if f["std"] is None else f" +- {_fmt(m, f['std'])}"))
        rows.append([name, settings_label(g["settings"]), ",".join(str(s) for s in g["seeds"])] + cells
                    + [_qualified(g)] * len(neg))
    out = [{"title": title + "; mean +- sample std over seeds", "columns": columns + neg, "rows": rows,
            "caption": " ".join(caption) or None}]
    diff_metrics = [m for m in PAIRED if m in metrics]
    prow = []
    for name, g in groups.items():
        p = g.get("paired_vs_baseline")
        if not p:
            continue
        cells = []
        for m in diff_metrics:
            d = p.get(m)
            if not d or d["mean"] is None:
                cells.append("-")
                continue
            digits = 4 if m == "cosine" else 2
            text = f"{d['mean']:+.{digits}f}"
            if d["se"] is not None:
                text += f" (SE {d['se']:.{digits}f}, t {'-' if d['t'] is None else format(d['t'], '+.2f')})"
            cells.append(text)
        prow.append([f"{name} - {g['baseline']}", str(p[diff_metrics[0]]["n"]) if diff_metrics[0] in p else "-"]
                    + cells)
    if prow:
        out.append({"title": "OrthoReg minus its baseline, paired by seed: mean (SE, t)",
                    "columns": ["variant - baseline", "pairs"] + [LABELS[m] for m in diff_metrics], "rows": prow,
                    "caption": "Per seed, the variant's figure minus its baseline's (the lambda-0 variant of its "
                               "mode, same seed); SE = sd / sqrt(pairs), t = mean / SE with pairs - 1 degrees of "
                               "freedom (with 3 seeds |t| > 4.30 is p < 0.05, two-sided)."})
    return out + merges


def _merge_table(summary_: dict) -> list[dict]:
    """The merge steps of every variant beside its task arithmetic, best Abs.Acc first within a variant."""
    rows = []
    for name, v in summary_["variants"].items():
        if not v.get("merges"):
            continue
        entries = [("addition", {"method": "sum", "alpha": v.get("alpha"), "tuned": None,
                                 "abs_acc": v.get("abs_acc"), "norm_acc": v.get("norm_acc")})] if v.get(
            "abs_acc") is not None else []
        entries += list(v["merges"].items())
        entries.sort(key=lambda e: -(e[1]["abs_acc"] if e[1]["abs_acc"] is not None else -1))
        for step, m in entries:
            tuned = m.get("tuned")
            rows.append([name, step, m["method"], _fmt("alpha", m["alpha"]),
                         "-" if not tuned else f"{tuned['option']} {tuned['chosen']:g}",
                         _fmt("abs_acc", m["abs_acc"]), _fmt("norm_acc", m["norm_acc"])])
    if not rows:
        return []
    return [{"title": "merge methods: test accuracy (%), alpha (and a tuned option) chosen on Val",
             "columns": ["variant", "step", "method", "alpha", "tuned", "Abs.Acc", "Norm.Acc (own)"], "rows": rows,
             "caption": "Each method's alpha grid is its paper's (`tvtool merge --list`); addition is the variant's "
                        "task arithmetic. Sorted by Abs.Acc within a variant."}]


def _qualified(entry: dict) -> str:
    q = entry.get("negation_qualified")
    return "-" if not q else f"{q[0]}/{q[1]}"


def markdown(summary_: dict) -> str:
    """:func:`tables` as Markdown (what docs quote)."""
    parts = []
    for t in tables(summary_):
        parts.append(f"**{t['title']}**\n")
        parts.append("| " + " | ".join(t["columns"]) + " |")
        parts.append("|" + "---|" * len(t["columns"]))
        parts += ["| " + " | ".join(r) + " |" for r in t["rows"]]
        if t["caption"]:
            parts.append(f"\n{t['caption']}")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"
