"""tvtool.results: the run summary (fixed-denominator Norm.Acc, seed groups, paired differences) from fabricated
results, checked against figures computed another way."""
import math
import re

import pytest
import yaml

from tvtool.recipes import parse_recipe
from tvtool.results import describe_runs, markdown, paired, summary, t_critical, tables

TASKS = ["mini-shapes", "mini-colors"]


def test_t_critical_values_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 31):
        assert t_critical(df) == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4)
    assert t_critical(200) == 1.96


def test_paired_mean_se_t():
    d = [1.0, 2.0, 4.0]
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    p = paired(d)
    assert p["mean"] == pytest.approx(7 / 3) and p["se"] == pytest.approx(sd / math.sqrt(3))
    assert p["t"] == pytest.approx((7 / 3) / (sd / math.sqrt(3))) and p["df"] == 2 and p["t_crit_05"] == 4.303
    assert p["beyond_noise"] is False  # t = 2.65 < 4.30
    assert paired([1.0, 1.1, 0.9, 1.0])["beyond_noise"] is True
    assert paired([0.5, 0.5])["beyond_noise"] is True and paired([0.0, 0.0])["beyond_noise"] is False
    assert paired([0.5])["se"] is None and paired([0.5])["mean"] == 0.5


def _recipe(variants, seeds=(0, 1, 2)):
    doc = {"model": "tvtool-mini", "out_dir": "/tmp/x", "tasks": TASKS, "finetune": {"lr": 0.001},
           "variants": variants}
    if seeds:
        doc["seeds"] = list(seeds)
    return parse_recipe(yaml.safe_load(yaml.safe_dump(doc)), "t")


def test_each_variant_is_compared_with_the_lambda0_run_of_its_mode_settings_and_seed():
    r = _recipe([{"name": "ft", "mode": "full"},
                 {"name": "or", "mode": "full", "lambda": 10, "orthoreg_form": "plain", "orthoreg_scope": "reference"},
                 {"name": "lora", "mode": "lora", "lr": 0.01},
                 {"name": "lora-slow", "mode": "lora"},
                 {"name": "lora-or", "mode": "lora", "lambda": 1, "lr": 0.01},
                 {"name": "attn-or", "mode": "attn", "lambda": 1}], seeds=(0, 1))
    runs = describe_runs(r)
    assert runs["or/seed-1"]["baseline"] == "ft/seed-1" and runs["ft/seed-0"]["baseline"] == "ft/seed-0"
    # two lambda-0 LoRA variants: the one with the same settings but OrthoReg's (lr 0.01)
    assert runs["lora-or/seed-0"]["baseline"] == "lora/seed-0"
    assert runs["attn-or/seed-0"]["baseline"] is None  # no lambda-0 attn run
    assert runs["or/seed-0"]["orthoreg_form"] == "plain" and runs["ft/seed-0"]["orthoreg_form"] is None
    assert runs["lora-or/seed-1"]["distinct"] == {"lr": 0.01} and runs["ft/seed-1"]["distinct"] == {"lr": 0.001}
    # not seeded: the seed is still what pairs them
    r = _recipe([{"name": "ft0", "mode": "full", "seed": 0}, {"name": "ft1", "mode": "full", "seed": 1},
                 {"name": "or1", "mode": "full", "lambda": 1, "seed": 1}], seeds=None)
    assert describe_runs(r)["or1"]["baseline"] == "ft1"


def _addition(test, ft):
    return {"abs_acc": sum(test.values()) / len(test), "norm_acc": sum(test[t] / ft[t] for t in test) / len(test),
            "alpha": 0.1, "test_acc": test, "finetuned_acc": {"test": ft, "val": ft},
            "splits": {"select": "val", "report": "test"}}


