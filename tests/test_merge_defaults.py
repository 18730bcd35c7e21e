"""Each merge method's default alpha search (from its paper) reaches `eval addition --merged` and recipes; LiNeS'
beta is searched on Val by recipes."""
from __future__ import annotations

import json

import pytest
import yaml

from test_evaluate import mini_world  # noqa: F401  (fixture: a random tvtool-mini, two vectors, fabricated data)
from test_recipes import GOOD
from tvtool import merge as mg
from tvtool.errors import TVToolError
from tvtool.recipes import merge_step_settings, parse_recipe


def test_eval_addition_on_a_merged_vector_searches_the_methods_grid(mini_world, capsys):  # noqa: F811
    from tvtool.cli import main

    tmp, paths = mini_world
    merged = tmp / "tsv.st"
    assert main(["merge", "-m", "tsv", *paths, "-o", str(merged)]) == 0
    capsys.readouterr()
    assert main(["eval", "addition", *paths, "--merged", str(merged), "--json", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert res["grid"] == mg.alpha_grid("tsv") == [1.0] and res["alpha"] == 1.0  # TSV-M: alpha 1, as its paper
    assert "alpha grid 1 (tsv's default" in captured.err
    assert main(["eval", "addition", *paths, "--merged", str(merged), "--grid", "0:1:0.5", "--json",
                 "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["grid"] == [0, 0.5, 1]  # an explicit grid wins


def _doc(tmp_path, merge_steps):
    doc = yaml.safe_load(GOOD.format(out=tmp_path / "runs"))
    doc["finetune"] = {"lr": 0.001, "max_steps": 2, "warmup_steps": 1, "batch_size": 32, "eval": False}
    doc["variants"] = [{"name": "ft", "mode": "full"}]
    doc["eval"] = {"merge": merge_steps}
    return doc


def test_recipe_merge_steps_use_the_methods_grid_and_tune_lines_beta(tmp_path):
    from tvtool.recipes import run_recipe

    r = parse_recipe(_doc(tmp_path, [{"method": "tsv"},
                                     {"method": "lines", "options": {"base": "ties"}, "name": "lines-ties",
                                      "tune": "0.2,0.8"}]), "test")
    res = run_recipe(r, log=lambda m: None, device="cpu")["variants"]["ft"]
    assert res["merge-tsv"]["grid"] == [1.0]
    lines = res["lines-ties"]
    assert lines["grid"] == [1.0] and [t["value"] for t in lines["tuned"]["tried"]] == [0.2, 0.8]
    scores = [t["mean_val_norm_acc"] for t in lines["tuned"]["tried"]]
    assert lines["tuned"]["chosen"] == [0.2, 0.8][scores.index(max(scores))]  # the Val-best, first on a tie
    chosen = lines["tuned"]["tried"][scores.index(max(scores))]
    assert lines["merged"] == chosen["merged"] and lines["abs_acc"] == chosen["abs_acc"]
    folder = tmp_path / "runs" / "ft"
    assert (folder / "lines-ties-beta0.2.st").is_file() and (folder / "lines-ties-beta0.8.st").is_file()
    assert json.loads((folder / "lines-ties.json").read_text())["tuned"]["chosen"] == lines["tuned"]["chosen"]


def test_merge_step_settings_make_defaults_explicit():
    assert merge_step_settings({"method": "iso-c"})["grid"] == mg.alpha_grid("iso-c")
    assert merge_step_settings({"method": "lines"})["tune"] == ["beta", [round(0.1 * i, 10) for i in range(1, 11)]]
    assert merge_step_settings({"method": "lines", "options": {"beta": 0.3}})["tune"] is None  # fixed: no search


@pytest.mark.parametrize("steps,needle", [
    ([{"method": "ties"}, {"method": "ties", "options": {"k": 50}}], "a second step named merge-ties"),
    ([{"method": "ties", "options": {"k": 150}}], "out of range"),
    ([{"method": "lines", "options": {"base": "ties", "base.q": 1}}], "unknown option 'base.q'"),
    ([{"method": "ties", "tune": "0:1:0.5"}], "tunes no option"),
    ([{"method": "ties", "name": "../x"}], "plain file name"),
])
def test_bad_merge_steps_are_refused_before_any_work(tmp_path, steps, needle):
    with pytest.raises(TVToolError, match=needle):
        parse_recipe(_doc(tmp_path, steps), "test")
