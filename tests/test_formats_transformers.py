"""transformers CLIP folders <-> open_clip: same features as transformers itself, exact round trips, apply/extract."""
import json
import subprocess
import sys

import open_clip
import pytest
import torch

from tvtool import models
from tvtool.checkpoints import open_weights
from tvtool.errors import TVToolError
from tvtool.formats import arch as arch_mod
from tvtool.formats.convert import convert
from tvtool.taskvector import apply, extract, open_vector

transformers = pytest.importorskip("transformers")

TINY_HF = dict(
    text_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     max_position_embeddings=16),
    vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       image_size=16, patch_size=8),
    projection_dim=16,
)


def _features(out):
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns an output object


def _hf_model(seed=0, act="quick_gelu"):
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(**TINY_HF)
    cfg.text_config.hidden_act = cfg.vision_config.hidden_act = act
    return transformers.CLIPModel(cfg).eval()


def _inputs(context=16, size=16):
    torch.manual_seed(123)
    images = torch.randn(3, 3, size, size)
    ids = torch.randint(1, 49000, (3, context))
    ids[:, 0] = 49406
    for row, end in enumerate((4, 9, context - 1)):
        ids[row, end] = 49407
        ids[row, end + 1:] = 0
    return images, ids


def _rel(a, b):
    return ((a - b).norm() / a.norm()).item()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "clip"
    model = _hf_model()
    model.save_pretrained(path)
    return path, model


def test_converted_model_gives_transformers_features_and_quickgelu_matters(hf_folder):
    path, hf = hf_folder
    bundle = models.load_clip("ignored-the-folder-says", path, device="cpu")
    images, ids = _inputs()
    with torch.no_grad():
        hi, ht = _features(hf.get_image_features(pixel_values=images)), _features(hf.get_text_features(input_ids=ids))
        oi, ot = bundle.model.encode_image(images), bundle.model.encode_text(ids)
        assert _rel(hi, oi) < 1e-5 and _rel(ht, ot) < 1e-5
        # The same weights in a GELU model (the wrong activation) are visibly off: the check above can fail.
        cfg = dict(open_weights(path).config.open_clip)
        cfg.pop("quick_gelu")
        gelu = open_clip.create_model(arch_mod.register_config(cfg)).eval()
        gelu.load_state_dict(bundle.model.state_dict())
        assert _rel(hi, gelu.encode_image(images)) > 1e-3


