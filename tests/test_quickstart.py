"""The README's main job, at the reduced CI size: fine-tune, add, negate, cosine, table; reruns skip work."""
import json
from pathlib import Path

import pytest

from tvtool.cli import main
from tvtool.taskvector import open_vector

ROOT = Path(__file__).resolve().parents[1]

def test_quickstart_ci_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--size", "ci", "--out-dir", str(out), "-q"]) == 0
    table = capsys.readouterr().out
    assert "Abs.Acc" in table and "ft-orthoreg" in table
    for variant in ("ft", "ft-orthoreg"):
        vecs = sorted((out / variant).glob("*.st"))
        assert len(vecs) == 3
        meta = open_vector(vecs[0]).meta
        assert (meta["orthoreg"] is not None) == (variant == "ft-orthoreg")
        add = json.loads((out / variant / "addition.json").read_text())
        assert add["alpha"] in add["grid"] and 0 <= add["abs_acc"] <= 1
        # Abs.Acc is the mean of the per-task test accuracies at the chosen alpha
        assert abs(add["abs_acc"] - sum(add["test_acc"].values()) / 3) < 1e-12
        neg = json.loads((out / variant / "negation.json").read_text())
        assert neg["tasks"] == 3 and len(neg["per_task"]) == 3
    stamp = (out / "ft" / "addition.json").stat().st_mtime_ns
    capsys.readouterr()
    # everything exists: skipped; --json prints the same figures, accuracies in %
    assert main(["quickstart", "--size", "ci", "--out-dir", str(out), "-q", "--json"]) == 0
    assert (out / "ft" / "addition.json").stat().st_mtime_ns == stamp
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"zeroshot", "variants"} and set(summary["variants"]) == {"ft", "ft-orthoreg"}
    assert 0 < summary["zeroshot"]["abs_acc"] <= 100
    for variant, fig in summary["variants"].items():
        assert {"abs_acc", "norm_acc", "finetuned_acc", "tar_acc", "con_acc", "cosine"} <= set(fig)
        add = json.loads((out / variant / "addition.json").read_text())
        neg = json.loads((out / variant / "negation.json").read_text())
        assert abs(fig["abs_acc"] - 100 * add["abs_acc"]) < 1e-9 and abs(fig["norm_acc"] - 100 * add["norm_acc"]) < 1e-9
        assert abs(fig["finetuned_acc"] - 100 * sum(add["finetuned_acc"]["test"].values()) / 3) < 1e-9
        assert fig["tar_acc"] == (None if neg["tar_acc"] is None else 100 * neg["tar_acc"])
        assert fig["con_acc"] == (None if neg["con_acc"] is None else 100 * neg["con_acc"])
        assert -1 <= fig["cosine"] <= 1
    # README's table is rendered from this very output (of the full run: docs/quickstart.json, tests/test_readme.py):
    # the CI-size run has the same fields, and every cell of both tables is a figure
    committed = json.loads((ROOT / "docs" / "quickstart.json").read_text())
    assert set(summary["zeroshot"]) == set(committed["zeroshot"])
    assert {k: set(v) for k, v in summary["variants"].items()} == {k: set(v) for k, v in committed["variants"].items()}
    from tvtool.quickstart import markdown_rows

    for detailed in (False, True):
        rows = markdown_rows(summary, detailed=detailed)
        assert len(rows) == 3 and all(cell.strip() for row in rows for cell in row.split("|")[1:-1])
        assert rows[1].count(" - ") == 0 and rows[2].count(" - ") == 0  # every variant figure was computed


@pytest.mark.benchmark
def test_full_quickstart_reproduces_the_committed_figures(tmp_path):
    """`tvtool quickstart --json` (about 3 minutes of CPU) prints docs/quickstart.json again, to the digits shown."""
    from cli_helpers import run_tvtool
    from tvtool.quickstart import markdown_rows

    r = run_tvtool("quickstart", "--json", "--out-dir", str(tmp_path / "qs"), "-q", timeout=3600)
    assert r.returncode == 0, r.stderr[-2000:]
    committed = json.loads((ROOT / "docs" / "quickstart.json").read_text())
    for detailed in (False, True):
        assert markdown_rows(json.loads(r.stdout), detailed=detailed) == markdown_rows(committed, detailed=detailed)


# ------------------------------------------------------------------ recipes/mini-paper.yaml + its summary script
import importlib.util  # noqa: E402
import math  # noqa: E402


