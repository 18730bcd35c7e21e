"""One parser for weights specs, one chooser of a folder's weights file, and the defaults with one home (issue 20)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cli_helpers import run_tvtool
from tvtool import defaults
from tvtool.errors import TVToolError
from tvtool.weights_spec import folder_weights, parse_pretrained, parse_weights


# ------------------------------------------------------------------------------------------------ the parser
def test_every_kind_of_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("w.safetensors", "w.st", "w.pt", "w.bin", "model.safetensors.index.json"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "folder").mkdir()
    expected = {
        "w.safetensors": ("safetensors", None, None), "w.st": ("safetensors", None, None),
        "w.pt": ("pickle", None, None), "w.bin": ("pickle", None, None),
        "model.safetensors.index.json": ("index", None, None), "folder": ("folder", None, None),
        "hf-hub:org/name": ("hf-hub", "hf-hub:org/name", None),
        "ViT-B-32": ("default", "ViT-B-32", None), "ViT-B-32:openai": ("tag", "ViT-B-32", "openai"),
        "ViT-B-32:random": ("random", "ViT-B-32", "random"), "RN50:none": ("random", "RN50", "none"),
        "tvtool-mini": ("builtin", "tvtool-mini", "builtin"),
        "tvtool-mini:builtin": ("builtin", "tvtool-mini", "builtin"),
        "ViT-B-32:w.pt": ("pickle", "ViT-B-32", "w.pt"), "ViT-B-32:folder": ("folder", "ViT-B-32", "folder"),
        "missing.safetensors": ("default", "missing.safetensors", None),  # "no such file" when opened
    }
    for text, (kind, arch, pretrained) in expected.items():
        spec = parse_weights(text)
        assert (spec.kind, spec.arch, spec.pretrained) == (kind, arch, pretrained), text
        assert spec.builds_model == (arch is not None), text
        assert (spec.path is not None) == (kind in ("safetensors", "pickle", "index", "folder")), text
    assert parse_weights("ViT-B-32:w.pt").path == Path("w.pt")


def test_pair_reads_as_model_colon_pretrained(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"")
    for model, pre in [("ViT-B-32", "openai"), ("ViT-B-32", None), ("ViT-B-32", str(tmp_path / "w.safetensors")),
                       ("tvtool-mini", None), ("ViT-B-32", "random"), ("hf-hub:org/name", None)]:
        joined = parse_weights(model if pre is None else f"{model}:{pre}")
        assert parse_pretrained(model, pre) == joined, (model, pre)


def test_reserved_names_come_before_the_working_directory(tmp_path, monkeypatch):
    """A folder named like a reserved tag does not change what --pretrained random / builtin mean."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "random").mkdir()
    (tmp_path / "builtin").mkdir()
    assert parse_pretrained("ViT-B-32", "random").kind == "random"
    assert parse_pretrained("tvtool-mini", "builtin").kind == "builtin"
    assert parse_pretrained("ViT-B-32", "builtin").kind == "folder"  # only tvtool-mini has the builtin tag


def test_home_folder_and_non_regular_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert parse_weights("~/w.safetensors").path == tmp_path / "w.safetensors"
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(TVToolError, match="not a regular file"):  # refused without opening (it would block)
        parse_weights(str(fifo))


# ------------------------------------------------------------------------------------------------ folders
def _touch(folder: Path, *names):
    folder.mkdir(exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")
    return folder


def _hf_config(folder: Path, model_type="clip"):
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))


def test_folder_chooser(tmp_path):
    f = _touch(tmp_path / "a", "open_clip_pytorch_model.bin", "open_clip_model.safetensors")
    assert (folder_weights(f).kind, folder_weights(f).file.name) == ("open_clip", "open_clip_model.safetensors")
    f = _touch(tmp_path / "b", "model.pth", "model.safetensors")  # safetensors before pickles
    assert folder_weights(f).file.name == "model.safetensors" and folder_weights(f).file_kind == "safetensors"
    f = _touch(tmp_path / "c", "pytorch_model.bin", "model.safetensors")
    _hf_config(f)
    chosen = folder_weights(f)
    assert (chosen.kind, chosen.file.name, chosen.model_type) == ("transformers", "model.safetensors", "clip")
    # hub repos hold both namings: open_clip's own file wins, and a transformers-named file is never read as open_clip
    f = _touch(tmp_path / "d", "open_clip_pytorch_model.bin", "model.safetensors")
    _hf_config(f)
    assert (folder_weights(f).kind, folder_weights(f).file.name) == ("open_clip", "open_clip_pytorch_model.bin")
    f = _touch(tmp_path / "e", "model.safetensors.index.json")
    assert folder_weights(f).file_kind == "index" and folder_weights(f).open_clip_config is None
    f = _touch(tmp_path / "f", "open_clip_model.safetensors", "open_clip_config.json")
    assert folder_weights(f).open_clip_config == f / "open_clip_config.json"
    with pytest.raises(TVToolError, match="folder holds none of open_clip_model.safetensors"):
        folder_weights(_touch(tmp_path / "empty"))
    empty_hf = _touch(tmp_path / "empty-hf")
    _hf_config(empty_hf, "clip_vision_model")
    with pytest.raises(TVToolError, match="transformers folder without model.safetensors"):
        folder_weights(empty_hf)


