"""The design card's lines as written (issue 21) and what a new user met in the first hour (issue 26), each through
the installed `tvtool` in a subprocess: default output names, `-o -` to stdout, `inspect --cosine` on the current
directory, task-name aliases, TensorBoard logs, the model card of `apply`, and the first-hour fixes."""
from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

from cli_helpers import REPO, entry_point, run_python, run_tvtool

MINI_BASE = REPO / "tvtool" / "data" / "tvtool-mini.safetensors"
KEYS = ("visual.proj", "visual.transformer.resblocks.0.mlp.c_fc.weight")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TVTOOL_DATA"}
    env.update({"PYTHONPATH": str(REPO), "COLUMNS": "120", "NO_COLOR": "1", "OMP_NUM_THREADS": "1", **extra})
    return env


def run_to(stdout_path: Path, *args, cwd=None) -> subprocess.CompletedProcess:
    """`tvtool ARGS > stdout_path` (binary stdout into a file, as a shell redirect does)."""
    with open(stdout_path, "wb") as f:
        return subprocess.run([entry_point(), *map(str, args)], stdout=f, stderr=subprocess.PIPE, cwd=cwd,
                              env=_env(), timeout=600, text=False)


def _mini_vector(path: Path, task: str, seed: int, mode: str = "full", scale: float = 0.02) -> dict:
    """A small random vector against the bundled tvtool-mini, recorded like a fine-tuned one."""
    from tvtool.checkpoints import open_weights
    from tvtool.safetensors_io import fingerprint
    from tvtool.taskvector import history_entry, new_meta, write_vector

    base = open_weights(MINI_BASE)
    rng = np.random.default_rng(seed)
    tensors = {k: (scale * rng.standard_normal(base.shape(k))).astype(np.float32) for k in KEYS}
    meta = new_meta({"model": "tvtool-mini", "pretrained": "builtin", "fingerprint": fingerprint(base)},
                    tasks=[task], mode=mode, history=[history_entry("finetune", task=task, mode=mode, steps=1)])
    write_vector(path, tensors, meta)
    return tensors


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    d = tmp_path_factory.mktemp("mini")
    a = _mini_vector(d / "a.st", "mini-shapes", 0)
    b = _mini_vector(d / "b.st", "mini-colors", 1)
    _mini_vector(d / "lin.st", "mini-shapes", 2, mode="linear")
    return d, a, b


def _fresh(tmp_path: Path, mini) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    for name in ("a.st", "b.st", "lin.st"):
        (d / name).write_bytes((mini[0] / name).read_bytes())
    return d


# ------------------------------------------------------------------------------------------------ issue 21
def test_card_add_line_writes_its_default_name(tmp_path, mini):
    d = _fresh(tmp_path, mini)
    r = run_tvtool("add", "a.st", "b.st", "--alpha", "0.3", cwd=d)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and "wrote a+b-alpha0.3.st" in r.stderr
    got = load_file(d / "a+b-alpha0.3.st")
    for k in KEYS:
        np.testing.assert_allclose(got[k], 0.3 * (mini[1][k] + mini[2][k]), rtol=1e-6, atol=1e-7)
    again = run_tvtool("add", "a.st", "b.st", "--alpha", "0.3", cwd=d)  # refused, never clobbered
    assert again.returncode == 1 and "a+b-alpha0.3.st: already exists; pass --force" in again.stderr


def test_o_dash_streams_the_finished_file_and_a_failure_leaves_the_target_empty(tmp_path, mini):
    d = _fresh(tmp_path, mini)
    r = run_to(d / "ab.st", "add", "a.st", "b.st", "--alpha", "0.3", "-o", "-", cwd=d)
    assert r.returncode == 0, r.stderr
    assert b"wrote <stdout>" in r.stderr
    got = load_file(d / "ab.st")
    for k in KEYS:
        np.testing.assert_allclose(got[k], 0.3 * (mini[1][k] + mini[2][k]), rtol=1e-6, atol=1e-7)
    assert sorted(p.name for p in d.iterdir()) == ["a.st", "ab.st", "b.st", "lin.st"]  # no file besides stdout's
    bad = run_to(d / "bad.st", "add", "a.st", "missing.st", "-o", "-", cwd=d)
    assert bad.returncode == 1 and (d / "bad.st").stat().st_size == 0
    # a non-finite result is refused after the tensors were computed: still nothing on stdout
    nan = dict(mini[1])
    nan[KEYS[0]] = nan[KEYS[0]].copy()
    nan[KEYS[0]][0, 0] = 3e38
    from tvtool.taskvector import open_vector, write_vector

    write_vector(d / "big.st", nan, open_vector(d / "a.st").meta)
    overflow = run_to(d / "inf.st", "add", "big.st", "big.st", "--dtype", "fp16", "-o", "-", cwd=d)
    assert overflow.returncode == 1 and (d / "inf.st").stat().st_size == 0, overflow.stderr