def test_summary_fixed_denominator_groups_and_paired_differences():
    """OrthoReg loses single-task accuracy and gains nothing in the merged model: its own Norm.Acc rises, the
    fixed-denominator one does not; per seed figures, mean +- std and paired differences recomputed by hand."""
    r = _recipe([{"name": "ft", "mode": "full"}, {"name": "or", "mode": "full", "lambda": 10}])
    ft_single = {0: {"mini-shapes": 0.9, "mini-colors": 0.8}, 1: {"mini-shapes": 0.92, "mini-colors": 0.8},
                 2: {"mini-shapes": 0.88, "mini-colors": 0.84}}
    or_single = {s: {t: a - 0.2 for t, a in ft_single[s].items()} for s in ft_single}
    merged = {("ft", s): {"mini-shapes": 0.6 + 0.01 * s, "mini-colors": 0.5} for s in (0, 1, 2)}
    merged.update({("or", s): {"mini-shapes": 0.59 + 0.02 * s, "mini-colors": 0.5} for s in (0, 1, 2)})
    results = {"variants": {}, "runs": describe_runs(r), "seeds": [0, 1, 2]}
    for g in ("ft", "or"):
        for s in (0, 1, 2):
            single = ft_single[s] if g == "ft" else or_single[s]
            results["variants"][f"{g}/seed-{s}"] = {"addition": _addition(merged[g, s], single),
                                                    "cosine": {"mean": 0.01 if g == "ft" else 0.003}}
    out = summary(results)
    v = out["variants"]["or/seed-1"]
    expect_vs_base = 100 * (merged["or", 1]["mini-shapes"] / 0.92 + 0.5 / 0.8) / 2
    assert v["norm_acc_vs_baseline"] == pytest.approx(expect_vs_base)
    assert v["norm_acc"] == pytest.approx(100 * (merged["or", 1]["mini-shapes"] / 0.72 + 0.5 / 0.6) / 2)
    assert v["finetuned_acc"] == pytest.approx(66.0) and v["baseline"] == "ft/seed-1"
    assert out["variants"]["ft/seed-1"]["norm_acc_vs_baseline"] == pytest.approx(out["variants"]["ft/seed-1"]
                                                                                  ["norm_acc"])
    g = out["groups"]["or"]
    assert g["baseline"] == "ft" and g["seeds"] == [0, 1, 2]
    abs_or = [100 * (0.59 + 0.02 * s + 0.5) / 2 for s in (0, 1, 2)]
    assert g["figures"]["abs_acc"]["mean"] == pytest.approx(sum(abs_or) / 3)
    assert g["figures"]["abs_acc"]["std"] == pytest.approx(1.0)  # 0.02 * 100 / 2 per seed step: 54.5, 55.5, 56.5
    d = [100 * ((0.59 + 0.02 * s) - (0.6 + 0.01 * s)) / 2 for s in (0, 1, 2)]  # -0.5, 0, +0.5
    p = g["paired_vs_baseline"]["abs_acc"]
    assert p["per_seed"] == pytest.approx(d) and p["mean"] == pytest.approx(0.0, abs=1e-12)
    assert p["se"] == pytest.approx(0.5 / math.sqrt(3)) and p["t"] == pytest.approx(0.0, abs=1e-9)
    own = g["paired_vs_baseline"]["norm_acc"]
    fixed = g["paired_vs_baseline"]["norm_acc_vs_baseline"]
    assert own["mean"] > 10 and own["beyond_noise"] and abs(fixed["mean"]) < 1  # the flattering one and the honest
    assert g["paired_vs_baseline"]["finetuned_acc"]["mean"] == pytest.approx(-20.0)
    assert g["paired_vs_baseline"]["cosine"]["mean"] == pytest.approx(-0.007)
    assert out["groups"]["ft"]["paired_vs_baseline"] is None
    main, pairs = tables(out)
    assert main["columns"][:3] == ["variant", "settings", "seeds"]
    row = next(r for r in main["rows"] if r[0] == "or")
    assert row[1] == "full, lambda 10 squared/visual-linear"
    assert f"{g['figures']['abs_acc']['mean']:.2f} +- 1.00" in row
    assert pairs["rows"][0][:2] == ["or - ft", "3"]
    assert re.search(r"\| or - ft \| 3 \| [+-]0\.00 \(SE 0\.29, t [+-]0\.00\) \|", markdown(out))