def _table_script():
    spec = importlib.util.spec_from_file_location("mini_paper_table", ROOT / "scripts" / "mini_paper_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mini_paper_recipe_parses_and_validates_with_every_mode_arm_and_seed():
    from tvtool.datasets.mini import MINI_TASKS
    from tvtool.quickstart import MINI_FINETUNE
    from tvtool.recipes import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "mini-paper.yaml")
    recipe.validate()
    assert recipe.tasks == list(MINI_TASKS) and recipe.model == "tvtool-mini"
    assert recipe.eval == {"addition": {"grid": "0:1:0.05"}}
    cells = {}
    for v in recipe.variants:
        assert {k: v.settings[k] for k in MINI_FINETUNE} == MINI_FINETUNE  # the quickstart's settings
        cells.setdefault((v.settings["mode"], float(v.settings.get("lam", 0))), set()).add(v.settings["seed"])
    modes = {m for m, _ in cells}
    assert modes == {"full", "attn", "lora", "linear"}
    for mode in modes:
        lams = {lam for m, lam in cells if m == mode}
        assert 0.0 in lams and len(lams) >= 3  # lambda 0 and at least two OrthoReg candidates to choose from
    assert all(seeds == {0} for seeds in cells.values())  # stage 1; the script adds seeds 1 and 2 of two arms


def _fabricate(tmp_path, runs: dict, in_recipe=None) -> Path:
    """A recipe over `runs` {(mode, lam, seed): (val, abs, norm, ortho, xi)} (only those `in_recipe` selects) and
    the result files each run would leave, in the folders the script names its further seeds by."""
    lines = ["out_dir: " + str(tmp_path / "runs"), "model: tvtool-mini", "tasks: [mini-digits, mini-mnist]",
             "finetune: {lr: 0.001, batch_size: 64}", "variants:"]
    for (mode, lam, seed), (val, abs_acc, norm, ortho, xi) in runs.items():
        name = f"{mode}-lam{lam:g}-s{seed}"
        if in_recipe is None or in_recipe((mode, lam, seed)):
            lines.append(f"  - {{name: {name}, mode: {mode}, lambda: {lam}, seed: {seed}}}")
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        add = {"alpha": 0.1, "abs_acc": abs_acc, "norm_acc": norm, "splits": {"select": "val", "report": "test"},
               "finetuned_acc": {"val": {}, "test": {"mini-digits": 0.8, "mini-mnist": 0.9 + lam}},
               # the point at the chosen alpha is the selection figure; a better one elsewhere must be ignored
               "curve": [{"alpha": 0.05, "mean_val_acc": 0.999}, {"alpha": 0.1, "mean_val_acc": val}]}
        (folder / "addition.json").write_text(json.dumps(add))
        (folder / "ortho.json").write_text(json.dumps({"mean": ortho, "mean_norm": 2 * ortho}))
        (folder / "disentanglement-mini-digits-mini-mnist.json").write_text(json.dumps({"mean_error": xi}))
    recipe = tmp_path / "paper.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    return recipe