def test_load_clip_reads_a_sharded_folder(tmp_path):
    """Every command that builds a model goes through the same chooser as open_weights, so a folder of shards
    loads as it reads."""
    from tvtool import models
    from tvtool.checkpoints import open_weights
    from tvtool.safetensors_io import write_safetensors

    src = open_weights(models.MINI_WEIGHTS)
    keys = src.keys()
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        fn = f"model-0000{i + 1}-of-00002.safetensors"
        write_safetensors(tmp_path / fn, ((k, src.get(k)) for k in part), {k: (src.dtype(k), src.shape(k))
                                                                           for k in part}, {})
        weight_map.update({k: fn for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded = models.load_clip("tvtool-mini", tmp_path, device="cpu")
    assert sharded.fingerprint == models.load_clip("tvtool-mini", device="cpu").fingerprint
    state = sharded.model.state_dict()
    assert all(torch.equal(state[k], src.get(k).float()) for k in keys)


def test_weights_of_a_transformers_folder_state_their_configs(tmp_path):
    """What a format says about the model is a declared field of the source, not an attribute bolted on."""
    transformers = pytest.importorskip("transformers")
    from tvtool.checkpoints import open_weights

    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8, hidden_act="quick_gelu"), projection_dim=16)
    transformers.CLIPModel(cfg).save_pretrained(tmp_path / "hf")
    src = open_weights(tmp_path / "hf")
    assert src.config.transformers.model_type == "clip"
    assert src.config.open_clip["vision_cfg"]["width"] == 32 and src.config.open_clip["quick_gelu"] is True
    save_file({"visual.proj": torch.zeros(2, 2)}, tmp_path / "w.safetensors")
    plain = open_weights(tmp_path / "w.safetensors")
    assert plain.config.open_clip is None and plain.config.transformers is None


# ------------------------------------------------------------------------------------------------ registration
def test_importing_models_registers_nothing():
    """tvtool-mini enters open_clip's registry by an explicit call, never as a side effect of an import."""
    code = ("import open_clip, tvtool.models, tvtool.taskvector, tvtool.formats.convert\n"
            "assert 'tvtool-mini' not in open_clip.list_models()\n"
            "from tvtool.formats.arch import register_builtin\n"
            "assert register_builtin() is open_clip and 'tvtool-mini' in open_clip.list_models()\n"
            "from tvtool import models\n"
            "assert models.list_models().count('tvtool-mini') == 1\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert r.returncode == 0, r.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ defaults
def test_alpha_grids_have_one_home():
    from tvtool import evaluate, quickstart, recipes

    protocol = [round(0.05 * i, 10) for i in range(21)]  # PROTOCOL.md: 0 to 1, step 0.05
    assert list(evaluate.DEFAULT_GRID) == protocol == evaluate.parse_grid(defaults.ALPHA_GRID)
    assert recipes.grid_points(None) == protocol
    assert quickstart.quickstart_recipe("full")["eval"]["addition"]["grid"] == defaults.ALPHA_GRID
    assert list(evaluate.DEFAULT_DISENTANGLEMENT_GRID) == [-2 + 0.5 * i for i in range(9)]


def test_cli_grid_defaults_come_from_defaults():
    for cmd, grid in (("addition", defaults.ALPHA_GRID), ("negation", defaults.ALPHA_GRID),
                      ("disentanglement", defaults.DISENTANGLEMENT_GRID)):
        r = run_tvtool("eval", cmd, "--help")
        # addition's --grid defaults to the merged vector's method grid with --merged, so its help states the default
        shown = f"(default: {grid}," if cmd == "addition" else f"[default: {grid}]"
        assert r.returncode == 0 and shown in " ".join(r.stdout.split()), cmd


def test_cache_root_has_one_home(tmp_path, monkeypatch):
    from tvtool.datasets import cache

    monkeypatch.setenv("TVTOOL_CACHE", str(tmp_path / "c"))
    assert defaults.cache_root() == tmp_path / "c"
    assert cache.cache_root() == tmp_path / "c" / "datasets"
    monkeypatch.delenv("TVTOOL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert defaults.cache_root() == tmp_path / ".cache" / "tvtool"
