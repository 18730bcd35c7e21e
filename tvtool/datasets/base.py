"""The dataset registry, the protocol splits and the one entry point everybody loads images through.

A dataset is a :class:`DatasetSpec` registered by one small module (``tvtool/datasets/<name>.py``). Its class names
and prompt templates are data, read lazily from ``tvtool/data/templates/<name>.yaml``
(``classnames: [...]``, ``templates: ["a photo of a {c}.", ...]``; fill with ``template.format(c=name)``).

Splits (PROTOCOL.md "Data"): ``train`` is the training split minus the held-out validation part, ``val`` is 10% of
the training split (capped at 5,000, drawn with seed 0 exactly as ``torch.utils.data.random_split`` does in the
reference code), ``test`` is the test split. EuroSAT ships its own val folder (``native_val``).

Images come back as ``uint8 Tensor[N, 3, S, S]`` (the protocol's eval transform: Resize(short side S, bicubic) +
CenterCrop(S), RGB) and ``int64 Tensor[N]`` labels, cached on disk once per split and resolution (see ``cache.py``).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import TVToolError

SPLITS = ("train", "val", "test")
VAL_FRACTION = 0.1
VAL_CAP = 5000
VAL_SEED = 0


@dataclass
class Listing:
    """The examples of one native split, before decoding: what the cache key is computed from.

    ``ids[i]`` names example i stably (a path relative to the data root, or ``file#index``); ``open(i)`` returns it
    as a PIL image (it may raise for a corrupt file: that example is then skipped and counted).
    """

    ids: Sequence[str]
    labels: torch.Tensor  # int64 [N]
    open: Callable[[int], "object"]
    source: str = ""  # where it was read from, for messages

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class DatasetSpec:
    name: str
    # loader(split, data_root, image_size) -> (uint8 [N,3,S,S], int64 [N]); split is "train" (the FULL training
    # split) or "test", or "val" when native_val.
    loader: Callable
    epochs: int = 10
    native_val: bool = False
    kind: str = "real"  # "real" | "mini"
    needs_data_root: bool = True
    layout_help: str = ""
    control: bool = False
    # Real datasets also give the undecoded listing, so the cache key can name every file and only the requested
    # protocol split is decoded. listing(split, data_root: Path) -> Listing (native splits, like loader's).
    listing: Callable | None = field(default=None, repr=False)
    # Anything else that determines the content (e.g. a mini-world seed or generator version).
    cache_extra: str = ""
    # `tvtool data prepare`: prepare(data_root: Path, echo) downloads/arranges, or None when only manual steps exist.
    prepare: Callable | None = field(default=None, repr=False)

    @property
    def classnames(self) -> list[str]:
        return _templates_file(self.name)["classnames"]

    @property
    def templates(self) -> list[str]:
        return _templates_file(self.name)["templates"]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, classname: str) -> list[str]:
        return [t.format(c=classname) for t in self.templates]

    def load(self, split: str, data_root=None, image_size: int = 224):
        """Protocol split as tensors (cached); same as ``load_split(self.name, ...)``."""
        return load_split(self.name, split, data_root, image_size)


_REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    if spec.kind not in ("real", "mini"):
        raise ValueError(f"{spec.name}: kind must be 'real' or 'mini', not {spec.kind!r}")
    _REGISTRY[spec.name] = spec
    return spec


def get_dataset(name: str) -> DatasetSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none registered"
        raise TVToolError(f"unknown dataset {name!r}; known datasets: {known}") from None


def list_datasets(kind: str | None = None) -> list[str]:
    return sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)


def templates_path(name: str) -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "templates" / f"{name}.yaml"


@functools.lru_cache(maxsize=None)
def _templates_file(name: str) -> dict:
    import yaml

    path = templates_path(name)
    if not path.is_file():
        raise TVToolError(f"{name}: no class names/templates file {path}; add tvtool/data/templates/{name}.yaml")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("classnames"), list)
        or not isinstance(data.get("templates"), list)
        or not data["classnames"]
        or not data["templates"]
    ):
        raise TVToolError(f"{path}: needs non-empty lists 'classnames' and 'templates'")
    for t in data["templates"]:
        if "{c}" not in str(t):
            raise TVToolError(f"{path}: template {t!r} has no '{{c}}' placeholder")
    return {"classnames": [str(c) for c in data["classnames"]], "templates": [str(t) for t in data["templates"]]}


def protocol_val_split(n: int, seed: int = VAL_SEED, fraction: float = VAL_FRACTION, cap: int = VAL_CAP):
    """(train_idx, val_idx), both sorted int64: the reference's held-out validation part of a training split.

    Same membership as ``random_split(range(n), [n - v, v], generator=Generator().manual_seed(seed))`` with
    ``v = min(int(n * fraction), cap)``; returned sorted so cached splits keep the dataset's order.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    n_val = min(int(n * fraction), cap)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n - n_val].sort().values, perm[n - n_val :].sort().values


def resolve_data_root(data_root=None, *, name: str = "") -> Path:
    root = data_root if data_root is not None else os.environ.get("TVTOOL_DATA")
    if not root:
        what = f"{name}: " if name else ""
        raise TVToolError(f"{what}no data root; pass --data-root DIR or set TVTOOL_DATA (see `tvtool data check`)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise TVToolError(f"data root {root} is not a folder; pass an existing --data-root or fix TVTOOL_DATA")
    return root


def load_split(name: str, split: str, data_root=None, image_size: int = 224):
    """A protocol split as ``(uint8 Tensor[N,3,S,S], int64 Tensor[N])``, decoded once and cached."""
    from . import cache

    spec = get_dataset(name)
    if split not in SPLITS:
        raise TVToolError(f"{name}: unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if not isinstance(image_size, int) or image_size < 1:
        raise TVToolError(f"image size must be a positive integer, got {image_size!r}")
    return cache.load_cached(spec, split, data_root, image_size)


# ARCHITECTURE.md's name for the same entry point.
load_split_tensor = load_split
