"""PEFT LoRA adapter folders wherever a fine-tuned checkpoint is accepted, checked against peft's own
merge_and_unload() on random-init models built offline (issue 21)."""
import json
import shutil

import numpy as np
import pytest

from cli_helpers import run_tvtool
from hf_helpers import cache_model, clip_model, vision_model
from tvtool.checkpoints import open_weights
from tvtool.errors import TVToolError
from tvtool.safetensors_io import SafetensorsFile
from tvtool.taskvector import open_vector

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

BASE = "openai/clip-vit-base-patch32"


def _randomize_lora(model, seed, biases=()):
    """LoRA's B starts at zero (no update): give every LoRA matrix, and the named biases, random values."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or any(b in name for b in biases):
                p.copy_(0.2 * torch.randn_like(p))


def _adapt(model, out, config, seed, biases=()):
    """Save a randomized adapter on ``model`` to ``out/adapter``; returns peft's merge_and_unload() of it.

    peft (up to 0.21 at least) merges the update of an nn.MultiheadAttention's out_proj twice, in merge() and in
    every forward (huggingface/peft pull request 3774); tvtool applies it once, as LoRA defines it. Those weights are
    set from peft's own get_delta_weight() instead, so that the comparison holds with a fixed peft as well."""
    pm = peft.get_peft_model(model, config)
    _randomize_lora(pm, seed, biases)
    pm.save_pretrained(out / "adapter")
    out_proj = {}
    for module in pm.modules():
        if isinstance(module, peft.tuners.lora.layer.MultiheadAttention):
            linear = module.base_layer.out_proj
            out_proj[linear] = (linear.get_base_layer().weight.detach().clone(), linear.get_delta_weight("default"))
    merged = pm.merge_and_unload()
    with torch.no_grad():
        for linear, (weight, delta) in out_proj.items():
            linear.get_base_layer().weight.copy_(weight + delta)
    return merged


def _set_config(adapter, **fields):
    path = adapter / "adapter_config.json"
    doc = json.loads(path.read_text())
    doc.update(fields)
    path.write_text(json.dumps(doc))


def _vector(path):
    v = open_vector(path)
    return {k: np.array(v.array(k)) for k in v.keys()}


def _assert_same_vectors(a, b, atol=2e-6):
    va, vb = _vector(a), _vector(b)
    assert va.keys() == vb.keys() and va
    for k in va:
        np.testing.assert_allclose(va[k], vb[k], rtol=0, atol=atol, err_msg=k)


def _extract(base, finetuned, out, env=None):
    r = run_tvtool("extract", "--pretrained", base, "--finetuned", finetuned, "-o", out, env=env)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def vision_adapter(tmp_path_factory):
    """A CLIPVisionModel adapter (the FusionBench layout) on the image tower of a CLIPModel base cached as BASE:
    every linear of the blocks plus the patch convolution, rsLoRA, a rank pattern and an alpha pattern."""
    root = tmp_path_factory.mktemp("vision-adapter")
    cache = root / "cache"
    base = clip_model(0)
    base_dir = cache_model(cache, BASE, base)
    tower = vision_model()
    getattr(tower, "vision_model", tower).load_state_dict(base.vision_model.state_dict())
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                             target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embedding"],
                             rank_pattern={"fc1": 2}, alpha_pattern={"layers.1.self_attn.v_proj": 3})
    merged = _adapt(tower, root, config, seed=1)
    merged.save_pretrained(root / "merged")
    _set_config(root / "adapter", base_model_name_or_path=BASE)
    return {"root": root, "base": base_dir, "adapter": root / "adapter", "merged": root / "merged",
            "env": {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}}


def test_extract_of_a_vision_adapter_equals_extract_of_peft_merge(vision_adapter, tmp_path):
    a = _extract(vision_adapter["base"], vision_adapter["adapter"], tmp_path / "adapter.st")
    b = _extract(vision_adapter["base"], vision_adapter["merged"], tmp_path / "merged.st")
    _assert_same_vectors(a, b)
    keys = set(_vector(a))
    # q/k/v land in the fused in_proj, the patch convolution in conv1; nothing the adapter does not touch
    assert {"visual.transformer.resblocks.1.attn.in_proj_weight", "visual.conv1.weight",
            "visual.transformer.resblocks.0.mlp.c_fc.weight"} <= keys
    assert not any(k.endswith("bias") or "ln_" in k for k in keys)
    meta = open_vector(a).meta
    assert meta["history"][0]["finetuned"]["format"] == "peft-lora"


