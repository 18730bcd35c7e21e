"""Recipes: validation names the line and key; the shipped recipes parse; quickstart == recipes/mini.yaml."""
import json
import re
from pathlib import Path

import pytest
import yaml

from tvtool.errors import TVToolError
from tvtool.quickstart import quickstart_recipe
from tvtool.recipes import grid_points, load_recipe, parse_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

GOOD = """\
model: tvtool-mini
out_dir: {out}
tasks: [mini-shapes, mini-colors]
finetune: {{lr: 0.001, max_steps: 3}}
variants:
  - {{name: ft, mode: full}}
  - {{name: reg, mode: attn, lambda: 0.5, orthoreg_form: plain}}
eval:
  addition: {{grid: "0:1:0.5"}}
"""


def test_good_recipe_parses(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(GOOD.format(out=tmp_path / "runs"))
    r = load_recipe(p)
    assert [v.name for v in r.variants] == ["ft", "reg"]
    cfg = r.train_config(r.variants[1], "mini-colors")
    assert (cfg.mode, cfg.lam, cfg.orthoreg_form, cfg.lr, cfg.max_steps) == ("attn", 0.5, "plain", 0.001, 3)
    assert r.output(r.variants[0], "mini-shapes") == tmp_path / "runs" / "ft" / "mini-shapes.st"
    assert grid_points(r.eval["addition"]["grid"]) == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("old,new,line,needle", [
    ("finetune: {lr: 0.001", "finetune: {lrr: 0.001", 4, "finetune.lrr: unknown setting"),
    ("mode: attn,", "mode: sideways,", 7, "unknown mode"),
    ("lambda: 0.5", "lambda: lots", 7, "expected float"),
    ("tasks: [mini-shapes", "tasks: [mini-nope", 3, "mini-nope"),
    ("  addition:", "  additon:", 9, "unknown evaluation step"),
    ("model: tvtool-mini", "modle: tvtool-mini", 1, "unknown key"),
    ("lr: 0.001", "lr: !!float abc", 4, "cannot read this value"),
    ('grid: "0:1:0.5"', 'grid: "1:0:0.5"', 9, "grid"),
])
def test_bad_recipes_name_line_and_key(tmp_path, old, new, line, needle):
    p = tmp_path / "r.yaml"
    text = GOOD.format(out=tmp_path / "runs")
    assert old in text
    p.write_text(text.replace(old, new))
    with pytest.raises(TVToolError) as exc:
        load_recipe(p)
    msg = str(exc.value)
    assert msg.startswith(f"{p}:{line}:") and needle in msg


def test_unsafe_yaml_refused(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(TVToolError):
        load_recipe(p)


def test_shipped_recipes_parse():
    for p in sorted(RECIPES.glob("*.yaml")):
        r = load_recipe(p)
        assert r.variants and r.tasks, p


def test_quickstart_is_the_mini_recipe():
    shipped = yaml.safe_load((RECIPES / "mini.yaml").read_text())
    assert shipped == quickstart_recipe("full", "runs/quickstart")
    parse_recipe(quickstart_recipe("ci"), "ci")


def test_paper_recipes_follow_the_protocol():
    r = load_recipe(RECIPES / "vit-b-32.yaml")
    assert r.tasks == ["cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn"]
    ft = r.train_config(next(v for v in r.variants if v.name == "ft-orthoreg"), "cars")
    assert (ft.lr, ft.weight_decay, ft.warmup_steps, ft.batch_size, ft.lam, ft.orthoreg_form) == (
        1e-5, 0.1, 500, 128, 10, "plain")
    lora = r.train_config(next(v for v in r.variants if v.name == "lora-orthoreg"), "cars")
    assert (lora.lr, lora.lora_rank, lora.lora_alpha, lora.lam) == (1e-4, 8, 8, 1.0)
    l14 = load_recipe(RECIPES / "vit-l-14.yaml")
    assert l14.train_config(l14.variants[0], "cars").grad_accum == 2


def test_merge_step_runs_addition_on_the_merged_vector(tmp_path):
    """A recipe's merge step writes the merged vector and applies the addition search to it (not to the sum)."""
    import json

    import torch

    from tvtool import evaluate
    from tvtool.models import load_clip
    from tvtool.recipes import run_recipe

    doc = yaml.safe_load(GOOD.format(out=tmp_path / "runs"))
    doc["finetune"] = {"lr": 0.001, "max_steps": 2, "warmup_steps": 1, "batch_size": 32, "eval": False}
    doc["variants"] = [{"name": "ft", "mode": "full"}]
    doc["eval"] = {"merge": [{"method": "ties", "options": {"k": 50}, "grid": "0:1:0.5"}]}
    r = parse_recipe(doc, "test")
    res = run_recipe(r, log=lambda m: None, device="cpu")["variants"]["ft"]["merge-ties"]
    folder = tmp_path / "runs" / "ft"
    merged = evaluate.open_vectors([folder / "merge-ties.st"])[0]
    assert merged.meta["history"][0]["op"] == "merge" and res["merged"]["fingerprint"] == merged.fingerprint
    # the reported test accuracies are those of theta_0 + alpha * merged, checked independently
    ev = evaluate.Evaluator(load_clip("tvtool-mini"), r.tasks, device="cpu")
    ev.set_weights(evaluate.load_deltas([merged], "cpu"), res["alpha"])
    for t in r.tasks:
        assert ev.accuracy(t, "test") == res["test_acc"][t]
    assert json.loads((folder / "merge-ties.json").read_text())["alpha"] == res["alpha"]


def test_unknown_merge_method_named(tmp_path):
    doc = yaml.safe_load(GOOD.format(out=tmp_path / "runs"))
    doc["eval"] = {"merge": [{"method": "average-ish"}]}
    with pytest.raises(TVToolError, match="unknown merge method"):
        parse_recipe(doc, "test")



def test_adamerging_refused_as_a_merge_step_before_any_fine_tuning(tmp_path):
    """AdaMerging learns from test images, so it is its own command; a recipe naming it fails at load, not after
    the fine-tuning."""
    doc = yaml.safe_load(GOOD.format(out=tmp_path / "runs"))
    doc["eval"] = {"merge": [{"method": "ties"}, {"method": "adamerging"}]}
    with pytest.raises(TVToolError, match=r"eval.merge.1.method: adamerging is not a merge step .*tvtool eval "
                                          r"adamerging"):
        parse_recipe(doc, "test")
    assert not (tmp_path / "runs").exists()

# ---- issue 9: hostile or wrong recipes are refused in one line, fast ---------------------------------------------

def test_alias_bomb_refused_fast(tmp_path):
    import time

    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 10):  # 10^10 values if expanded
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\n")
    assert p.stat().st_size < 1000
    t = time.perf_counter()
    with pytest.raises(TVToolError, match="expands to more than"):
        load_recipe(p)
    assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize("text,needle", [
    ("a: &x [1, *x]\n", "recursive YAML alias"),
    ("a: &x {b: *x}\n", "recursive YAML alias"),
])
def test_recursive_alias_is_one_line(tmp_path, text, needle):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(TVToolError, match=needle):
        load_recipe(p)


def test_non_utf8_recipe_is_one_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(TVToolError, match=r"r.yaml:1: not UTF-8"):
        load_recipe(p)


def test_fifo_recipe_refused_without_opening(tmp_path):
    import os

    from cli_helpers import run_tvtool

    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    r = run_tvtool("run", fifo, timeout=60)
    assert r.returncode == 1 and "not a regular file" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("old,new,needle", [
    ("model: tvtool-mini", "model: tvtool-mini\ndata_root: 17", "data_root: expected a text value"),
    ("lr: 0.001", "lr: .nan", "finetune.lr: lr must be a finite number"),
    ("lambda: 0.5", "lambda: .inf", "variants.1.lambda: lambda must be a finite number"),
    ("lambda: 0.5", "lambda: -1", "variants.1.lambda: lambda must be >= 0"),
    ("model: tvtool-mini", "model: tvtool-mini\nlr: 0.1", "put it under `finetune:`"),
    ("lr: 0.001", "lr: 0.001, grid: 0:1:0.5", "finetune.grid: grid is an evaluation setting"),
    ("lr: 0.001", "lr: 0.001, model: tvtool-mini", "model belongs at the top level"),
    ("model: tvtool-mini", "model: tvtool-mini\nseed: -3", "seed: expected a whole number"),
])
def test_bad_values_named(tmp_path, old, new, needle):
    p = tmp_path / "r.yaml"
    text = GOOD.format(out=tmp_path / "runs")
    assert old in text
    p.write_text(text.replace(old, new, 1))
    with pytest.raises(TVToolError, match=re.escape(needle)):
        load_recipe(p)


def test_top_level_seed_is_used(tmp_path):
    doc = yaml.safe_load(GOOD.format(out=tmp_path / "runs"))
    doc["seed"] = 5
    r = parse_recipe(doc, "t")
    assert r.train_config(r.variants[0], "mini-shapes").seed == 5
    doc["variants"][1]["seed"] = 9  # a variant's own seed wins
    r = parse_recipe(doc, "t")
    assert [r.train_config(v, "mini-shapes").seed for v in r.variants] == [5, 9]


def _tiny_recipe(tmp_path, **finetune):
    doc = {"model": "tvtool-mini", "out_dir": str(tmp_path / "runs"), "tasks": ["mini-shapes"],
           "finetune": {"lr": 0.001, "max_steps": 2, "warmup_steps": 1, "batch_size": 16, "eval": False,
                        **finetune},
           "variants": [{"name": "ft", "mode": "full", "lambda": 10}],
           "eval": {"addition": {"grid": "0:1:0.5"}}}
    return doc


def test_run_reruns_outputs_whose_settings_changed(tmp_path, monkeypatch):
    from tvtool import evaluate
    from tvtool.recipes import run_recipe
    from tvtool.taskvector import open_vector

    # the alpha search itself is tested elsewhere: a stub keeps this test about what is rerun
    monkeypatch.setattr(evaluate, "Evaluator", lambda *a, **k: None)
    monkeypatch.setattr(evaluate, "addition", lambda ev, vectors, grid, **k: {
        "kind": "addition", "vectors": evaluate.describe_vectors(vectors), "grid": grid})
    doc = _tiny_recipe(tmp_path)
    logs = []
    run_recipe(parse_recipe(doc, "t"), log=logs.append, device="cpu")
    out = tmp_path / "runs" / "ft" / "mini-shapes.st"
    assert open_vector(out).meta["orthoreg"]["lambda"] == 10
    logs.clear()
    run_recipe(parse_recipe(doc, "t"), log=logs.append, device="cpu")
    assert sum(m.startswith("skip") for m in logs) == 2 and not any(m.startswith(("rerun", "wrote")) for m in logs)
    # the same settings as given, but the dataset's epoch table grew (a new tvtool): a run capped by max_steps
    # trains the same steps either way, so it is kept
    from tvtool.datasets import get_dataset

    spec = get_dataset("mini-shapes")
    monkeypatch.setattr(spec, "epochs", spec.epochs + 1)
    logs.clear()
    run_recipe(parse_recipe(doc, "t"), log=logs.append, device="cpu")
    assert sum(m.startswith("skip") for m in logs) == 2 and not any(m.startswith(("rerun", "wrote")) for m in logs)
    # the case: lambda 10 -> 0.5 and max_steps 2 -> 3 must not print the old table
    doc["variants"][0]["lambda"] = 0.5
    doc["finetune"]["max_steps"] = 3
    logs.clear()
    run_recipe(parse_recipe(doc, "t"), log=logs.append, device="cpu")
    meta = open_vector(out).meta
    assert meta["orthoreg"]["lambda"] == 0.5 and meta["train"]["steps"] == 3
    assert sum(m.startswith("rerun") for m in logs) == 2  # the vector and the addition result
    assert not any(m.startswith("skip") for m in logs)
    added = json.loads((tmp_path / "runs" / "ft" / "addition.json").read_text())
    assert added["vectors"][0]["fingerprint"] == open_vector(out).fingerprint
    # an uncapped run (2 steps an epoch): when the epoch table changes under it, it is not the run the recipe
    # would make now, though its settings as given are the same
    del doc["finetune"]["max_steps"]
    doc["finetune"]["batch_size"] = 1000
    run_recipe(parse_recipe(doc, "t"), log=logs.append, device="cpu")
    trained = open_vector(out).meta["train"]
    assert trained["epochs"] == spec.epochs and trained["steps"] == 2 * spec.epochs
    monkeypatch.setattr(spec, "epochs", spec.epochs - 1)
    logs.clear()
    run_recipe(parse_recipe(doc, "t"), log=logs.append, device="cpu")
    assert any(m.startswith(f"rerun {out}: it was trained for {spec.epochs + 1} epochs, the run now has "
                            f"{spec.epochs}") for m in logs), logs
    assert open_vector(out).meta["train"]["steps"] == 2 * spec.epochs


def test_run_validates_everything_before_any_model(tmp_path, monkeypatch):
    from tvtool import models, train
    from tvtool.recipes import run_recipe

    def boom(*a, **k):
        raise AssertionError("work started before validation failed")

    monkeypatch.setattr(models, "load_clip", boom)
    monkeypatch.setattr(train, "finetune", boom)
    monkeypatch.delenv("TVTOOL_DATA", raising=False)
    doc = _tiny_recipe(tmp_path)
    doc["eval"] = {"negation": {"control": "imagenet"}}  # no data root for it: must fail now, not after training
    with pytest.raises(TVToolError, match="eval.negation.control: imagenet: no data root"):
        run_recipe(parse_recipe(doc, "t"), log=lambda m: None, device="cpu")
    doc["eval"] = {}
    doc["tasks"] = ["mini-shapes", "dtd"]
    with pytest.raises(TVToolError, match="dtd: no data root"):
        run_recipe(parse_recipe(doc, "t"), log=lambda m: None, device="cpu")


def test_run_table_shows_only_the_steps_the_recipe_ran(capsys):
    """A recipe without negation (recipes/mini-paper.yaml) gets no Tar.Acc / Con.Acc / 'neg. ok 0/0' columns; one
    with negation and cosine gets them, and the zero-shot row."""
    from tvtool.cli.train import _print_results

    addition = {"abs_acc": 0.6642, "norm_acc": 0.7192, "alpha": 0.35}
    _print_results({"variants": {"ft": {"addition": addition}}})
    out = capsys.readouterr().out
    assert "66.42" in out and "71.92" in out and "0.35" in out
    for absent in ("neg. ok", "Tar.Acc", "Con.Acc", "0/0", "mean cos"):
        assert absent not in out, absent

    negation = {"tar_acc": 0.2725, "con_acc": 0.944, "qualified": 7, "tasks": 8,
                "per_task": [{"zeroshot": {"target_test_acc": 0.5386, "control_test_acc": 0.99}}]}
    _print_results({"variants": {"ft": {"addition": addition, "negation": negation, "cosine": {"mean": 0.0104}}}})
    out = capsys.readouterr().out
    for present in ("neg. ok", "Tar.Acc", "27.25", "94.40", "7/8", "0.0104", "zero-shot", "53.86"):
        assert present in out, present


# ------------------------------------------------------------------ seeds: every variant once per seed
SEEDED = """\
model: tvtool-mini
out_dir: {out}
seeds: [0, 2]
tasks: [mini-shapes]
finetune: {{lr: 0.001, max_steps: 1, warmup_steps: 1, batch_size: 16, eval: false}}
variants:
  - {{name: ft, mode: full}}
  - {{name: reg, mode: full, lambda: 10, orthoreg_form: plain, orthoreg_scope: reference}}
eval:
  addition: {{grid: "0,1"}}
"""


def test_seeds_run_every_variant_per_seed(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(SEEDED.format(out=tmp_path / "runs"))
    r = load_recipe(p)
    assert r.seeds == [0, 2]
    assert [(v.name, v.group, v.seed) for v in r.variants] == [
        ("ft/seed-0", "ft", 0), ("ft/seed-2", "ft", 2), ("reg/seed-0", "reg", 0), ("reg/seed-2", "reg", 2)]
    assert [r.train_config(v, "mini-shapes").seed for v in r.variants] == [0, 2, 0, 2]
    assert r.train_config(r.variants[3], "mini-shapes").lam == 10
    assert r.output(r.variants[1], "mini-shapes") == tmp_path / "runs" / "ft" / "seed-2" / "mini-shapes.st"


@pytest.mark.parametrize("old,new,line,needle", [
    ("seeds: [0, 2]", "seeds: [0, 2]\nseed: 1", 4, "use either seed"),
    ("seeds: [0, 2]", "seeds: [0, 0]", 3, "listed twice"),
    ("seeds: [0, 2]", "seeds: [0, -1]", 3, "seeds.1: expected a whole number"),
    ("seeds: [0, 2]", "seeds: []", 3, "non-empty list"),
    ("seeds: [0, 2]", "seeds: 3", 3, "non-empty list"),
    ("{name: ft, mode: full}", "{name: ft, mode: full, seed: 4}", 7, "variants.0.seed: the recipe's `seeds:` sets"),
    ("eval: false", "eval: false, seed: 4", 5, "finetune.seed: the recipe's `seeds:` sets"),
])
def test_bad_seeds_name_line_and_key(tmp_path, old, new, line, needle):
    p = tmp_path / "r.yaml"
    text = SEEDED.format(out=tmp_path / "runs")
    assert old in text
    p.write_text(text.replace(old, new))
    with pytest.raises(TVToolError) as exc:
        load_recipe(p)
    assert str(exc.value).startswith(f"{p}:{line}:") and needle in str(exc.value), str(exc.value)


def test_seeded_run_end_to_end_summary_and_json(tmp_path, capsys):
    """`tvtool run` on a seeded recipe: outputs per seed, summary.json with per-seed figures, mean +- std per group and
    the paired difference, each recomputed here from the addition results; the table says the settings."""
    import math

    from cli_helpers import run_tvtool

    p = tmp_path / "r.yaml"
    p.write_text(SEEDED.format(out=tmp_path / "runs"))
    r = run_tvtool("run", p, "-q", "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    stored = json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert printed == stored
    add = {(g, s): json.loads((tmp_path / "runs" / g / f"seed-{s}" / "addition.json").read_text())
           for g in ("ft", "reg") for s in (0, 2)}
    v = stored["variants"]["reg/seed-2"]
    assert v["settings"] == {"mode": "full", "lambda": 10.0, "orthoreg_form": "plain", "orthoreg_scope": "reference",
                             "seed": 2, "distinct": {}}
    assert v["baseline"] == "ft/seed-2" and stored["variants"]["ft/seed-2"]["baseline"] == "ft/seed-2"
    t = "mini-shapes"
    for g, s in add:
        fig = stored["variants"][f"{g}/seed-{s}"]
        assert fig["abs_acc"] == pytest.approx(100 * add[g, s]["abs_acc"])
        assert fig["norm_acc"] == pytest.approx(100 * add[g, s]["test_acc"][t] / add[g, s]["finetuned_acc"]["test"][t])
        assert fig["norm_acc_vs_baseline"] == pytest.approx(
            100 * add[g, s]["test_acc"][t] / add["ft", s]["finetuned_acc"]["test"][t])
        assert fig["finetuned_acc"] == pytest.approx(100 * add[g, s]["finetuned_acc"]["test"][t])
    reg = stored["groups"]["reg"]
    assert reg["seeds"] == [0, 2] and reg["baseline"] == "ft" and stored["groups"]["ft"]["paired_vs_baseline"] is None
    abs_acc = [100 * add["reg", s]["abs_acc"] for s in (0, 2)]
    assert reg["figures"]["abs_acc"]["mean"] == pytest.approx(sum(abs_acc) / 2)
    assert reg["figures"]["abs_acc"]["std"] == pytest.approx(abs(abs_acc[0] - abs_acc[1]) / math.sqrt(2))
    diffs = [100 * (add["reg", s]["abs_acc"] - add["ft", s]["abs_acc"]) for s in (0, 2)]
    pair = reg["paired_vs_baseline"]["abs_acc"]
    assert pair["per_seed"] == pytest.approx(diffs) and pair["mean"] == pytest.approx(sum(diffs) / 2)
    assert pair["n"] == 2 and pair["df"] == 1 and pair["t_crit_05"] == 12.706
    if pair["se"]:
        assert pair["se"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2)  # sd / sqrt(2), sd = |d0 - d1| / sqrt(2)
    # the table (the same run again, in-process: everything is skipped): one row per group with its settings, and
    # the paired differences
    from tvtool.cli.train import _print_results
    from tvtool.recipes import run_recipe
    from tvtool.results import markdown, summary

    results = run_recipe(load_recipe(p), log=lambda m: None, quiet=True, device="cpu")
    assert summary(results) == stored
    _print_results(results, tmp_path / "runs")
    out = capsys.readouterr().out
    assert "full, lambda 10 plain/reference" in out and "full, lambda 0" in out
    assert "Norm.Acc vs baseline" in out and "reg - ft" in out and "+-" in out
    md = markdown(stored)
    mean_std = f"{reg['figures']['abs_acc']['mean']:.2f} +- {reg['figures']['abs_acc']['std']:.2f}"
    assert "| reg | full, lambda 10 plain/reference | 0,2 |" in md and mean_std in md


def test_dose_recipe_is_the_reference_loss_at_the_stated_doses():
    """recipes/mini-orthoreg-dose.yaml (issue 23): the reference loss, lambda 0 / 2.5 / 5 / 10 in full mode plus the
    squared form at lambda 10's equivalent (lambda / (2 sqrt k), k the blocks' smaller dimension), attn and linear at
    10, LoRA at 1 with 10x the learning rate, 3 paired seeds, each OrthoReg variant compared with its mode's FT."""
    import math

    from tvtool.models import load_clip
    from tvtool.quickstart import MINI_FINETUNE
    from tvtool.results import describe_runs

    r = load_recipe(RECIPES / "mini-orthoreg-dose.yaml")
    assert r.seeds == [0, 1, 2]
    runs = describe_runs(r)
    arms = {(x["mode"], x["lambda"], x["orthoreg_form"], x["distinct"]["lr"]) for x in runs.values()}
    lr = MINI_FINETUNE["lr"]
    assert {(m, lam) for m, lam, form, _ in arms if form == "plain"} == {
        ("full", 2.5), ("full", 5), ("full", 10), ("attn", 10), ("linear", 10), ("lora", 1)}
    assert all(x["orthoreg_scope"] == "reference" for x in runs.values() if x["lambda"])
    k = min(load_clip("tvtool-mini", "builtin", device="cpu").model.visual.transformer.resblocks[0]
            .attn.in_proj_weight.shape)
    (squared,) = [lam for m, lam, form, _ in arms if form == "squared"]
    assert squared == pytest.approx(10 / (2 * math.sqrt(k)), abs=0.005)
    assert {m: x for m, _, _, x in arms} == {"full": lr, "attn": lr, "linear": lr, "lora": 10 * lr}
    for name, x in runs.items():
        base = runs[x["baseline"]]
        assert base["lambda"] == 0 and base["mode"] == x["mode"] and base["seed"] == x["seed"]
        assert base["distinct"] == x["distinct"]
    assert len(grid_points(r.eval["addition"]["grid"])) == 45


def test_eval_digest_names_the_data_root_of_tasks_that_read_one(tmp_path, monkeypatch):
    """An addition result measured on one data root is not reused for another; the mini tasks read none."""
    from tvtool.recipes import _eval_digest

    monkeypatch.delenv("TVTOOL_DATA", raising=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    def digest(tasks, root, step="addition", options=None):
        doc = {"model": "tvtool-mini", "out_dir": str(tmp_path / "runs"), "tasks": tasks, "data_root": root,
               "variants": [{"name": "ft", "mode": "full"}]}
        return _eval_digest(parse_recipe(doc, "t"), step, options or {"grid": "0:1:0.5"}, [])

    assert digest(["dtd"], str(tmp_path / "a")) != digest(["dtd"], str(tmp_path / "b"))
    assert digest(["mini-shapes"], str(tmp_path / "a")) == digest(["mini-shapes"], str(tmp_path / "b"))
    # negation also reads its control task's data
    neg = {"control": "imagenet"}
    assert digest(["mini-shapes"], str(tmp_path / "a"), "negation", neg) != \
        digest(["mini-shapes"], str(tmp_path / "b"), "negation", neg)


def test_run_reruns_a_vector_whose_base_weights_changed_under_the_same_name(tmp_path):
    """The settings name the base (`pretrained: FILE`), not its content: a re-made base file must retrain."""
    import torch
    from safetensors.torch import save_file

    from tvtool.models import load_clip
    from tvtool.recipes import run_recipe
    from tvtool.taskvector import open_vector

    weights = tmp_path / "base.safetensors"

    def make_base(seed):
        torch.manual_seed(seed)
        model = load_clip("tvtool-mini", "random", device="cpu").model
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))

    make_base(0)
    doc = _tiny_recipe(tmp_path)
    doc.update(pretrained=str(weights), eval={})
    doc["variants"][0]["lambda"] = 0
    logs = []
    run_recipe(parse_recipe(doc, "t"), log=logs.append, device="cpu")
    out = tmp_path / "runs" / "ft" / "mini-shapes.st"
    first = open_vector(out).base_fingerprint
    logs.clear()
    run_recipe(parse_recipe(doc, "t"), log=logs.append, device="cpu")
    assert logs == [f"skip {out} (run 1 of 1: exists, same settings)"]
    make_base(1)
    logs.clear()
    run_recipe(parse_recipe(doc, "t"), log=logs.append, device="cpu")
    now = load_clip("tvtool-mini", str(weights), device="cpu").fingerprint
    assert now != first and open_vector(out).base_fingerprint == now
    assert any(m.startswith(f"rerun {out}: it was taken against base {first}") and now in m for m in logs), logs