def test_o_dash_refuses_a_terminal(tmp_path, mini):
    d = _fresh(tmp_path, mini)
    leader, follower = pty.openpty()
    try:
        r = subprocess.run([entry_point(), "negate", "a.st", "-o", "-"], stdout=follower, stderr=subprocess.PIPE,
                           cwd=d, env=_env(), timeout=300)
    finally:
        os.close(follower)
        os.set_blocking(leader, False)
        try:
            shown = os.read(leader, 65536)
        except OSError:
            shown = b""
        os.close(leader)
    assert r.returncode == 1 and b"stdout is a terminal" in r.stderr
    assert shown == b""  # not a byte of binary reached the terminal


def test_redirecting_stdout_without_o_dash_says_where_the_file_went(tmp_path, mini):
    d = _fresh(tmp_path, mini)
    r = run_to(d / "ab.st", "add", "a.st", "b.st", "--alpha", "0.3", cwd=d)
    assert r.returncode == 0
    assert b"pass `-o -` to write it to stdout" in r.stderr and (d / "a+b-alpha0.3.st").is_file()


@pytest.mark.parametrize("argv, name", [
    (["negate", "a.st"], "not_a.st"),
    (["negate", "a.st", "--alpha", "0.5"], "not_a-alpha0.5.st"),
    (["add", "a.st", "b.st", "--weights", "0.3,0.5"], "a+b-weights0.3_0.5.st"),
    (["merge", "-m", "ties", "a.st", "b.st", "--alpha", "0.4"], "ties-a+b-alpha0.4.st"),
    (["apply", "a.st", "--alpha", "0.5"], "a-alpha0.5-model.safetensors"),
])
def test_every_file_writing_command_has_a_default_name_and_o_dash(tmp_path, mini, argv, name):
    d = _fresh(tmp_path, mini)
    r = run_tvtool(*argv, cwd=d)
    assert r.returncode == 0, r.stderr
    assert f"wrote {name}" in r.stderr and (d / name).is_file()
    streamed = run_to(d / "streamed.out", *argv, "-o", "-", cwd=d)
    assert streamed.returncode == 0, streamed.stderr
    a, b = load_file(d / name), load_file(d / "streamed.out")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_extract_and_convert_default_names(tmp_path):
    import torch

    g = torch.Generator().manual_seed(0)
    base = {"visual.w": torch.randn(8, 4, generator=g).numpy()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({"visual.w": base["visual.w"] + 0.1}, str(tmp_path / "cars_ft.safetensors"))
    common = ["extract", "--pretrained", "base.safetensors", "--finetuned", "cars_ft.safetensors"]
    assert run_tvtool(*common, "--task", "cars", cwd=tmp_path).returncode == 0
    assert run_tvtool(*common, cwd=tmp_path).returncode == 0
    np.testing.assert_allclose(load_file(tmp_path / "cars.st")["visual.w"], 0.1, rtol=1e-5)
    assert (tmp_path / "cars_ft.st").is_file()
    torch.save({"visual.w": torch.from_numpy(base["visual.w"])}, tmp_path / "finetuned.pt")
    r = run_tvtool("convert", "finetuned.pt", cwd=tmp_path)
    assert r.returncode == 0 and "wrote finetuned.safetensors" in r.stderr, r.stderr
    np.testing.assert_array_equal(load_file(tmp_path / "finetuned.safetensors")["visual.w"], base["visual.w"])


def test_inspect_cosine_without_files_compares_the_vectors_here_in_order(tmp_path, mini):
    d = _fresh(tmp_path, mini)
    (d / "lin.st").unlink()
    (d / "junk.st").write_bytes(b"")  # e.g. a failed redirect: skipped, and said so
    r = run_tvtool("inspect", "--cosine", "--json", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "in this order: a.st, b.st" in r.stderr and "skipped junk.st" in r.stderr
    explicit = run_tvtool("inspect", "--cosine", "--json", "a.st", "b.st", cwd=d)
    assert json.loads(r.stdout)["cosine"] == json.loads(explicit.stdout)["cosine"]
    a = np.concatenate([mini[1][k].ravel() for k in KEYS])
    b = np.concatenate([mini[2][k].ravel() for k in KEYS])
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert json.loads(r.stdout)["cosine"][0][1] == pytest.approx(cos, abs=1e-6)
    empty = tmp_path / "empty"
    empty.mkdir()
    none = run_tvtool("inspect", "--cosine", cwd=empty)
    assert none.returncode == 1 and none.stderr.count("\n") == 1 and "0 *.st file(s)" in none.stderr


def test_card_finetune_line_offline_without_data_is_one_line_exit_1(tmp_path):
    r = subprocess.run([entry_point(), "finetune", "cars", "--lambda", "1e-4"], capture_output=True, text=True,
                       cwd=tmp_path, env=_env(), timeout=300)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: cars: no data root")
    assert "see `tvtool data check`" not in r.stderr and not list(tmp_path.iterdir())


@pytest.mark.parametrize("spelled", ["stanford-cars", "CarsVal", "StanfordCars"])
def test_fusionbench_and_tall_masks_task_names_are_aliases(tmp_path, spelled):
    r = subprocess.run([entry_point(), "finetune", spelled], capture_output=True, text=True, cwd=tmp_path,
                       env=_env(), timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("error: cars: no data root"), r.stderr


def test_suite_and_task_aliases_resolve_like_fusionbench_and_tall_masks():
    from tvtool.datasets import resolve_tasks
    from tvtool.errors import TVToolError

    # FusionBench config/dataset/image_classification/test/TALL20.yaml, in its order (emnist_letters aside: another
    # split of EMNIST than the digits tvtool's emnist holds)
    fusionbench = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd",
                   "oxford_flowers102", "pcam", "fer2013", "oxford-iiit-pet", "stl10", "cifar100", "cifar10",
                   "food101", "fashion_mnist", "kmnist", "rendered-sst2"]
    ta20 = resolve_tasks("ta20")
    assert resolve_tasks(fusionbench) == [t for t in ta20 if t != "emnist"]
    # TALL masks' src/utils/variables_and_paths.py ALL_DATASETS, with the "Val" suffix of its training splits
    tall = ["Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SVHN", "SUN397", "STL10", "OxfordIIITPet",
            "Flowers102", "CIFAR100", "PCAM", "FER2013", "CIFAR10", "Food101", "FashionMNIST", "RenderedSST2",
            "EMNIST", "KMNIST"]
    assert sorted(resolve_tasks([t + "Val" for t in tall])) == sorted(ta20)
    assert resolve_tasks("TA8") == ta20[:8] and resolve_tasks("TALL14") == resolve_tasks("ta14")
    assert resolve_tasks("TALL20") == ta20
    with pytest.raises(TVToolError, match="emnist_letters is EMNIST's letters split"):
        resolve_tasks("emnist_letters")


def test_tensorboard_log_holds_the_json_lines_figures(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = run_tvtool("finetune", "mini-shapes", "--lambda", "0.1", "--max-steps", "3", "--log-every", "1",
                   "--no-eval", "--log", "log.jsonl", "--log-dir", "tb", "--device", "cpu", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "writing mini-shapes-lambda0.1.st (default name" in r.stderr
    assert (tmp_path / "mini-shapes-lambda0.1.st").is_file()
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(tmp_path / "tb" / "mini-shapes-lambda0.1"))
    acc.Reload()
    for name in ("task_loss", "penalty", "lr"):
        events = acc.Scalars(f"train/{name}")
        assert [e.step for e in events] == [x["step"] for x in lines]
        np.testing.assert_allclose([e.value for e in events], [x[name] for x in lines], rtol=1e-6)


def test_log_dir_without_tensorboard_is_one_line_before_any_work(tmp_path):
    code = ("import sys\nsys.modules['tensorboard'] = None  # as if not installed\nfrom tvtool.cli import main\n"
            f"rc = main(['finetune', 'mini-shapes', '--log-dir', {str(tmp_path / 'tb')!r}, '-o', "
            f"{str(tmp_path / 'v.st')!r}])\n"
            "assert rc == 1 and 'torch' not in sys.modules, rc\n")
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert "needs the tensorboard package: pip install 'tvtool[tensorboard]'" in r.stderr
    assert not list(tmp_path.iterdir())


def test_apply_onto_a_transformers_folder_writes_a_hub_model_card(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    from tvtool.taskvector import extract

    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8), projection_dim=16)
    base = transformers.CLIPModel(cfg)
    hub = tmp_path / "hub" / "models--openai--clip-vit-base-patch32" / "snapshots" / "abc123"
    base.save_pretrained(hub)
    fc1 = "vision_model.encoder.layers.0.mlp.fc1.weight"
    for i, delta in enumerate((0.5, -0.25)):
        ft = transformers.CLIPModel(cfg)
        state = base.state_dict()
        state[fc1] = state[fc1] + delta
        ft.load_state_dict(state)
        ft.save_pretrained(tmp_path / f"ft{i}")
        extract(str(hub), str(tmp_path / f"ft{i}"), tmp_path / f"t{i}.st", tasks=[f"task{i}"])
    assert run_tvtool("add", "t0.st", "t1.st", "--alpha", "0.5", "-o", "sum.st", cwd=tmp_path).returncode == 0
    r = run_tvtool("apply", "sum.st", "t0.st", "--alpha", "0.3", cwd=tmp_path)  # base: the one the vectors record
    assert r.returncode == 0, r.stderr
    out = tmp_path / "sum+t0-alpha0.3-model"
    assert f"base: {hub.resolve()} (recorded in the vectors" in r.stderr
    applied = transformers.CLIPModel.from_pretrained(out).state_dict()
    want = base.state_dict()[fc1] + 0.3 * (0.5 * (0.5 - 0.25) + 0.5)
    torch.testing.assert_close(applied[fc1], want)
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == "openai/clip-vit-base-patch32" and front["library_name"] == "transformers"
    assert {"tvtool", "task-arithmetic"} <= set(front["tags"])
    for needle in ("`sum.st`", "`t0.st`", "| 0.3 |", "`add`: alpha 0.5", "input `t1.st`", "`extract`", "task1"):
        assert needle in text, needle
    hub_lib = pytest.importorskip("huggingface_hub")
    card = hub_lib.ModelCard.load(out / "README.md")  # the hub library reads the front matter itself
    assert card.data.base_model == "openai/clip-vit-base-patch32" and card.data.library_name == "transformers"


def test_readme_first_example_block_holds_the_card_lines():
    import re

    blocks = re.findall(r"```(\w+)\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    lines = [line.split("#")[0].strip() for line in blocks[1][1].splitlines()]
    for card in ("tvtool finetune cars --lambda 1e-4", "tvtool add a.st b.st --alpha 0.3", "tvtool inspect --cosine"):
        assert card in lines, card


# ------------------------------------------------------------------------------------------------ issue 26
def test_apply_refuses_a_linear_mode_vector_unless_nonlinear(tmp_path, mini):
    d = _fresh(tmp_path, mini)
    r = run_tvtool("apply", "lin.st", "-o", "m.safetensors", cwd=d)
    assert r.returncode == 1 and "linear-mode (tangent) fine-tuning" in r.stderr and "--nonlinear" in r.stderr
    assert not (d / "m.safetensors").exists()
    ok = run_tvtool("apply", "lin.st", "--nonlinear", "-o", "m.safetensors", cwd=d)
    assert ok.returncode == 0, ok.stderr
    base = load_file(MINI_BASE)
    lin = load_file(d / "lin.st")
    np.testing.assert_allclose(load_file(d / "m.safetensors")[KEYS[0]], base[KEYS[0]] + lin[KEYS[0]], rtol=1e-6)
    shown = " ".join(run_tvtool("apply", "--help").stdout.split())  # the help says what the file then holds
    assert "--nonlinear" in shown and "ordinary (non-linear) model theta_0 + alpha * tau" in shown


def test_apply_defaults_to_the_recorded_base(tmp_path, mini):
    d = _fresh(tmp_path, mini)
    r = run_tvtool("apply", "a.st", "b.st", "-o", "m.safetensors", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "base: tvtool-mini:builtin (recorded in the vectors" in r.stderr
    base, out = load_file(MINI_BASE), load_file(d / "m.safetensors")
    np.testing.assert_allclose(out[KEYS[1]], base[KEYS[1]] + mini[1][KEYS[1]] + mini[2][KEYS[1]], rtol=1e-6)
    untouched = "visual.conv1.weight"
    np.testing.assert_array_equal(out[untouched], base[untouched])


def test_mini_tasks_default_to_the_quickstart_settings_and_a_useless_schedule_is_said(tmp_path):
    from tvtool.recipes import load_recipe
    from tvtool.taskvector import open_vector

    r = run_tvtool("finetune", "mini-shapes", "--max-steps", "12", "--no-eval", "--device", "cpu", "-o", "d.st",
                   cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr
    train = open_vector(tmp_path / "d.st").meta["train"]
    shipped = load_recipe(REPO / "recipes" / "mini.yaml").variants[0].settings  # what the quickstart runs
    assert {k: train[k] for k in ("lr", "warmup_steps", "batch_size")} == \
        {k: shipped[k] for k in ("lr", "warmup_steps", "batch_size")}
    assert "warning" not in r.stderr
    # the protocol's schedule on a mini task: ends inside its warm-up, and the vector hardly moves
    bad = run_tvtool("finetune", "mini-shapes", "--lr", "1e-5", "--warmup-steps", "500", "--max-steps", "3",
                     "--device", "cpu", "-o", "bad.st", cwd=tmp_path, timeout=900)
    assert bad.returncode == 0, bad.stderr
    assert "warning: mini-shapes: the run's 3 steps end inside its 500 warm-up steps" in bad.stderr
    assert "warning: mini-shapes: the task vector barely moved" in bad.stderr


def test_eval_negation_of_a_negated_vector_says_so(tmp_path, mini):
    d = _fresh(tmp_path, mini)
    assert run_tvtool("negate", "a.st", cwd=d).returncode == 0
    r = run_tvtool("eval", "negation", "not_a.st", cwd=d)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "not_a.st is already negated" in r.stderr and "(a.st)" in r.stderr
    from tvtool.evaluate import orientation
    from tvtool.taskvector import open_vector

    assert run_tvtool("negate", "not_a.st", "-o", "back.st", cwd=d).returncode == 0
    assert orientation(open_vector(d / "back.st").meta["history"]) == 1  # negated twice: the task's direction
    assert orientation(open_vector(d / "not_a.st").meta["history"]) == -1


def test_broken_torchvision_is_named_once_not_read_as_bad_images(tmp_path):
    fake = tmp_path / "fake" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    r = subprocess.run([entry_point(), "eval", "accuracy", "--tasks", "mini-shapes", "--max-examples", "4"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env=_env(PYTHONPATH=f"{tmp_path / 'fake'}{os.pathsep}{REPO}"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    from importlib import metadata

    assert (f"torchvision {metadata.version('torchvision')} cannot be loaded with torch "
            f"{metadata.version('torch')} (RuntimeError: operator torchvision::nms does not exist)") in r.stderr


def test_decode_names_the_broken_pair_instead_of_skipping_every_image(monkeypatch, tmp_path):
    import torch

    from tvtool import environment
    from tvtool.datasets.base import Listing
    from tvtool.datasets.cache import build
    from tvtool.errors import TVToolError

    monkeypatch.setattr(environment, "torchvision_problem", lambda: "RuntimeError: operator torchvision::nms")
    listing = Listing(ids=["x.png"], labels=torch.zeros(1, dtype=torch.int64), open=lambda i: None)
    path = tmp_path / "c.safetensors"
    with pytest.raises(TVToolError, match="torchvision .* cannot be loaded with torch"):
        build(listing, [0], path, "k", 8, what="x", meta={})
    assert list(tmp_path.iterdir()) == []  # refused before the cache file is begun


def test_run_logs_are_never_wrapped_and_say_run_k_of_n_with_an_eta(tmp_path):
    out = tmp_path / ("a-deliberately-long-folder-name-" * 3) / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "tvtool-mini", "pretrained": "builtin", "out_dir": str(out),
                                      "tasks": ["mini-shapes", "mini-colors"], "variants": [{"name": "ft"}],
                                      "finetune": {"max_steps": 2, "eval": False, "device": "cpu"}}))
    r = run_tvtool("run", str(recipe), cwd=tmp_path, env={"COLUMNS": "40"}, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert f"wrote {out / 'ft' / 'mini-shapes.st'} (run 1 of 2; about " in r.stderr
    assert "left for the other 1 fine-tuning run" in r.stderr
    assert any(line.startswith("run 2/2 ft/mini-colors: step") for line in lines), lines
    assert any(line.startswith(f"wrote {out / 'ft' / 'mini-colors.st'} (run 2 of 2") for line in lines)


def test_evaluation_progress_in_percent_and_the_negation_table_says_val(tmp_path, mini):
    d = _fresh(tmp_path, mini)
    r = run_tvtool("eval", "negation", "a.st", "--grid", "0,0.5", "--max-examples", "16", cwd=d, timeout=600)
    assert r.returncode == 0, r.stderr
    progress = [line for line in r.stderr.splitlines() if "alpha" in line]
    assert progress and all("%" in line for line in progress), progress
    title = " ".join(r.stdout.split())
    assert "chosen on Val, where control accuracy must stay >= 0.95 x zero-shot" in title


def test_eval_accuracy_without_vectors_defaults_to_the_task_family_model(tmp_path):
    r = run_tvtool("eval", "accuracy", "--tasks", "mini-shapes", "--max-examples", "8", "--json", cwd=tmp_path,
                   timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["model"] == "tvtool-mini" and result["pretrained"] == "builtin"


def test_data_check_is_not_circular_and_mini_tasks_need_no_root(tmp_path):
    r = subprocess.run([entry_point(), "data", "check"], capture_output=True, text=True, cwd=tmp_path, env=_env())
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no data root" in r.stderr
    assert "tvtool data check" not in r.stderr
    m = subprocess.run([entry_point(), "data", "check", "mini-shapes", "--json"], capture_output=True, text=True,
                       cwd=tmp_path, env=_env())
    assert m.returncode == 0, m.stderr
    assert json.loads(m.stdout)["datasets"][0]["present"] is True


@pytest.mark.parametrize("argv, says", [
    (["-o", "exists.st"], "exists.st: already exists; pass --force"),
    ([], "mini-shapes.st: already exists; pass --force"),
    (["--lr", "nan", "-o", "new.st"], "--lr must be a finite number"),
    (["--mode", "bogus", "-o", "new.st"], "unknown --mode 'bogus'"),
])
def test_finetune_refuses_before_importing_torch(tmp_path, argv, says):
    (tmp_path / "exists.st").write_bytes(b"x")
    (tmp_path / "mini-shapes.st").write_bytes(b"x")
    code = ("import os, sys\n"
            f"os.chdir({str(tmp_path)!r})\n"
            "from tvtool.cli import main\n"
            f"rc = main(['finetune', 'mini-shapes', *{argv!r}])\n"
            "heavy = sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules)\n"
            "assert rc == 1 and not heavy, (rc, heavy)\n")
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert says in r.stderr


def test_python_api_names_parameters_the_cli_names_flags(tmp_path, mini):
    d = _fresh(tmp_path, mini)
    code = ("from tvtool import taskvector\nfrom tvtool.errors import TVToolError\n"
            "from tvtool.trainconfig import TrainConfig\n"
            f"try:\n    taskvector.add([{str(d / 'a.st')!r}], {str(d / 'b.st')!r})\n"
            "except TVToolError as e:\n    print(e)\n"
            "try:\n    TrainConfig('mini-shapes', lr=float('nan')).resolved()\n"
            "except TVToolError as e:\n    print(e)\n")
    r = run_python(code)
    assert "pass force=True to overwrite" in r.stdout and "lr must be a finite number" in r.stdout
    assert "--force" not in r.stdout and "--lr" not in r.stdout
    cli = run_tvtool("add", "a.st", "-o", "b.st", cwd=d)
    assert "pass --force to overwrite" in cli.stderr


def test_finetune_defaults_are_trainconfigs():
    """Issue 20: each `tvtool finetune` default is TrainConfig's (declared once), and every field the CLI sets
    has its option."""
    import typer

    from tvtool.cli import app
    from tvtool.trainconfig import default_values

    params = {p.name: p for p in typer.main.get_command(app).commands["finetune"].params}
    renamed = {"form": "orthoreg_form", "scope": "orthoreg_scope", "estimator": "orthoreg_estimator",
               "probes": "orthoreg_probes", "warmup": "warmup_steps"}
    fields = default_values()
    checked = set()
    for name, p in params.items():
        field = renamed.get(name, name)
        if field == "compile_mode":  # None: not given (giving it implies --compile); then TrainConfig's default
            assert p.default is None and fields[field] == "default"
            checked.add(field)
        elif field in fields:
            assert p.default == fields[field], (name, p.default, fields[field])
            checked.add(field)
        elif name == "no_eval":
            assert p.default is (not fields["eval"])
            checked.add("eval")
    # Python / recipe settings only (compile_backend: e.g. aot_eager where no C++ compiler is at hand)
    assert set(fields) - checked == {"clip_grad", "eval_batch_size", "compile_backend"}
