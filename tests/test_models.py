"""load_clip: the built-in tvtool-mini offline, local safetensors / folders, pickles, and bad input."""
import json
import math
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tvtool import models
from tvtool.safetensors_io import SafetensorsFile, fingerprint
from tvtool.errors import TVToolError

from tiny_clip import TINY_CFG, register_tiny

TINY = "tvtool-test-tiny-models"

@pytest.fixture(scope="module")
def tiny_state():
    register_tiny(TINY)
    torch.manual_seed(123)
    state = models.load_clip(TINY, "random", device="cpu").model.state_dict()
    with torch.no_grad():
        state["logit_scale"].fill_(math.log(20.0))
    return {k: v.clone().contiguous() for k, v in state.items()}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def assert_same_state(model, state):
    got = model.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert torch.equal(got[k], v), k


def test_mini_loads_offline_with_stable_fingerprint(no_network):
    a = models.load_clip("tvtool-mini", device="cpu")
    b = models.load_clip("tvtool-mini", "builtin", device="cpu")
    assert a.pretrained == "builtin" and a.image_size == 32 and not a.model.training
    assert a.fingerprint == b.fingerprint
    # the file is stored fp16 and loaded as fp32; the fingerprint is the file's (dtype does not count)
    with SafetensorsFile(models.MINI_WEIGHTS) as f:
        assert fingerprint(f) == a.fingerprint
        for k in ("visual.conv1.weight", "token_embedding.weight"):
            assert torch.equal(a.model.state_dict()[k], f.get(k).float())
    assert all(p.dtype == torch.float32 for p in a.model.parameters())
    assert models.MINI_WEIGHTS.stat().st_size < 8.5e6
    keys = models.visual_state_keys(a.model)
    assert keys and all(k.startswith("visual.") for k in keys)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in keys


def test_random_init_differs_from_builtin():
    rnd = models.load_clip("tvtool-mini", "random", device="cpu")
    assert rnd.pretrained == "random"
    assert rnd.fingerprint != models.load_clip("tvtool-mini", device="cpu").fingerprint


def test_local_safetensors_file(tiny_state, tmp_path, no_network):
    path = tmp_path / "w.safetensors"
    save_file(tiny_state, str(path))
    b = models.load_clip(TINY, str(path), device="cpu")
    assert_same_state(b.model, tiny_state)
    assert b.pretrained == str(path) and b.fingerprint == fingerprint(tiny_state)
    assert b.model.logit_scale.exp().item() == pytest.approx(20.0)


def test_open_clip_folder(tiny_state, tmp_path, no_network):
    folder = tmp_path / "hub-snapshot"
    folder.mkdir()
    mean, std = [0.5, 0.25, 0.125], [0.2, 0.3, 0.4]
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {"mean": mean, "std": std}}))
    save_file(tiny_state, str(folder / "open_clip_model.safetensors"))
    b = models.load_clip(TINY, folder, device="cpu")
    assert_same_state(b.model, tiny_state)
    assert b.mean == tuple(mean) and b.std == tuple(std) and b.image_size == 16
    assert b.tokenizer(["a b"]).shape == (1, 16)
    # a folder with only weights (no config) uses the named architecture
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(tiny_state, str(bare / "open_clip_model.safetensors"))
    assert_same_state(models.load_clip(TINY, bare, device="cpu").model, tiny_state)


def test_pickles_read_without_running_code(tiny_state, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(tiny_state, path)
    # read by the restricted unpickler, which runs nothing: no --trust-pickle needed
    assert_same_state(models.load_clip(TINY, path, device="cpu").model, tiny_state)
    assert_same_state(models.load_clip(TINY, path, device="cpu", trust_pickle=True).model, tiny_state)

    # even trusted, a pickle that runs code on load is not executed (torch.load weights_only=True)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil()}, evil)
    with pytest.raises(TVToolError):
        models.load_clip(TINY, evil, device="cpu", trust_pickle=True)
    assert not marker.exists()
    # a folder whose only weights are a pickle is read the same safe way (as `open_weights` reads it) ...
    folder = tmp_path / "pkl-folder"
    folder.mkdir()
    torch.save(tiny_state, folder / "open_clip_pytorch_model.bin")
    assert_same_state(models.load_clip(TINY, folder, device="cpu").model, tiny_state)
    # ... and a code-running pickle in a folder is refused, its side effect never happening
    bad = tmp_path / "evil-folder"
    bad.mkdir()
    torch.save({"state_dict": Evil()}, bad / "open_clip_pytorch_model.bin")
    with pytest.raises(TVToolError):
        models.load_clip(TINY, bad, device="cpu")
    assert not marker.exists()


def test_bad_input_is_one_line_user_error(tiny_state, tmp_path, no_network):
    with pytest.raises(TVToolError, match="ViT-B-32") as e:
        models.load_clip("ViT-B-33", device="cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(TVToolError, match="tvtool-mini"):
        models.load_clip("tvtool-mni", device="cpu")
    with pytest.raises(TVToolError, match="known tags: .*openai"):
        models.load_clip("RN50", "no-such-tag", device="cpu")
    with pytest.raises(TVToolError, match="no such file"):
        models.load_clip(TINY, str(tmp_path / "missing.safetensors"), device="cpu")
    # a registry tag that is not cached, offline: says how to pass a local file, without touching the network
    with pytest.raises(TVToolError, match=r"--pretrained path/to/open_clip_model\.safetensors") as e:
        models.load_clip("RN50", "openai", device="cpu", cache_dir=str(tmp_path / "empty-cache"))
    assert "\n" not in str(e.value)
    # weights of another architecture
    path = tmp_path / "w.safetensors"
    save_file(tiny_state, str(path))
    with pytest.raises(TVToolError, match="cannot load these weights into tvtool-mini"):
        models.load_clip("tvtool-mini", str(path), device="cpu")
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(TVToolError):
        models.load_clip(TINY, str(garbage), device="cpu")


def test_encode_texts_normalized_and_batched(tiny_state, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(tiny_state, str(path))
    b = models.load_clip(TINY, str(path), device="cpu")
    texts = [f"a photo of item {i}" for i in range(7)]
    one = models.encode_texts(b, texts, batch_size=3)
    with torch.no_grad():
        ref = torch.stack([b.model.encode_text(b.tokenizer([t]))[0] for t in texts])
    ref = ref / ref.norm(dim=1, keepdim=True)
    torch.testing.assert_close(one, ref, rtol=1e-5, atol=1e-5)


def test_real_architecture_never_loads_random_weights_unasked(no_network):
    with pytest.raises(TVToolError, match=r"ViT-B-32: no pretrained weights given; .*openai.*`random`.*--pretrained") as e:
        models.load_clip("ViT-B-32", device="cpu")
    assert "\n" not in str(e.value)
    register_tiny(TINY)
    with pytest.raises(TVToolError, match="a weights file"):  # no registry tags: says how to pass a file
        models.load_clip(TINY, None, device="cpu")
    assert models.load_clip(TINY, "random", device="cpu").pretrained == "random"  # asked for: fine
    assert models.load_clip("tvtool-mini", device="cpu").pretrained == "builtin"  # the mini keeps its default


def test_cli_eval_without_pretrained_is_refused():
    from cli_helpers import run_tvtool

    r = run_tvtool("eval", "accuracy", "--model", "ViT-B-32", "--tasks", "mini-shapes", "--device", "cpu",
                   env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and "no pretrained weights given" in r.stderr and "Traceback" not in r.stderr
