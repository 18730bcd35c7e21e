"""Whole-module pickles (task_vectors / TTA / OrthoReg checkpoints) read without the code that made them."""
import os
import subprocess
import sys
import types

import open_clip
import pytest
import torch
from torch import nn

from cli_helpers import run_tvtool
from tiny_clip import register_tiny
from tvtool.checkpoints import open_weights
from tvtool.errors import TVToolError
from tvtool.formats.convert import convert
from tvtool.safetensors_io import fingerprint
from tvtool.taskvector import open_vector

TINY = register_tiny("tiny-pickle")


def _clip(seed=0):
    torch.manual_seed(seed)
    return open_clip.create_model(TINY)


@pytest.fixture
def temp_src_module():
    """A `src.modeling` package like task_vectors', importable only while the fixture holds it."""
    src, modeling = types.ModuleType("src"), types.ModuleType("src.modeling")
    src.modeling = modeling

    class ImageEncoder(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.train_preprocess = open_clip.image_transform(16, is_train=False)
            self.cache_dir = "/data/cache"

    class ImageClassifier(nn.Module):
        def __init__(self, image_encoder, head):
            super().__init__()
            self.image_encoder = image_encoder
            self.classification_head = head

    for cls in (ImageEncoder, ImageClassifier):
        cls.__module__ = "src.modeling"
        cls.__qualname__ = cls.__name__
        setattr(modeling, cls.__name__, cls)
    sys.modules["src"], sys.modules["src.modeling"] = src, modeling
    yield modeling
    sys.modules.pop("src", None)
    sys.modules.pop("src.modeling", None)


def _encoder_state(clip):
    del clip.transformer  # ImageEncoder(keep_lang=False)
    return {k: v.clone() for k, v in clip.state_dict().items()}


def test_image_encoder_from_a_module_that_no_longer_exists(tmp_path, temp_src_module):
    clip = _clip()
    expected = _encoder_state(clip)
    path = tmp_path / "finetuned.pt"
    torch.save(temp_src_module.ImageEncoder(clip), path)
    sys.modules.pop("src.modeling")
    sys.modules.pop("src")
    with pytest.raises(ModuleNotFoundError):
        torch.load(path, weights_only=False)  # what the projects' users hit: No module named 'src'
    src = open_weights(path)  # no trust_pickle needed: nothing runs
    assert sorted(src.keys()) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(src.get(k), v), k
    assert not any(k.startswith("transformer.") for k in src.keys())


def test_open_clip_class_renamed_to_its_old_name(tmp_path):
    clip = _clip(1)
    old = type("VisualTransformer", (type(clip.visual),), {"__module__": "open_clip.model"})
    open_clip.model.VisualTransformer = old
    try:
        clip.visual.__class__ = old
        path = tmp_path / "old.pt"
        torch.save(clip, path)
    finally:
        del open_clip.model.VisualTransformer
    with pytest.raises(AttributeError, match="VisualTransformer"):
        torch.load(path, weights_only=False)
    clip.visual.__class__ = old.__mro__[1]
    src = open_weights(path)
    state = clip.state_dict()
    assert sorted(src.keys()) == sorted(state)
    assert all(torch.equal(src.get(k), state[k]) for k in state)


def test_nested_wrappers_keep_the_clip_under_its_prefix(tmp_path, temp_src_module):
    clip = _clip(2)
    expected = _encoder_state(clip)
    clf = temp_src_module.ImageClassifier(temp_src_module.ImageEncoder(clip), nn.Linear(16, 3))
    path = tmp_path / "clf.pt"
    torch.save(clf, path)
    src = open_weights(path)
    assert sorted(src.keys()) == sorted(expected)  # classification_head.* dropped, image_encoder.model. stripped
    assert torch.equal(src.get("visual.conv1.weight"), expected["visual.conv1.weight"])


def test_training_checkpoint_dict_holding_one_module(tmp_path, temp_src_module):
    clip = _clip(2)
    expected = _encoder_state(clip)
    torch.save({"epoch": 3, "model": temp_src_module.ImageEncoder(clip)}, tmp_path / "ckpt.pt")
    assert sorted(open_weights(tmp_path / "ckpt.pt").keys()) == sorted(expected)


def test_plain_state_dict_and_fingerprint_match_the_model(tmp_path):
    clip = _clip(3)
    path = tmp_path / "sd.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}, path)
    src = open_weights(path)
    assert fingerprint(src) == fingerprint(clip.state_dict())


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.call"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    func, arg = {
        "os.system": (os.system, f"touch {marker}"),
        "builtins.eval": (eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": (subprocess.call, ["touch", str(marker)]),
    }[kind]
    path = tmp_path / "evil.pt"
    torch.save({"visual.w": torch.zeros(2), "payload": _Evil(func, arg)}, path)
    with pytest.raises(TVToolError, match="refused"):
        open_weights(path)
    with pytest.raises(TVToolError, match="malicious"):
        open_weights(path, trust_pickle=True)  # code-running modules are refused even when trusted
    assert not marker.exists()
    r = run_tvtool("extract", "--base", path, "--finetuned", path, "-o", tmp_path / "tv.safetensors")
    assert r.returncode == 1 and not marker.exists()
    assert r.stderr.count("\n") == 1 and "refused" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "tv.safetensors").exists()