def test_the_scaling_matters(vision_adapter, tmp_path):
    """The comparison above can fail: read as plain LoRA (alpha / r) instead of rsLoRA the update is off."""
    plain = tmp_path / "plain"
    shutil.copytree(vision_adapter["adapter"], plain)
    _set_config(plain, use_rslora=False)
    base = open_weights(vision_adapter["base"])
    got = open_weights(plain, base=base).get("visual.transformer.resblocks.0.mlp.c_proj.weight")
    want = open_weights(vision_adapter["adapter"], base=base).get("visual.transformer.resblocks.0.mlp.c_proj.weight")
    b0 = base.get("visual.transformer.resblocks.0.mlp.c_proj.weight")
    # rank 4: rsLoRA scales by 8 / 2, plain LoRA by 8 / 4
    torch.testing.assert_close(got - b0, (want - b0) / 2, rtol=1e-4, atol=1e-6)


def test_convert_merges_onto_the_base_the_adapter_names(vision_adapter, tmp_path):
    """No --pretrained: the adapter's base_model_name_or_path (a hub id, from the cache) is the base."""
    env = vision_adapter["env"]
    r = run_tvtool("convert", vision_adapter["adapter"], "-o", tmp_path / "m.safetensors", env=env)
    assert r.returncode == 0, r.stderr
    r = run_tvtool("convert", vision_adapter["merged"], "-o", tmp_path / "peft.safetensors")
    assert r.returncode == 0, r.stderr
    with SafetensorsFile(tmp_path / "m.safetensors") as ours, SafetensorsFile(tmp_path / "peft.safetensors") as theirs:
        assert {k for k in ours.keys() if k.startswith("visual.")} - {"visual.proj"} == set(theirs.keys())
        for k in theirs.keys():
            np.testing.assert_allclose(ours.array(k), theirs.array(k), rtol=0, atol=2e-6, err_msg=k)
        assert "transformer.resblocks.0.attn.in_proj_weight" in ours.keys()  # the base's text tower, unchanged
    # to a folder: the base's own format, its config copied, loadable by transformers
    r = run_tvtool("convert", vision_adapter["adapter"], "-o", tmp_path / "hf", env=env)
    assert r.returncode == 0, r.stderr
    merged = transformers.CLIPModel.from_pretrained(tmp_path / "hf").vision_model.state_dict()
    want = transformers.CLIPVisionModel.from_pretrained(vision_adapter["merged"]).state_dict()
    for k, v in want.items():
        torch.testing.assert_close(merged[k.removeprefix("vision_model.")], v, rtol=0, atol=2e-6)


