"""Sharded safetensors (``model.safetensors.index.json`` + shards), read lazily like one file.

The index's ``weight_map`` names the shard of every tensor; each shard is memory-mapped by
:class:`tvtool.safetensors_io.SafetensorsFile`, so reading one tensor touches one shard's pages only.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import TVToolError, brief
from ..fileio import read_json
from ..safetensors_io import SafetensorsFile
from ..weight_source import WeightSource


def open_index(index: str | Path, describe: dict) -> WeightSource:
    index = Path(index)
    doc = read_json(index, "a safetensors index")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise TVToolError(f"{index}: not a safetensors index (needs a non-empty \"weight_map\" of shard names)")
    shards: dict[str, SafetensorsFile] = {}
    for key, name in weight_map.items():
        shard = index.parent / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise TVToolError(f"{index}: shard {brief(name)} is outside the index's folder")
        if name not in shards:
            if not shard.is_file():
                raise TVToolError(f"{index}: shard {brief(name)} is missing")
            shards[name] = SafetensorsFile(shard)
        if key not in shards[name]:
            raise TVToolError(f"{index}: tensor {brief(key)} is not in its shard {brief(name)}")
    where = {k: shards[n] for k, n in weight_map.items()}
    return WeightSource(list(weight_map), lambda k: where[k].get(k), describe, shape=lambda k: where[k].shape(k),
                        dtype=lambda k: where[k].dtype(k), release=lambda k: where[k].release(k))
