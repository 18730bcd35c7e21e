"""Where a split's examples come from: the dataset's folder layout under the data root, else FusionBench's Hugging
Face snapshot of it (``hf.py``), and which of them form each protocol split.

The folder layout wins when it lists; a snapshot is used when the layout is missing or broken and one is found
(under the data root or in the local Hugging Face cache; the latter needs no data root at all). A dataset with its
own validation split (``native_val``) whose snapshot has none gets the protocol's held-out Val (10% of train,
seed 0), as FusionBench's own configs do.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .._lazy import lazy_module
from ..errors import TVToolError
from . import hf
from .base import (SPLITS, VAL_CAP, VAL_FRACTION, DatasetSpec, Listing, get_dataset, native_split, protocol_val_split,
                   resolve_data_root)

log = logging.getLogger("tvtool.datasets")
torch = lazy_module("torch")


def _root(spec: DatasetSpec, data_root) -> Path | None:
    """The data root, or None when none is set but a snapshot in the hub cache can stand in for it."""
    if data_root is None and not os.environ.get("TVTOOL_DATA") and hf.find_snapshot(spec.name, None) is not None:
        return None
    return resolve_data_root(data_root, name=spec.name)


def _native(spec: DatasetSpec, split: str, root: Path | None) -> tuple[Listing, bool]:
    """(listing of the native split behind protocol ``split``, whether Val is a native split of this source)."""
    try:
        if root is None:
            raise TVToolError(f"{spec.name}: no data root")
        return spec.listing(native_split(spec, split), root), spec.native_val
    except TVToolError as folder_error:
        snap = hf.find_snapshot(spec.name, root)
        if snap is None:
            raise
        log.info("%s: %s; reading the Hugging Face snapshot %s", spec.name, folder_error, snap.folder)
        native_val = spec.native_val and snap.has("val")
        return snap.listing("train" if split in ("train", "val") and not native_val else split), native_val


def protocol_listing(spec: DatasetSpec, split: str, data_root) -> tuple[Listing, "torch.Tensor"]:
    """(listing, rows): the listing of the native split behind protocol ``split`` and the sorted positions in it
    that form the protocol split (int64)."""
    listing, native_val = _native(spec, split, _root(spec, data_root))
    if split in ("train", "val") and not native_val:
        train_idx, val_idx = protocol_val_split(len(listing))
        return listing, train_idx if split == "train" else val_idx
    return listing, torch.arange(len(listing))


def check_available(name: str, splits=SPLITS, data_root=None) -> None:
    """Fail fast, before any model is built: ``name`` is registered, its data (folder layout or snapshot) is there,
    and every protocol split in ``splits`` lists at least one example (nothing is decoded)."""
    spec = get_dataset(name)
    for s in splits:
        if s not in SPLITS:
            raise TVToolError(f"{name}: unknown split {s!r}; use one of {', '.join(SPLITS)}")
    if spec.listing is None:
        if spec.needs_data_root:
            resolve_data_root(data_root, name=name)
        return
    for s in splits:
        listing, rows = protocol_listing(spec, s, data_root)
        if len(rows) == 0:
            raise TVToolError(f"{name}: the {s} split ({listing.source or data_root}) has no examples; check the "
                              "data with `tvtool data check`")


def native_problem(spec: DatasetSpec, split: str, root: Path | None) -> str | None:
    """Why the native split ``split`` cannot be listed (one line), or None when it can."""
    try:
        _native(spec, split, root)
    except TVToolError as exc:
        return str(exc)
    return None


def protocol_sizes(spec: DatasetSpec, root: Path) -> tuple[dict[str, int], str]:
    """({train, val, test: examples}, where the training data was found), listing each native split once."""
    train, native_val = _native(spec, "train", root)
    if native_val:
        sizes = {"train": len(train), "val": len(_native(spec, "val", root)[0])}
    else:
        n_val = min(int(len(train) * VAL_FRACTION), VAL_CAP)
        sizes = {"train": len(train) - n_val, "val": n_val}
    sizes["test"] = len(_native(spec, "test", root)[0])
    return sizes, train.source
