"""Sharded safetensors (``model.safetensors.index.json`` + shards), read lazily like one file.

The index's ``weight_map`` names the shard of every tensor; each shard is memory-mapped by
:class:`tvtool.safetensors_io.SafetensorsFile`, so reading one tensor touches one shard's pages only.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import TVToolError
from ..safetensors_io import SafetensorsFile
from ..weight_source import WeightSource


def open_index(index: str | Path, describe: dict) -> WeightSource:
    index = Path(index)
    try:
        doc = json.loads(index.read_text())
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise TVToolError(f"{index}: not a safetensors index (needs a non-empty \"weight_map\")") from None
    shards: dict[str, SafetensorsFile] = {}
    for key, name in weight_map.items():
        shard = index.parent / str(name)
        if Path(str(name)).is_absolute() or ".." in Path(str(name)).parts:
            raise TVToolError(f"{index}: shard {name!r} is outside the index's folder")
        if name not in shards:
            if not shard.is_file():
                raise TVToolError(f"{index}: shard {name} is missing")
            shards[name] = SafetensorsFile(shard)
        if key not in shards[name]:
            raise TVToolError(f"{index}: tensor {key} is not in its shard {name}")
    where = {k: shards[n] for k, n in weight_map.items()}
    return WeightSource(list(weight_map), lambda k: where[k].get(k), describe, shape=lambda k: where[k].shape(k),
                        dtype=lambda k: where[k].dtype(k), release=lambda k: where[k].release(k))