def test_mini_paper_table_selects_lambda_on_mean_val_and_computes_mean_std_and_verdict(tmp_path, capsys):
    runs = {
        # full: lambda 0.01 has the best single-seed Val (0.70) and the best test figures, but lambda 0.1 the best
        # Val *mean* over seeds (0.60 > 0.5667): 0.1 must be chosen
        ("full", 0, 0): (0.99, 0.60, 0.70, 10.0, 0.30), ("full", 0, 1): (0.99, 0.62, 0.72, 12.0, 0.99),
        ("full", 0, 2): (0.99, 0.64, 0.74, 14.0, 0.99),
        ("full", 0.01, 0): (0.70, 0.90, 0.90, 1.0, 0.0), ("full", 0.01, 1): (0.50, 0.90, 0.90, 1.0, 0.0),
        ("full", 0.01, 2): (0.50, 0.90, 0.90, 1.0, 0.0),
        ("full", 0.1, 0): (0.60, 0.66, 0.71, 8.0, 0.20), ("full", 0.1, 1): (0.60, 0.67, 0.73, 8.0, 0.99),
        ("full", 0.1, 2): (0.60, 0.68, 0.72, 8.0, 0.99),
        # lora: a Val tie between the candidates goes to the smaller lambda; identical arms: no effect
        ("lora", 0, 0): (0.5, 0.5, 0.5, 3.0, 0.1), ("lora", 0, 1): (0.5, 0.6, 0.5, 3.0, 0.1),
        ("lora", 0, 2): (0.5, 0.7, 0.5, 3.0, 0.1),
        ("lora", 0.01, 0): (0.5, 0.5, 0.5, 3.0, 0.1), ("lora", 0.01, 1): (0.5, 0.6, 0.5, 3.0, 0.1),
        ("lora", 0.01, 2): (0.5, 0.7, 0.5, 3.0, 0.1),
        ("lora", 0.1, 0): (0.5, 0.1, 0.5, 3.0, 0.1), ("lora", 0.1, 1): (0.5, 0.1, 0.5, 3.0, 0.1),
        ("lora", 0.1, 2): (0.5, 0.1, 0.5, 3.0, 0.1),
    }
    recipe = _fabricate(tmp_path, runs)
    out = tmp_path / "table.json"
    script = _table_script()
    assert script.main([str(recipe), "--no-compute", "--json-out", str(out)]) == 0
    table = json.loads(out.read_text())
    full = table["modes"]["full"]
    assert full["chosen_lambda"] == 0.1
    assert full["candidates"]["0.01"]["val_acc"] == pytest.approx(1.7 / 3)
    ft, orth = full["ft"], full["orthoreg"]
    assert ft["abs_acc"] == pytest.approx(0.62) and ft["abs_acc_std"] == pytest.approx(0.02)
    assert orth["abs_acc"] == pytest.approx(0.67) and orth["abs_acc_std"] == pytest.approx(0.01)
    assert ft["norm_acc"] == pytest.approx(0.72) and orth["norm_acc"] == pytest.approx(0.72)
    assert ft["finetuned_acc"] == pytest.approx(0.85) and orth["finetuned_acc"] == pytest.approx(0.90)
    assert ft["ortho_deg"] == pytest.approx(12.0) and ft["ortho_deg_std"] == pytest.approx(2.0)
    assert ft["xi"] == 0.30 and orth["xi"] == 0.20  # the lowest seed's
    v = full["verdict"]["abs_acc"]  # diff 0.05, SE sqrt(0.02^2/3 + 0.01^2/3) = 0.012910
    assert v["diff"] == pytest.approx(0.05) and v["se"] == pytest.approx(math.sqrt(0.0005 / 3))
    assert v["t"] == pytest.approx(3.8730, abs=1e-4) and v["exceeds_noise"] is True
    assert full["verdict"]["norm_acc"]["exceeds_noise"] is False  # equal means
    lora = table["modes"]["lora"]
    assert lora["chosen_lambda"] == 0.01
    assert lora["verdict"]["abs_acc"] == {"diff": pytest.approx(0.0), "se": pytest.approx(0.1 * math.sqrt(2 / 3)),
                                          "t": pytest.approx(0.0), "exceeds_noise": False}
    text = capsys.readouterr().out
    assert ft["norm"] == pytest.approx(24.0) and ft["norm_std"] == pytest.approx(4.0)
    assert "| full | FT + OrthoReg | 0.1 | 90.00 +- 0.00 | 67.00 +- 1.00 | 72.00 +- 1.00 | 8.00 +- 0.00 | " \
        "16.00 +- 0.00 | 0.200 |" in text
    assert "| full | +5.00 (+3.87) | yes | +0.00 (+0.00) | no |" in text


