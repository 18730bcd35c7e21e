"""Transformers CLIP models named by their Hugging Face hub id, read from a fabricated hub cache (issue 21).

Each behaviour runs through the installed `tvtool` with HF_HUB_CACHE pointed at a cache laid out like
huggingface_hub's (blobs, snapshot links, refs/main) and HF_HUB_OFFLINE=1; the download path, which needs the
network, is exercised in-process with huggingface_hub's snapshot_download replaced by a local stand-in.
"""
import json
import shutil
import sys

import numpy as np
import pytest

from cli_helpers import run_tvtool
from hf_helpers import cache_model, clip_model, commit_of, vision_model
from tvtool.errors import TVToolError
from tvtool.taskvector import open_vector
from tvtool.weights_spec import hub_id, parse_pretrained, parse_weights

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

BASE = "openai/clip-vit-base-patch32"
FT = "tanganke/clip-vit-base-patch32_sun397"


def _finetuned(seed=1):
    """A CLIPVisionModel fine-tuned from clip_model(0)'s image tower: its weights plus noise."""
    ft = vision_model()
    getattr(ft, "vision_model", ft).load_state_dict(clip_model(0).vision_model.state_dict())  # transformers 5: flat
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return ft


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub cache with the base (two revisions: an old one and main) and a fine-tuned vision model."""
    cache = tmp_path_factory.mktemp("hf-cache")
    old = cache_model(cache, BASE, clip_model(5), revision=commit_of("old"), branch=None)
    main = cache_model(cache, BASE, clip_model(0), revision=commit_of("main"))
    ft = cache_model(cache, FT, _finetuned())
    return {"cache": cache, "old": old, "main": main, "ft": ft,
            "env": {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}}


def _tensors(path):
    v = open_vector(path)
    return {k: np.array(v.array(k)) for k in v.keys()}


def _one_line_error(r):
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("text, expected", [
    (BASE, (BASE, None)),
    (f"{FT}@main", (FT, "main")),
    ("laion/CLIP-ViT-B-32-laion2B-s34B-b79K@refs/pr/3", ("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "refs/pr/3")),
    ("runs/cars.safetensors", None),  # a missing file, not a repo
    ("runs/model.pt", None),
    ("./openai/clip", None),
    ("/abs/path", None),
    ("a/b/c", None),
    ("ViT-B-32:openai", None),
    ("hf-hub:timm/vit", None),
    ("org/na--me", None),
])
def test_hub_id_reads_only_repo_ids(text, expected):
    assert hub_id(text) == expected


def test_parse_gives_hub_kind_unless_a_local_path_exists(tmp_path, monkeypatch):
    assert parse_weights(BASE).kind == "hf-repo" and not parse_weights(BASE).builds_model
    spec = parse_pretrained("ViT-B-32", BASE)
    assert (spec.kind, spec.arch, spec.pretrained) == ("hf-repo", "ViT-B-32", BASE)
    assert parse_pretrained("ViT-B-32", "openai").kind == "tag"  # open_clip tags have no slash
    monkeypatch.chdir(tmp_path)
    (tmp_path / "openai" / "clip-vit-base-patch32").mkdir(parents=True)
    assert parse_weights(BASE).kind == "folder" and parse_pretrained("ViT-B-32", BASE).kind == "folder"


# ------------------------------------------------------------------------------------------------ the cache
def test_extract_from_hub_ids_offline_equals_extract_from_the_snapshot_folders(hub, tmp_path):
    r = run_tvtool("extract", "--pretrained", BASE, "--finetuned", FT, "-o", tmp_path / "hub.st", env=hub["env"])
    assert r.returncode == 0, r.stderr
    r = run_tvtool("extract", "--pretrained", hub["main"], "--finetuned", hub["ft"], "-o", tmp_path / "dir.st")
    assert r.returncode == 0, r.stderr
    a, b = _tensors(tmp_path / "hub.st"), _tensors(tmp_path / "dir.st")
    assert a.keys() == b.keys() and "visual.transformer.resblocks.0.attn.in_proj_weight" in a
    assert all(np.array_equal(a[k], b[k]) for k in a)
    meta = open_vector(tmp_path / "hub.st").meta
    # recorded by id and commit: the same weights on any machine with the model cached
    assert meta["base"]["pretrained"] == f"{BASE}@{commit_of('main')}"
    assert meta["history"][0]["finetuned"]["pretrained"] == f"{FT}@{hub['ft'].name}"


def test_revision_picks_the_snapshot_and_refs_main_the_default(hub, tmp_path):
    """Two cached revisions of the base: `@COMMIT` reads that one, no revision reads the one refs/main names."""
    outs = {}
    for name, spec in (("main", BASE), ("old", f"{BASE}@{commit_of('old')}")):
        r = run_tvtool("extract", "--pretrained", spec, "--finetuned", FT, "-o", tmp_path / f"{name}.st",
                       env=hub["env"])
        assert r.returncode == 0, r.stderr
        outs[name] = _tensors(tmp_path / f"{name}.st")
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert not np.allclose(outs["main"][key], outs["old"][key])
    assert open_vector(tmp_path / "old.st").meta["base"]["pretrained"] == f"{BASE}@{commit_of('old')}"


def test_offline_and_not_cached_is_one_line_saying_how_to_fetch(hub, tmp_path):
    r = run_tvtool("extract", "--pretrained", "openai/clip-vit-large-patch14", "--finetuned", FT,
                   "-o", tmp_path / "v.st", env=hub["env"])
    line = _one_line_error(r)
    assert "openai/clip-vit-large-patch14" in line and "Hugging Face cache" in line and "offline" in line
    assert "hf download openai/clip-vit-large-patch14" in line
    assert not (tmp_path / "v.st").exists()
    # eval / finetune fail before any data or model work
    r = run_tvtool("finetune", "mini-shapes", "--pretrained", "openai/clip-vit-large-patch14", "-o", tmp_path / "f.st",
                   env=hub["env"])
    assert "hf download" in _one_line_error(r)


def test_a_local_folder_of_the_same_name_wins(hub, tmp_path):
    local = tmp_path / "openai" / "clip-vit-base-patch32"
    shutil.copytree(hub["old"], local)  # other weights than the cache's main
    r = run_tvtool("extract", "--pretrained", BASE, "--finetuned", FT, "-o", tmp_path / "v.st", env=hub["env"],
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert open_vector(tmp_path / "v.st").meta["base"]["pretrained"] == str(local.resolve())


def test_apply_onto_a_hub_id_writes_a_transformers_folder_of_base_plus_vector(hub, tmp_path):
    env = hub["env"]
    assert run_tvtool("extract", "--pretrained", BASE, "--finetuned", FT, "-o", tmp_path / "v.st",
                      env=env).returncode == 0
    r = run_tvtool("apply", tmp_path / "v.st", "--pretrained", BASE, "--alpha", "0.5", "-o", tmp_path / "merged",
                   env=env)
    assert r.returncode == 0, r.stderr
    merged = transformers.CLIPModel.from_pretrained(tmp_path / "merged").state_dict()
    base = transformers.CLIPModel.from_pretrained(hub["main"]).state_dict()
    ft = transformers.CLIPVisionModel.from_pretrained(hub["ft"]).state_dict()
    for name in ("vision_model.encoder.layers.1.self_attn.k_proj.weight", "vision_model.encoder.layers.0.mlp.fc2.bias"):
        ft_name = name if name in ft else name[len("vision_model."):]
        expected = base[name] + 0.5 * (ft[ft_name] - base[name])
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    assert torch.equal(merged["text_model.encoder.layers.0.mlp.fc1.weight"],
                       base["text_model.encoder.layers.0.mlp.fc1.weight"])


def test_convert_a_hub_id_equals_converting_its_folder(hub, tmp_path):
    assert run_tvtool("convert", BASE, "-o", tmp_path / "hub.safetensors", env=hub["env"]).returncode == 0
    assert run_tvtool("convert", hub["main"], "-o", tmp_path / "dir.safetensors").returncode == 0
    from tvtool.safetensors_io import SafetensorsFile

    with SafetensorsFile(tmp_path / "hub.safetensors") as a, SafetensorsFile(tmp_path / "dir.safetensors") as b:
        assert a.keys() == b.keys() and all(np.array_equal(a.array(k), b.array(k)) for k in a.keys())
        assert a.metadata["source"] == f"{BASE}@{commit_of('main')}"


def test_finetune_and_eval_take_a_hub_id(hub, tmp_path):
    """finetune --pretrained ORG/NAME builds the model from the cache; eval rebuilds it from the recorded id."""
    env = hub["env"]
    r = run_tvtool("finetune", "mini-shapes", "--pretrained", BASE, "--max-steps", "1", "--batch-size", "8",
                   "--no-eval", "--device", "cpu", "-o", tmp_path / "v.st", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert open_vector(tmp_path / "v.st").meta["base"]["pretrained"] == f"{BASE}@{commit_of('main')}"
    r = run_tvtool("eval", "accuracy", tmp_path / "v.st", "--alpha", "0", "--max-examples", "6", "--json",
                   "--device", "cpu", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    at_zero = json.loads(r.stdout)["accuracy"]
    r = run_tvtool("eval", "accuracy", "--tasks", "mini-shapes", "--model", "ViT-B-32", "--pretrained", BASE,
                   "--max-examples", "6", "--json", "--device", "cpu", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] == at_zero  # alpha 0 is the base itself


# ------------------------------------------------------------------------------------------------ downloads
def test_download_asks_only_for_config_and_weights_into_the_cache(hub, tmp_path, monkeypatch):
    """Online and not cached: huggingface_hub's snapshot_download, asked for config.json and the weights only."""
    from tvtool.formats import hf_hub

    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        return str(cache_model(tmp_path / "cache", repo_id, vision_model(3)))

    fake = type(sys)("huggingface_hub")
    fake.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_hub, "reachable", lambda host=hf_hub.HUB_HOST: True)
    folder, label = hf_hub.resolve("someone/clip-ft@v1")
    assert calls == [("someone/clip-ft", "v1", hf_hub.WEIGHT_PATTERNS)]
    assert not any("tokenizer" in p or p.endswith((".bin", ".h5", ".msgpack")) for p in calls[0][2])
    assert (folder / "model.safetensors").is_file() and label == f"someone/clip-ft@{folder.name}"
    assert hf_hub.resolve(f"someone/clip-ft@{folder.name}")[0] == folder and len(calls) == 1  # now cached

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed: one line saying what to install
    with pytest.raises(TVToolError, match="pip install huggingface_hub"):
        hf_hub.resolve("someone/other")
    monkeypatch.setattr(hf_hub, "reachable", lambda host=hf_hub.HUB_HOST: False)
    with pytest.raises(TVToolError, match="unreachable"):
        hf_hub.resolve("someone/other")


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    from tvtool.formats import hf_hub

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hf_hub.hub_cache() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert hf_hub.hub_cache() == tmp_path / "hfhome" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hf_hub.hub_cache() == tmp_path / "c"


def test_a_failed_download_is_one_line_naming_both_readings(tmp_path, monkeypatch):
    """Online, nothing local and the hub refuses (a typo, a private repo): one line, saying no local path exists."""
    from tvtool.formats import hf_hub

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        raise RuntimeError("404 Client Error: Repository Not Found\nmore detail")

    fake = type(sys)("huggingface_hub")
    fake.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_hub, "reachable", lambda host=hf_hub.HUB_HOST: True)
    with pytest.raises(TVToolError) as err:
        hf_hub.resolve("results/cars")
    message = str(err.value)
    assert "\n" not in message and "no such local file or folder" in message and "Repository Not Found" in message