def test_open_clip_to_transformers_to_open_clip_is_exact(tmp_path, hf_folder):
    path, hf = hf_folder
    oc_file = tmp_path / "oc.safetensors"
    convert(str(path), oc_file)
    from tvtool.safetensors_io import SafetensorsFile

    meta = SafetensorsFile(oc_file).metadata
    assert json.loads(meta["open_clip_config"]) == open_weights(path).config.open_clip
    assert meta["open_clip_model"].startswith("tvtool-converted-")  # no named architecture is this tiny
    back = tmp_path / "hf_again"
    convert(str(oc_file), back)  # the architecture recorded in the file is enough
    reloaded = transformers.CLIPModel.from_pretrained(back).eval()
    ref = hf.state_dict()
    got = reloaded.state_dict()
    assert sorted(got) == sorted(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert json.loads((back / "config.json").read_text())["vision_config"]["hidden_act"] == "quick_gelu"
    oc_again = tmp_path / "oc_again.safetensors"
    convert(str(back), oc_again)
    a, b = open_weights(oc_file), open_weights(oc_again)
    assert sorted(a.keys()) == sorted(b.keys()) and all(torch.equal(a.get(k), b.get(k)) for k in a.keys())


def test_open_clip_model_converted_to_transformers_gives_the_same_features(tmp_path):
    """The other direction, with the GELU activation (tvtool-mini is not QuickGELU)."""
    out = tmp_path / "mini_hf"
    assert "hidden_act gelu" in convert("tvtool-mini", out)
    hf = transformers.CLIPModel.from_pretrained(out).eval()
    bundle = models.load_clip("tvtool-mini", device="cpu")
    images = torch.randn(2, 3, 32, 32)
    ids = bundle.tokenizer(["a photo of a cat", "red"])
    with torch.no_grad():
        assert _rel(_features(hf.get_image_features(pixel_values=images)), bundle.model.encode_image(images)) < 1e-5
        assert _rel(_features(hf.get_text_features(input_ids=ids)), bundle.model.encode_text(ids)) < 1e-5


def test_openai_style_config_is_recorded_as_the_quickgelu_architecture():
    hf = transformers.CLIPConfig()  # ViT-B/32 shapes, quick_gelu: the OpenAI release
    from tvtool.formats.transformers_clip import open_clip_config

    assert arch_mod.match_config(open_clip_config(hf)) == "ViT-B-32-quickgelu"
    hf.vision_config.hidden_act = hf.text_config.hidden_act = "gelu"
    assert arch_mod.match_config(open_clip_config(hf)) == "ViT-B-32"


def test_vision_only_finetuned_folder_extracts_against_full_base_and_apply_writes_transformers(tmp_path, hf_folder):
    base_path, base = hf_folder
    fc1 = "vision_model.encoder.layers.0.mlp.fc1.weight"
    vision = transformers.CLIPVisionModel(base.config.vision_config).eval()
    # transformers 5 names CLIPVisionModel tensors without the "vision_model." prefix that 4.x used
    prefix = "vision_model." if next(iter(vision.state_dict())).startswith("vision_model.") else ""
    state = {prefix + k[len("vision_model."):]: v.clone() for k, v in base.state_dict().items()
             if k.startswith("vision_model.")}
    state[prefix + fc1[len("vision_model."):]] += 0.5
    vision.load_state_dict(state)
    ft = tmp_path / "ft_vision"
    vision.save_pretrained(ft)
    tau = tmp_path / "tau.safetensors"
    extract(str(base_path), str(ft), tau)
    v = open_vector(tau)
    assert v.keys() == ["visual.transformer.resblocks.0.mlp.c_fc.weight"]
    assert torch.allclose(v.get(v.keys()[0]), torch.full((128, 32), 0.5), atol=1e-6)
    assert v.meta["base"]["pretrained"] == str(base_path.resolve())

    out = tmp_path / "applied"
    apply(str(base_path), [tau], out, alpha=2.0)
    applied = transformers.CLIPModel.from_pretrained(out).state_dict()
    assert torch.allclose(applied[fc1], base.state_dict()[fc1] + 1.0, atol=1e-6)
    assert torch.equal(applied["text_projection.weight"], base.text_projection.weight)
    out_v = tmp_path / "applied_vision"
    apply(str(ft), [tau], out_v, alpha=-1.0, check_base=False)
    back, info = transformers.CLIPVisionModel.from_pretrained(out_v, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.allclose(back.state_dict()[prefix + fc1[len("vision_model."):]], base.state_dict()[fc1], atol=1e-6)
    # tvtool writes the 4.x layout ("vision_model." prefix) and reads both
    assert sorted(open_weights(out_v).keys()) == sorted(open_weights(ft).keys())
    with pytest.raises(TVToolError, match="already exists"):
        apply(str(base_path), [tau], out)


def test_pytorch_model_bin_folder_is_read_without_trust(tmp_path, hf_folder):
    path, hf = hf_folder
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((path / "config.json").read_text())
    torch.save(hf.state_dict(), binary / "pytorch_model.bin")
    a, b = open_weights(path), open_weights(binary)
    assert sorted(a.keys()) == sorted(b.keys()) and all(torch.equal(a.get(k), b.get(k)) for k in a.keys())


def test_vision_only_folder_is_refused_where_heads_need_a_text_tower(tmp_path, hf_folder):
    _, base = hf_folder
    transformers.CLIPVisionModel(base.config.vision_config).save_pretrained(tmp_path / "v")
    with pytest.raises(TVToolError, match="vision-only"):
        models.load_clip("ViT-B-32", tmp_path / "v", device="cpu")


def test_convert_cli_writes_once_and_refuses_to_overwrite(tmp_path, hf_folder):
    from cli_helpers import run_tvtool

    path, _ = hf_folder
    out = tmp_path / "oc.safetensors"
    r = run_tvtool("convert", str(path), "-o", str(out))
    assert r.returncode == 0 and "open_clip state dict" in r.stderr and r.stdout == "", r.stderr  # status: stderr
    before = out.read_bytes()
    r = run_tvtool("convert", str(path), "-o", str(out))
    assert r.returncode == 1 and "already exists" in r.stderr and r.stderr.count("\n") == 1
    assert out.read_bytes() == before


def test_without_transformers_one_line_says_what_to_install(tmp_path, hf_folder):
    path, _ = hf_folder
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from tvtool.cli import main\n"
            f"sys.exit(main(['convert', {str(path)!r}, '-o', {str(tmp_path / 'x.safetensors')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "pip install 'tvtool[hf]'" in r.stderr, r.stderr
    assert not (tmp_path / "x.safetensors").exists()
    # everything else works without it
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from tvtool import models\n"
            "b = models.load_clip('tvtool-mini', device='cpu')\n"
            "from tvtool.formats.convert import convert\n"
            f"convert('tvtool-mini', {str(tmp_path / 'mini.safetensors')!r})\n"
            "print(b.name)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "tvtool-mini", r.stderr


@pytest.mark.benchmark
def test_default_clipconfig_matches_transformers():
    """The full-size check (ViT-B/32 shapes); ~30 s on 2 shared cores, hence a benchmark."""
    from tvtool.weight_source import WeightSource
    from tvtool.formats import transformers_clip as tc

    torch.manual_seed(0)
    hf = transformers.CLIPModel(transformers.CLIPConfig()).eval()
    src = WeightSource.from_state_dict(hf.state_dict(), {})
    mapped = tc.mapped_source(src, tc.hf_to_open_clip_plan(src.keys()), {})
    oc = open_clip.create_model("ViT-B-32-quickgelu").eval()
    oc.load_state_dict({k: mapped.get(k) for k in mapped.keys()}, strict=True)
    images, ids = _inputs(context=77, size=224)
    with torch.no_grad():
        assert _rel(_features(hf.get_image_features(pixel_values=images)), oc.encode_image(images)) < 1e-5
        assert _rel(_features(hf.get_text_features(input_ids=ids)), oc.encode_text(ids)) < 1e-5


def test_convert_refuses_a_task_vector(tmp_path):
    """A task vector is weight differences: converting it would give a 'model' of deltas. One line, exit 1,
    nothing written."""
    import numpy as np
    from cli_helpers import run_tvtool

    from tvtool import taskvector as tv

    vec = tmp_path / "cars.st"
    meta = tv.new_meta({"model": "tvtool-mini", "pretrained": "builtin", "fingerprint": "fp1:x"}, tasks=["cars"])
    tv.write_vector(vec, [("visual.proj", np.ones((4, 4), np.float32))], meta,
                    specs={"visual.proj": ("F32", (4, 4))})
    for out in ("m.safetensors", "hf-folder"):
        r = run_tvtool("convert", str(vec), "-o", str(tmp_path / out))
        assert r.returncode == 1 and "is a tvtool task vector" in r.stderr and "tvtool apply" in r.stderr, r.stderr
        assert r.stderr.strip().count("\n") == 0
        assert not (tmp_path / out).exists()
    # a model written by `apply` carries a tvtool document too (format tvtool.model): it is weights, and converts
    from tvtool.safetensors_io import write_safetensors

    model = tmp_path / "applied.safetensors"
    write_safetensors(model, [("visual.proj", np.ones((4, 4), np.float32))], {"visual.proj": ("F32", (4, 4))},
                      {tv.META_KEY: json.dumps({"format": "tvtool.model", "base": {"model": None}})})
    r = run_tvtool("convert", str(model), "-o", str(tmp_path / "m.safetensors"))
    assert r.returncode == 0 and (tmp_path / "m.safetensors").is_file(), r.stderr