def test_unknown_function_call_needs_trust_then_full_unpickling_is_announced(tmp_path, capfd):
    path = tmp_path / "odd.pt"
    # harmless, but a call the reader does not know
    torch.save({"visual.w": _Evil(torch.nn.functional.relu, torch.ones(3))}, path)
    with pytest.raises(TVToolError, match="calls torch.nn.functional.relu.*--trust-pickle"):
        open_weights(path)
    capfd.readouterr()
    src = open_weights(path, trust_pickle=True)
    assert "fully unpickling" in capfd.readouterr().err
    assert torch.equal(src.get("visual.w"), torch.ones(3))


def test_a_class_is_never_imported(tmp_path, monkeypatch):
    """Naming a class from an importable module must not import it (import-time code would run)."""
    marker = tmp_path / "imported"
    (tmp_path / "sideeffect_mod.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import sideeffect_mod  # noqa: F401  (to pickle an instance; the marker is removed below)

    obj = sideeffect_mod.Thing()
    obj.weight = torch.ones(3)
    path = tmp_path / "thing.pt"
    torch.save({"visual.w": torch.ones(2), "extra": obj}, path)
    del sys.modules["sideeffect_mod"]
    marker.unlink()
    from tvtool.formats import safe_pickle

    out = safe_pickle.load(path)
    assert not marker.exists() and "sideeffect_mod" not in sys.modules
    assert type(out["extra"]).__name__ == "Thing" and torch.equal(out["extra"].weight, torch.ones(3))


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
def test_legacy_format_whole_module_is_read_safely(tmp_path, temp_src_module):
    clip = _clip(4)
    expected = _encoder_state(clip)
    legacy = tmp_path / "legacy.pt"
    torch.save(temp_src_module.ImageEncoder(clip), legacy, _use_new_zipfile_serialization=False)
    sys.modules.pop("src.modeling")
    sys.modules.pop("src")
    src = open_weights(legacy)
    assert sorted(src.keys()) == sorted(expected)
    assert all(torch.equal(src.get(k), v) for k, v in expected.items())
    out = tmp_path / "tv.safetensors"
    r = run_tvtool("extract", "--base", legacy, "--finetuned", legacy, "-o", out, "--all")
    assert r.returncode == 0 and "fully unpickling" not in r.stderr, r.stderr


def _linearized(clip, delta_scale=0.01, model_name=TINY):
    del clip.transformer
    enc = nn.Module()
    enc.model = clip
    named = list(enc.named_parameters())
    torch.manual_seed(7)
    deltas = {n: torch.randn_like(p) * delta_scale for n, p in named}
    ckpt = {}
    for i, (n, p) in enumerate(named):
        ckpt[f"model.params.{i}"] = (p + deltas[n]).detach().clone()
        ckpt[f"model.params0.{i}"] = p.detach().clone()
    ckpt["model_name"] = model_name
    return ckpt, deltas


def test_tangent_linearized_checkpoint_becomes_a_linear_mode_vector(tmp_path):
    clip = _clip(5)
    base_fp = fingerprint(clip.state_dict())
    ckpt, deltas = _linearized(clip)
    path = tmp_path / "linear_finetuned.pt"
    torch.save(ckpt, path)
    with pytest.raises(TVToolError, match="tvtool convert"):
        open_weights(path)  # weights are expected there; the message says how to read it instead
    convert(str(path), tmp_path / "tau.safetensors")  # in-process: the tiny architecture is registered here only
    v = open_vector(tmp_path / "tau.safetensors")
    assert v.meta["mode"] == "linear" and v.meta["base"]["model"] == TINY
    assert v.base_fingerprint == base_fp
    visual = {n[len("model."):]: d for n, d in deltas.items() if n.startswith("model.visual.")}
    assert sorted(v.keys()) == sorted(visual)
    for k, d in visual.items():
        assert torch.allclose(v.get(k), d, atol=1e-7), k


def test_tangent_checkpoint_of_another_architecture_says_why(tmp_path):
    ckpt, _ = _linearized(_clip(6), model_name="tvtool-mini")
    path = tmp_path / "lin.pt"
    torch.save(ckpt, path)
    r = run_tvtool("convert", path, "-o", tmp_path / "tau.safetensors")
    assert r.returncode == 1 and "tvtool-mini" in r.stderr and "--model" in r.stderr
    assert not (tmp_path / "tau.safetensors").exists()


def test_numpy_attributes_become_inert_stubs(tmp_path):
    import numpy as np

    from tvtool.formats import safe_pickle

    path = tmp_path / "np.pt"
    torch.save({"visual.w": torch.ones(2), "stats": {"mean": np.float64(0.5), "arr": np.arange(3)}}, path)
    obj = safe_pickle.load(path)
    assert isinstance(obj["stats"]["mean"], safe_pickle.Stub) and isinstance(obj["stats"]["arr"], safe_pickle.Stub)
    assert torch.equal(obj["visual.w"], torch.ones(2))


def _register(name, quick):
    import json
    import tempfile
    from pathlib import Path

    cfg = {"embed_dim": 24, "quick_gelu": quick,
           "vision_cfg": {"image_size": 16, "layers": 1, "width": 48, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    if name not in open_clip.list_models():
        path = Path(tempfile.mkdtemp()) / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)
    return name


def test_pickled_module_class_names_tell_quickgelu_apart(tmp_path, temp_src_module):
    plain, quick = _register("tiny-act", False), _register("tiny-act-quickgelu", True)
    for arch in (plain, quick):
        torch.manual_seed(0)
        model = open_clip.create_model(arch)
        torch.save(temp_src_module.ImageEncoder(model), tmp_path / f"{arch}.pt")
        assert open_weights(tmp_path / f"{arch}.pt").describe["model"] == arch
    torch.save(model.state_dict(), tmp_path / "sd.pt")  # a bare state dict: shapes only, the twins tie
    assert open_weights(tmp_path / "sd.pt").describe["model"] is None


def test_naming_a_lazy_torch_submodule_imports_nothing():
    # torch's module __getattr__ imports submodules on attribute access; the reader must not trigger it
    code = ("import sys, io\nfrom tvtool.formats.safe_pickle import RestrictedUnpickler\n"
            "assert 'torch._dynamo' not in sys.modules\n"
            "RestrictedUnpickler(io.BytesIO(b'\\x80\\x02ctorch\\n_dynamo\\nq\\x00.'), None).load()\n"
            "print('torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