def test_unseeded_summary_has_one_row_per_variant_and_the_zero_shot_row():
    r = _recipe([{"name": "ft", "mode": "full"}, {"name": "or", "mode": "full", "lambda": 0.1}], seeds=None)
    neg = {"tar_acc": 0.2, "con_acc": 0.95, "qualified": 2, "tasks": 2,
           "per_task": [{"zeroshot": {"target_test_acc": 0.5, "control_test_acc": 0.99}}]}
    results = {"variants": {"ft": {"addition": _addition({"mini-shapes": 0.6, "mini-colors": 0.5},
                                                         {"mini-shapes": 0.9, "mini-colors": 0.8}), "negation": neg},
                            "or": {"addition": _addition({"mini-shapes": 0.6, "mini-colors": 0.5},
                                                         {"mini-shapes": 0.6, "mini-colors": 0.5}), "negation": neg}},
               "runs": describe_runs(r), "seeds": None}
    out = summary(results)
    assert set(out) == {"zeroshot", "variants"}
    assert out["variants"]["or"]["norm_acc"] == pytest.approx(100.0)
    assert out["variants"]["or"]["norm_acc_vs_baseline"] == pytest.approx(100 * (0.6 / 0.9 + 0.5 / 0.8) / 2)
    (table,) = tables(out)
    assert table["rows"][0][:3] == ["zero-shot", "-", "-"] and "50.00" in table["rows"][0]
    assert table["rows"][2][:3] == ["or", "full, lambda 0.1 squared/visual-linear", "ft"]
    assert table["columns"][-1] == "neg. ok" and table["rows"][2][-1] == "2/2"


def test_merge_steps_get_their_own_table_sorted_by_abs_acc():
    """Every merge step of a recipe appears with its method, Val-chosen alpha, tuned option and test figures, beside
    the variant's task arithmetic; a step's figures are its own results' (in percent)."""
    r = _recipe([{"name": "ft", "mode": "full"}], seeds=None)
    ft = {"mini-shapes": 0.9, "mini-colors": 0.8}
    tsv = {**_addition({"mini-shapes": 0.8, "mini-colors": 0.7}, ft), "alpha": 1.0, "method": "tsv",
           "merged": {"path": "merge-tsv.st"}}
    lines = {**_addition({"mini-shapes": 0.5, "mini-colors": 0.5}, ft), "alpha": 1.0,
             "merged": {"path": "lines-ties-beta0.4.st"}, "tuned": {"option": "beta", "chosen": 0.4, "tried": []}}
    results = {"variants": {"ft": {"addition": _addition({"mini-shapes": 0.6, "mini-colors": 0.5}, ft),
                                   "merge-tsv": tsv, "lines-ties": lines}},
               "runs": describe_runs(r), "seeds": None}
    out = summary(results)
    assert out["variants"]["ft"]["merges"]["merge-tsv"] == {
        "method": "tsv", "alpha": 1.0, "tuned": None, "abs_acc": pytest.approx(75.0),
        "norm_acc": pytest.approx(100 * (0.8 / 0.9 + 0.7 / 0.8) / 2)}
    _, merges = tables(out)
    assert merges["columns"] == ["variant", "step", "method", "alpha", "tuned", "Abs.Acc", "Norm.Acc (own)"]
    assert merges["rows"] == [["ft", "merge-tsv", "tsv", "1.00", "-", "75.00", "88.19"],
                              ["ft", "addition", "sum", "0.10", "-", "55.00", "64.58"],
                              ["ft", "lines-ties", "lines-ties", "1.00", "beta 0.4", "50.00", "59.03"]]
    assert "**merge methods: test accuracy (%)" in markdown(out)
    # a recipe without merge steps prints no merge table
    del results["variants"]["ft"]["merge-tsv"], results["variants"]["ft"]["lines-ties"]
    assert len(tables(summary(results))) == 1
