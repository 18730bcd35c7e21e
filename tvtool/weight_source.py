"""``WeightSource``: a lazily readable set of named tensors, with where it came from and what its format says.

Every reader of weights (safetensors files, sharded indexes, pickles, transformers folders, models built by
open_clip) hands one out; extract, apply and convert read tensors from it one at a time. Files are read as numpy
views without torch (``array``, ``code``); ``get`` hands out torch tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from .safetensors_io import SafetensorsFile, tensor_to_array, torch, torch_code


@dataclass(frozen=True)
class ModelConfig:
    """What a weights format states about the model beyond its tensors' names and shapes (None: it states nothing).

    ``open_clip``: the open_clip model config (``model_cfg``: towers, widths, activation), e.g. read from a
    transformers folder's config.json. ``transformers``: the transformers ``CLIPConfig`` / ``CLIPVisionConfig`` of a
    transformers folder; ``apply`` onto such a base writes a transformers folder of the same kind, copying the config
    and processor files of ``transformers_folder`` (the folder they were read from).
    """

    open_clip: dict | None = None
    transformers: Any = None
    transformers_folder: str | None = None


class WeightSource:
    """A lazily readable collection of named tensors plus a description of where it came from.

    ``describe``: ``{"model": open_clip architecture or None, "pretrained": where the weights are, ...}``, recorded
    as a task vector's base. ``config``: what the format says about the model (:class:`ModelConfig`).
    """

    def __init__(self, keys: Iterable[str], getter, describe: dict, shape=None, dtype=None, release=None,
                 file: SafetensorsFile | None = None, config: ModelConfig | None = None):
        self._keys = list(keys)
        self._get = getter
        self._shape = shape
        self._dtype = dtype
        self._release = release
        self._file = file  # set for safetensors files: numpy access without torch
        self.describe = describe
        self.config = config or ModelConfig()

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], describe: dict,
                        config: ModelConfig | None = None) -> "WeightSource":
        return cls(state.keys(), state.__getitem__, describe, config=config)

    @classmethod
    def from_safetensors(cls, path, describe: dict) -> "WeightSource":
        f = SafetensorsFile(path)
        return cls(f.keys(), f.get, describe, shape=f.shape, dtype=f.dtype, release=f.release, file=f)

    @property
    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` of a single-file source ({} for every other source)."""
        return self._file.metadata if self._file else {}

    def keys(self) -> list[str]:
        return self._keys

    def __contains__(self, key: str) -> bool:
        return key in self._key_set

    @property
    def _key_set(self) -> set[str]:
        if not hasattr(self, "_ks"):
            self._ks = set(self._keys)
        return self._ks

    def get(self, key: str) -> torch.Tensor:
        return self._get(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._shape(key)) if self._shape else tuple(self._get(key).shape)

    def code(self, key: str) -> str:
        """The safetensors dtype code of a tensor ("F32", "BF16", ...)."""
        return self._file.code(key) if self._file else torch_code(self.dtype(key))

    def array(self, key: str) -> np.ndarray:
        """The tensor as a numpy array (bf16 as raw uint16 bits); zero-copy for files and CPU tensors."""
        return self._file.array(key) if self._file else tensor_to_array(self._get(key))[0]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtype(key) if self._dtype else self._get(key).dtype

    def release(self, key: str) -> None:
        if self._release:
            self._release(key)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self._keys:
            yield k, self._get(k)