def test_mini_paper_table_missing_results_is_one_line_error(tmp_path, capsys):
    recipe = _fabricate(tmp_path, {("full", 0, 0): (0.5,) * 5, ("full", 0.1, 0): (0.5,) * 5})
    (tmp_path / "runs" / "full-lam0.1-s0" / "addition.json").unlink()
    assert _table_script().main([str(recipe), "--no-compute"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "addition.json: missing; run `tvtool run" in err
    assert not (tmp_path / "runs" / "table.json").exists()


def test_mini_paper_two_stages_choose_on_seed0_then_run_the_chosen_arms_further_seeds(tmp_path, capsys, monkeypatch):
    """Stage 1 (the recipe) runs every candidate at seed 0; the script chooses lambda per mode on seed 0's Val, writes
    seeds 1-2 of lambda 0 and the chosen lambda as a recipe that `tvtool run` reads, and reports 3 seeds per arm."""
    from tvtool.recipes import load_recipe

    runs = {}
    for seed in (0, 1, 2):
        runs[("full", 0, seed)] = (0.5, 0.60 + 0.01 * seed, 0.7, 10.0, 0.3)
        runs[("full", 0.01, seed)] = (0.70 if seed == 0 else 0.1, 0.70 + 0.01 * seed, 0.8, 5.0, 0.4)
        runs[("full", 0.1, seed)] = (0.60, 0.99, 0.99, 1.0, 0.5)  # best test figures, but not the best Val at seed 0
        runs[("lora", 0, seed)] = (0.5, 0.5, 0.5, 3.0, 0.1)
        runs[("lora", 0.01, seed)] = (0.50, 0.9, 0.9, 3.0, 0.1)
        runs[("lora", 0.1, seed)] = (0.55, 0.4 + 0.1 * seed, 0.5, 2.0, 0.2)
    recipe_path = _fabricate(tmp_path, runs, in_recipe=lambda key: key[2] == 0)
    script = _table_script()
    recipe = load_recipe(recipe_path)
    chosen = script.choose_lambdas(recipe, "run it")
    assert chosen == {"full": 0.01, "lora": 0.1}
    planned = script.plan_seeds(recipe, chosen, [1, 2])
    assert sorted(v.name for v in planned) == sorted(f"{m}-lam{lam:g}-s{s}" for m, lam in
                                                     (("full", 0), ("full", 0.01), ("lora", 0), ("lora", 0.1))
                                                     for s in (1, 2))
    # the written recipe reads back with the same settings as the hand-written runs at those seeds would have
    ran = []
    monkeypatch.setattr("tvtool.recipes.run_recipe", lambda r, **kw: ran.append(r))
    seeds_path = script.run_seeds(recipe, planned, log=lambda line: None)
    again = load_recipe(seeds_path)
    assert ran and [v.name for v in ran[0].variants] == [v.name for v in planned]
    by_name = {v.name: v for v in recipe.variants}
    for v in again.variants:
        mode, lam, seed = v.name.split("-")
        first = by_name[f"{mode}-{lam}-s0"]
        assert again.train_config(v, "mini-digits").settings_digest() == recipe.train_config(
            first, "mini-digits", seed=int(seed[1:])).settings_digest()
        assert v.settings["seed"] == int(seed[1:]) and again.out_dir == (tmp_path / "runs").resolve()
    assert again.eval == recipe.eval and again.tasks == recipe.tasks
    # the table over both stages: lambda chosen on seed 0 only, 3 seeds per reported arm
    out = tmp_path / "table.json"
    assert script.main([str(recipe_path), "--no-compute", "--json-out", str(out)]) == 0
    table = json.loads(out.read_text())
    full = table["modes"]["full"]
    assert full["chosen_lambda"] == 0.01 and full["candidates"]["0.01"]["seeds"] == [0]
    assert full["candidates"]["0.01"]["val_acc"] == pytest.approx(0.70)
    assert full["orthoreg"]["seeds"] == [0, 1, 2] and full["ft"]["seeds"] == [0, 1, 2]
    assert full["orthoreg"]["abs_acc"] == pytest.approx(0.71) and full["ft"]["abs_acc"] == pytest.approx(0.61)
    assert table["modes"]["lora"]["chosen_lambda"] == 0.1
    assert table["modes"]["lora"]["orthoreg"]["abs_acc_std"] == pytest.approx(0.1)
    assert "| full | 0 | 0.01: 70.00 (70.00), 0.1: 60.00 (99.00) | 0.01 |" in capsys.readouterr().out
    assert script.main([str(recipe_path), "--no-compute", "--json-out", str(out), "--seeds", "2,1,1"]) == 0
    assert json.loads(out.read_text())["modes"]["full"]["orthoreg"]["seeds"] == [0, 1, 2]  # a repeated seed: once
    capsys.readouterr()
    # a further seed not yet run, with nothing to be computed: one line naming the way to run it
    (tmp_path / "runs" / "lora-lam0.1-s2" / "addition.json").unlink()
    assert script.main([str(recipe_path), "--no-compute"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lora-lam0.1-s2/addition.json: missing" in err and "without --no-compute" in err
    assert script.main([str(recipe_path), "--no-compute", "--seeds", "x"]) == 1
    assert "--seeds 'x'" in capsys.readouterr().err
