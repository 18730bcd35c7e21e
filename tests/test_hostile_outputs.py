"""Issue 19, the writing side: --force replaces only what tvtool wrote, folder swaps are atomic (or recoverable),
checkpoints and data roots lose nothing they did not create, recipes stay inside out_dir, and absurd settings,
seeds, grids and log paths are refused before any model is built."""
import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import assert_one_line, run_tvtool_patient as tvtool
from tvtool import fileio
from tvtool import taskvector as tv
from tvtool.errors import TVToolError
from tvtool.recipes import load_recipe, parse_recipe


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TVTOOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TVTOOL_DATA", raising=False)


def tree(folder):
    """What a folder holds, besides the marker that says tvtool wrote it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != fileio.FOLDER_MARKER)


# ---- --force onto folders ------------------------------------------------------------------------------------------

def write_folder(out, force=False, name="config.json"):
    with fileio.atomic_path(out, force, directory=True) as tmp:
        (tmp / name).write_text("{}")


def test_force_replaces_only_a_folder_tvtool_wrote(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(TVToolError, match="not written by tvtool"):
        write_folder(mine, force=True)
    assert tree(mine) == ["thesis.tex"]
    ours = tmp_path / "ours"
    write_folder(ours)
    write_folder(ours, force=True, name="model.safetensors")  # a folder tvtool wrote: replaced whole
    assert "model.safetensors" in tree(ours) and "config.json" not in tree(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "ours"]  # no temp or backup left


def test_force_folder_swap_is_atomic(tmp_path, monkeypatch):
    """Exchanged in one step: the old folder is never moved aside by a separate rename that could fail midway."""
    out = tmp_path / "out"
    write_folder(out)

    def no_rename(*a, **k):
        raise OSError(errno.EIO, "rename should not be needed")

    monkeypatch.setattr(os, "rename", no_rename)
    write_folder(out, force=True, name="new.json")
    assert "new.json" in tree(out)


def test_without_exchange_a_failed_swap_keeps_the_original_and_says_where(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_folder(out, name="original.json")
    monkeypatch.setattr(fileio, "_renameat2", lambda src, dst, flags: False)  # no renameat2 on this system
    real_rename = os.rename
    calls = []

    def second_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", second_fails)
    with pytest.raises(TVToolError) as e:
        write_folder(out, force=True, name="new.json")
    monkeypatch.setattr(os, "rename", real_rename)
    # put back where it was (the rename back is the third call) or, if that failed too, kept and named
    assert tree(out) == ["original.json"] or "original.json" in str(e.value)
    write_folder(tmp_path / "other")  # the next write of anything never removes a kept original
    write_folder(out, force=True, name="again.json")
    assert tree(out) == ["again.json"]


def test_failed_swap_whose_restore_fails_too_keeps_the_original_and_names_it(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_folder(out, name="original.json")
    monkeypatch.setattr(fileio, "_renameat2", lambda src, dst, flags: False)
    real_rename = os.rename
    calls = []

    def only_first_works(src, dst):
        calls.append((src, dst))
        if len(calls) >= 2:
            raise OSError(errno.EIO, "I/O error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", only_first_works)
    with pytest.raises(TVToolError) as e:
        write_folder(out, force=True, name="new.json")
    monkeypatch.setattr(os, "rename", real_rename)
    kept = calls[0][1]
    assert str(kept) in str(e.value) and (kept / "original.json").is_file()
    fileio.remove_stale_temps(out)
    write_folder(out.with_name("x"))
    assert (kept / "original.json").is_file()  # not mistaken for a dead writer's temp


def test_convert_force_onto_a_foreign_folder_or_its_own_input_is_refused(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    r = tvtool("convert", "tvtool-mini", "-o", out, "--force")
    assert_one_line(r, str(out), "not written by tvtool")
    assert tree(out) == ["notes.txt"]
    from tvtool.formats.convert import convert

    fresh = tmp_path / "fresh"
    convert("tvtool-mini", fresh)
    before = tree(fresh)
    (fresh / "stale.bin").write_text("left by an older tvtool output")
    r = tvtool("convert", fresh, "-o", fresh, "--force")  # the input's own folder
    assert_one_line(r, "is the input")
    assert tree(fresh) == sorted(before + ["stale.bin"])
    convert("tvtool-mini", fresh, force=True)  # a folder tvtool wrote: replaced whole
    assert tree(fresh) == before


def test_apply_onto_a_transformers_base_never_replaces_the_base(tmp_path):
    pytest.importorskip("transformers")
    from tvtool.checkpoints import open_weights
    from tvtool.formats.convert import convert

    base = tmp_path / "hf"
    convert("tvtool-mini", base)
    src = open_weights(str(base))
    key = next(k for k in src.keys() if k.startswith("visual.") and len(src.shape(k)) == 2)
    meta = tv.new_meta({"model": None, "pretrained": None, "fingerprint": None}, tasks=["t"])
    tv.write_vector(tmp_path / "v.st", {key: torch.full(tuple(src.shape(key)), 0.01)}, meta)
    before = tree(base)
    with pytest.raises(TVToolError, match="is the input"):
        tv.apply(str(base), [tmp_path / "v.st"], base, check_base=False, force=True)
    assert tree(base) == before


# ---- checkpoints, recipes, data prepare --------------------------------------------------------------------------

def test_finetune_never_removes_a_last_pt_it_did_not_write(tmp_path):
    ckdir = tmp_path / "ck"
    ckdir.mkdir()
    (ckdir / "last.pt").write_bytes(b"someone else's checkpoint")
    r = tvtool("finetune", "mini-shapes", "--max-steps", "1", "--no-eval", "--batch-size", "8", "--device", "cpu",
                   "--checkpoint-dir", ckdir, "-o", tmp_path / "v.st", "-q", timeout=300)
    assert r.returncode == 0, r.stderr
    assert (ckdir / "last.pt").read_bytes() == b"someone else's checkpoint"
    r = tvtool("finetune", "mini-shapes", "--max-steps", "1", "--no-eval", "--checkpoint-every", "1",
                   "--checkpoint-dir", ckdir, "-o", tmp_path / "w.st", "-q")
    assert_one_line(r, str(ckdir / "last.pt"))
    assert (ckdir / "last.pt").read_bytes() == b"someone else's checkpoint" and not (tmp_path / "w.st").exists()


RECIPE = """\
model: tvtool-mini
out_dir: {out}
tasks: [mini-shapes]
variants:
  - {{name: {name}, mode: full}}
