"""Issue 10: a vector taken against a local file records the architecture and an absolute path."""
import json
import shutil
import subprocess
import sys

import open_clip
import pytest
import torch

from cli_helpers import run_tvtool
from tvtool import models
from tvtool.checkpoints import open_weights
from tvtool.errors import TVToolError
from tvtool.formats.arch import infer
from tvtool.safetensors_io import write_safetensors
from tvtool.taskvector import extract, open_vector


def _meta_shapes(arch):
    with torch.device("meta"):
        model = open_clip.create_model(arch, device="meta")
    state = model.state_dict()
    return list(state), lambda k: tuple(state[k].shape)


def test_shapes_identify_tvtool_mini():
    src = open_weights(models.MINI_WEIGHTS)
    assert infer(src.keys(), src.shape) == ("tvtool-mini", "")


def test_quickgelu_twins_are_ambiguous_and_say_why():
    name, why = infer(*_meta_shapes("ViT-B-16"))
    assert name is None and "ViT-B-16-quickgelu" in why and "QuickGELU" in why


def test_only_the_visual_tower_is_enough_when_unique():
    keys, shape = _meta_shapes("tvtool-mini")
    visual = [k for k in keys if k.startswith("visual.")]
    assert infer(visual, shape)[0] == "tvtool-mini"


def _local_pair(tmp_path):
    src = open_weights(models.MINI_WEIGHTS)
    base = tmp_path / "base.safetensors"
    shutil.copy(models.MINI_WEIGHTS, base)
    ft = {k: src.get(k).clone() for k in src.keys()}
    ft["visual.ln_post.weight"] += 0.25
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in ft.items()}
    write_safetensors(tmp_path / "ft.safetensors", ft.items(), specs, {})
    return base


def test_extract_from_a_relative_local_file_records_architecture_and_absolute_path(tmp_path):
    base = _local_pair(tmp_path)
    r = run_tvtool("extract", "--base", "base.safetensors", "--finetuned", "ft.safetensors", "-o", "tv.safetensors",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    meta = open_vector(tmp_path / "tv.safetensors").meta["base"]
    assert meta["model"] == "tvtool-mini"
    assert meta["pretrained"] == str(base.resolve())
    # ... so the recorded base loads from any directory
    bundle = models.load_clip(meta["model"], meta["pretrained"], device="cpu")
    assert bundle.fingerprint.startswith("fp1:")


def test_extract_model_overrides_and_is_checked(tmp_path):
    _local_pair(tmp_path)
    out = tmp_path / "tv.safetensors"
    extract(str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors"), out, model="ViT-B-32")
    assert open_vector(out).meta["base"]["model"] == "ViT-B-32"
    with pytest.raises(TVToolError, match="not an open_clip architecture"):
        extract(str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors"), tmp_path / "x.st",
                model="ViT-Q-99")
    assert not (tmp_path / "x.st").exists()


def test_hf_hub_spec_offline_is_one_line(tmp_path):
    r = run_tvtool("extract", "--base", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "--finetuned",
                "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "-o", tmp_path / "tv.safetensors")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "offline" in r.stderr and "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in r.stderr


def test_image_encoder_without_text_transformer_is_identified():
    """task_vectors' checkpoints delete the text transformer; the leftovers still rule out other text towers."""
    with torch.device("meta"):
        model = open_clip.create_model("ViT-B-32", device="meta")
    del model.transformer
    state = model.state_dict()
    name, why = infer(state.keys(), lambda k: tuple(state[k].shape))
    assert name is None and "ViT-B-32-quickgelu" in why
    assert infer(state.keys(), lambda k: tuple(state[k].shape), quick_gelu=False) == ("ViT-B-32", "")
    assert infer(state.keys(), lambda k: tuple(state[k].shape), quick_gelu=True) == ("ViT-B-32-quickgelu", "")


def test_shipped_configs_are_open_clips_own():
    """Architecture inference reads open_clip's config files without importing it: same configs as its registry."""
    from tvtool.formats.arch import shipped_configs

    code = ("import json\nfrom tvtool.formats.arch import register_builtin\nopen_clip = register_builtin()\n"
            "print(json.dumps({n: open_clip.get_model_config(n) for n in open_clip.list_models()}))")
    listed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert shipped_configs() == json.loads(listed)
