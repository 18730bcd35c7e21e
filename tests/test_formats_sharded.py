"""Sharded safetensors (an index plus shards) read lazily like one file, alone or inside a transformers folder."""
import json

import pytest
import torch

from tvtool import models
from tvtool.checkpoints import open_weights
from tvtool.errors import TVToolError
from tvtool.safetensors_io import fingerprint, write_safetensors


def _shard(tmp_path, name="model"):
    src = open_weights(models.MINI_WEIGHTS)
    keys = src.keys()
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        fn = f"{name}-0000{i + 1}-of-00002.safetensors"
        specs = {k: (src.dtype(k), src.shape(k)) for k in part}
        write_safetensors(tmp_path / fn, ((k, src.get(k)) for k in part), specs, {})
        weight_map.update({k: fn for k in part})
    index = tmp_path / f"{name}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return src, index


def test_index_and_its_folder_read_like_the_single_file(tmp_path):
    src, index = _shard(tmp_path)
    for spec in (index, tmp_path):
        sharded = open_weights(spec)
        assert sorted(sharded.keys()) == sorted(src.keys())
        assert all(torch.equal(sharded.get(k), src.get(k)) for k in src.keys())
        assert sharded.shape("visual.conv1.weight") == src.shape("visual.conv1.weight")
        assert fingerprint(sharded) == fingerprint(src)


def test_missing_shard_is_one_clear_error(tmp_path):
    _, index = _shard(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(TVToolError, match="shard '?model-00002-of-00002.safetensors'? is missing"):
        open_weights(index)


def test_sharded_transformers_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8), projection_dim=16)
    model = transformers.CLIPModel(cfg)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "many", max_shard_size="1MB")
    assert (tmp_path / "many" / "model.safetensors.index.json").is_file()
    a, b = open_weights(tmp_path / "one"), open_weights(tmp_path / "many")
    assert sorted(a.keys()) == sorted(b.keys())
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())