"""


@pytest.mark.parametrize("name", ["'..'", "'.'", "a/b", "'a\\\\b'", '"a\\0b"', "''", "' '"])
def test_recipe_variant_names_that_are_not_plain_folder_names_are_refused(tmp_path, name):
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE.format(out=tmp_path / "runs", name=name))
    with pytest.raises(TVToolError, match="variants.0"):
        load_recipe(p)


def test_recipe_strings_with_nul_bytes_are_one_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE.format(out='"runs/\\0x"', name="ft"))
    with pytest.raises(TVToolError, match="out_dir"):
        load_recipe(p)
    p.write_text(RECIPE.format(out="runs", name="ft") + 'data_root: "/d\\0"\n')
    r = tvtool("run", p)
    assert_one_line(r, "data_root")


def test_recipe_pretrained_path_is_relative_to_the_recipe(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    from tvtool.models import load_clip

    save_file({k: v.contiguous() for k, v in load_clip("tvtool-mini").model.state_dict().items()},
              folder / "base.safetensors")
    (folder / "r.yaml").write_text(RECIPE.format(out="runs", name="ft") + "pretrained: base.safetensors\n")
    monkeypatch.chdir(tmp_path)
    r = load_recipe(folder / "r.yaml")
    assert r.pretrained == str(folder / "base.safetensors")
    r.validate(only_train=True)


def test_recipe_never_replaces_a_file_at_its_output_path_that_tvtool_did_not_write(tmp_path, monkeypatch):
    from tvtool import train
    from tvtool.recipes import run_recipe

    p = tmp_path / "r.yaml"
    p.write_text(RECIPE.format(out=tmp_path / "runs", name="ft"))
    theirs = tmp_path / "runs" / "ft" / "mini-shapes.st"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("my notes, not a task vector")
    monkeypatch.setattr(train, "finetune", lambda *a, **k: pytest.fail("trained before checking the outputs"))
    with pytest.raises(TVToolError, match="is not a task vector tvtool wrote"):
        run_recipe(load_recipe(p), log=lambda m: None)
    assert theirs.read_text() == "my notes, not a task vector"


def test_data_prepare_rolls_back_only_what_it_created(tmp_path, monkeypatch):
    import torchvision

    from tvtool.cli import main

    root = tmp_path / "data"
    root.mkdir()
    (root / "mine.txt").write_text("was here before")

    def half_download(path, *a, **k):
        (root / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
        (root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"partial")
        subprocess.run([sys.executable, "-c", f"open({str(root / 'other-process.txt')!r}, 'w').write('meanwhile')"],
                       check=True)  # another process writing into the same data root
        raise OSError("connection reset")

    monkeypatch.setattr(torchvision.datasets, "MNIST", half_download)
    assert main(["data", "prepare", "mnist", "--data-root", str(root)]) == 1
    assert sorted(p.name for p in root.iterdir()) == ["mine.txt", "other-process.txt"]


# ---- combining vectors of unknown and different bases --------------------------------------------------------------

def vector(path, fp, keys=("visual.w",)):
    meta = tv.new_meta({"model": None, "pretrained": None, "fingerprint": fp}, tasks=["t"])
    tv.write_vector(path, {k: torch.full((3,), 0.5) for k in keys}, meta)
    return path


def test_union_refuses_a_vector_without_base_fingerprint_beside_one_with(tmp_path):
    a = vector(tmp_path / "a.st", "fp1:" + "a" * 16)
    b = vector(tmp_path / "b.st", None, keys=("visual.other",))
    r = tvtool("add", a, b, "--union", "-o", tmp_path / "ab.st")
    assert_one_line(r, "b.st", "no base fingerprint")
    assert not (tmp_path / "ab.st").exists()


def test_every_recorded_base_fingerprint_must_agree_not_only_with_the_first(tmp_path):
    a = vector(tmp_path / "a.st", None)
    b = vector(tmp_path / "b.st", "fp1:" + "b" * 16)
    c = vector(tmp_path / "c.st", "fp1:" + "c" * 16)
    r = tvtool("add", a, b, c, "-o", tmp_path / "abc.st")
    assert_one_line(r, "different base")
    assert not (tmp_path / "abc.st").exists()


# ---- refused before any model: absurd schedules, seeds, grids, log paths -------------------------------------------

def test_absurd_epochs_are_refused_at_once(tmp_path):
    r = tvtool("finetune", "mini-shapes", "--epochs", "1000000000", "-o", tmp_path / "v.st", timeout=300)
    assert_one_line(r, "--epochs")
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE.format(out="runs", name="ft") + "finetune: {epochs: 1000000000}\n")
    with pytest.raises(TVToolError, match="epochs"):
        load_recipe(p)


@pytest.mark.parametrize("grid", ["0:inf:1", "0:1e308:1e-300", "-1e308:1e308:1e-3", "0:nan:1"])
def test_unbounded_grids_are_one_line(tmp_path, grid):
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE.format(out="runs", name="ft") + f'eval: {{addition: {{grid: "{grid}"}}}}\n')
    with pytest.raises(TVToolError, match="grid"):
        load_recipe(p)


def test_seeds_beyond_two_to_the_63_are_one_line_and_large_seeds_work(tmp_path):
    r = tvtool("finetune", "mini-shapes", "--seed", str(2**63), "-o", tmp_path / "v.st")
    assert_one_line(r, "--seed")
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE.format(out="runs", name="ft") + f"seed: {2**64}\n")
    with pytest.raises(TVToolError, match="seed"):
        load_recipe(p)
    from tvtool import train

    train._seed_everything(2**63 - 1)  # numpy's legacy seeding takes < 2**32: reduced, not refused
    for seed in (2**63 - 1, 2**40):
        assert torch.equal(train.epoch_permutation(seed, 3, 10), train.epoch_permutation(seed, 3, 10))
    assert train.epoch_permutation(5, 0, 10).tolist() == torch.randperm(
        10, generator=torch.Generator().manual_seed(5 * 1_000_003)).tolist()  # small seeds: the same runs as before


def test_log_at_a_fifo_is_refused_before_any_model(tmp_path):
    fifo = tmp_path / "log"
    os.mkfifo(fifo)
    try:
        r = tvtool("finetune", "mini-shapes", "--max-steps", "1", "--no-eval", "--log", fifo,
                       "-o", tmp_path / "v.st", timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("finetune blocked on a FIFO --log")
    assert_one_line(r, str(fifo), "FIFO")
    assert not (tmp_path / "v.st").exists()