def test_an_adapter_without_a_named_base_needs_pretrained(vision_adapter, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(vision_adapter["adapter"], adapter)
    _set_config(adapter, base_model_name_or_path=None)
    r = run_tvtool("convert", adapter, "-o", tmp_path / "m.safetensors")
    assert r.returncode == 1 and "--pretrained" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.safetensors").exists()
    r = run_tvtool("convert", adapter, "--pretrained", vision_adapter["base"], "-o", tmp_path / "m.safetensors")
    assert r.returncode == 0, r.stderr


def test_a_pickled_adapter_is_read_by_the_safe_reader(vision_adapter, tmp_path):
    """adapter_model.bin: torch's pickle, read without --trust-pickle by the restricted unpickler (runs nothing)."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(vision_adapter["adapter"] / "adapter_config.json", adapter)
    with SafetensorsFile(vision_adapter["adapter"] / "adapter_model.safetensors") as f:
        torch.save({k: f.get(k).clone() for k in f.keys()}, adapter / "adapter_model.bin")
    a = _extract(vision_adapter["base"], adapter, tmp_path / "bin.st")
    b = _extract(vision_adapter["base"], vision_adapter["merged"], tmp_path / "merged.st")
    _assert_same_vectors(a, b)


def test_full_clip_adapter_with_trained_biases_and_projections(tmp_path):
    """A CLIPModel adapter over both towers, the projections (transposed in open_clip) and bias="lora_only"."""
    base = clip_model(0)
    base.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=3, lora_alpha=5, bias="lora_only",
                             target_modules=["q_proj", "v_proj", "fc2", "visual_projection", "text_projection"])
    merged = _adapt(clip_model(0), tmp_path, config, seed=2, biases=("q_proj.base_layer.bias", "fc2.base_layer.bias"))
    merged.save_pretrained(tmp_path / "merged")
    a = _extract(tmp_path / "base", tmp_path / "adapter", tmp_path / "adapter.st")
    b = _extract(tmp_path / "base", tmp_path / "merged", tmp_path / "merged.st")
    _assert_same_vectors(a, b)
    keys = set(_vector(a))
    assert {"visual.proj", "text_projection", "transformer.resblocks.0.attn.in_proj_bias",
            "visual.transformer.resblocks.1.mlp.c_proj.bias"} <= keys


@pytest.mark.parametrize("tower", ["clip", "visual"])
def test_open_clip_adapter_with_multihead_attention_and_bias_all(tmp_path, tower):
    """An adapter made with peft on an open_clip model (or its image tower alone): nn.MultiheadAttention targets
    (fused in_proj and its out_proj), the MLP, and bias="all"."""
    import open_clip
    from safetensors.torch import save_file

    from tiny_clip import register_tiny

    name = register_tiny("tiny-peft")
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "base.safetensors")
    config = peft.LoraConfig(r=2, lora_alpha=4, bias="all", target_modules=["attn", "c_fc"])
    target = model if tower == "clip" else model.visual
    # (peft saves every bias but an nn.MultiheadAttention's in_proj_bias: training it is lost on saving)
    _adapt(target, tmp_path, config, seed=3, biases=("out_proj.base_layer.bias", "ln_2.bias"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "merged.safetensors")
    a = _extract(tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "adapter.st")
    b = _extract(tmp_path / "base.safetensors", tmp_path / "merged.safetensors", tmp_path / "merged.st")
    _assert_same_vectors(a, b)
    keys = set(_vector(a))
    assert {"visual.transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.0.attn.out_proj.weight",
            "visual.transformer.resblocks.0.attn.out_proj.bias", "visual.transformer.resblocks.0.ln_2.bias"} <= keys
    assert any(k.startswith("transformer.") for k in keys) == (tower == "clip")


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("fields, words", [
    ({"use_dora": True}, "DoRA"),
    ({"peft_type": "IA3"}, "IA3 adapter"),
])
def test_unsupported_adapters_are_refused_in_one_line(vision_adapter, tmp_path, fields, words):
    adapter = tmp_path / "adapter"
    shutil.copytree(vision_adapter["adapter"], adapter)
    _set_config(adapter, **fields)
    r = run_tvtool("extract", "--pretrained", vision_adapter["base"], "--finetuned", adapter, "-o", tmp_path / "v.st")
    assert r.returncode == 1 and words in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "v.st").exists()


@pytest.mark.parametrize("fields, words", [
    ({"modules_to_save": ["classifier"]}, "modules_to_save"),
    ({"init_lora_weights": "pissa_niter_4"}, "rewrites the base"),
    ({"rank_pattern": {}}, "rank 4, but its lora_A has 2 rows"),  # fc1's rank pattern dropped: config and weights differ
    ({"lora_bias": True}, "lora_B"),
])
def test_more_refusals(vision_adapter, tmp_path, fields, words):
    adapter = tmp_path / "adapter"
    shutil.copytree(vision_adapter["adapter"], adapter)
    _set_config(adapter, **fields)
    with pytest.raises(TVToolError, match=words):
        open_weights(adapter, base=open_weights(vision_adapter["base"]))


def test_a_wrong_base_is_refused(vision_adapter, tmp_path):
    other = clip_model(0)
    other.config.vision_config.intermediate_size = 128
    transformers.CLIPModel(other.config).save_pretrained(tmp_path / "wide")
    with pytest.raises(TVToolError, match="is the base the model the adapter was made on"):
        open_weights(vision_adapter["adapter"], base=open_weights(tmp_path / "wide"))


def test_an_adapter_is_no_model_to_build(vision_adapter):
    r = run_tvtool("eval", "accuracy", "--tasks", "mini-shapes", "--model", "ViT-B-32", "--pretrained",
                   vision_adapter["adapter"], "--device", "cpu")
    assert r.returncode == 1 and "PEFT adapter" in r.stderr and "tvtool convert" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
