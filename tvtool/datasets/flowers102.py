"""Oxford 102 Flowers, torchvision's layout: ``flowers-102/jpg/image_NNNNN.jpg``, ``flowers-102/imagelabels.mat``
(label 1-102 per image id) and ``flowers-102/setid.mat`` (``trnid`` / ``valid`` / ``tstid`` image ids).

Ships its own validation split (1,020 train, 1,020 val, 6,149 test), used as Val (``native_val``); TALL masks
instead trains on 90% of ``trnid`` and validates on the other 10% (``split_train_into_train_val``). Labels:
imagelabels - 1, the order of ``templates/flowers102.yaml``; examples in setid order. Epochs: 147 (TALL masks
``finetune.py``; 8 steps of 128 per epoch either way).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import TVToolError
from .base import check_classes, file_listing, register_real, require, torchvision_download
from .files import loadmat

LAYOUT = (
    "ROOT/flowers-102/{jpg/image_*.jpg,imagelabels.mat,setid.mat}; `tvtool data prepare flowers102` downloads them "
    "via torchvision"
)
SET_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}


def _loadmat(path: Path):
    return loadmat(require("flowers102", path), "a Flowers102 .mat file", squeeze_me=True)


def listing(split: str, root: Path):
    base = root / "flowers-102"
    images = require("flowers102", base / "jpg")
    where = base / "setid.mat"
    try:
        ids = [int(i) for i in np.asarray(_loadmat(where)[SET_KEYS[split]]).reshape(-1)]
        where = base / "imagelabels.mat"
        labels_by_id = [int(v) - 1 for v in np.asarray(_loadmat(where)["labels"]).reshape(-1)]
    except TVToolError:
        raise
    except (KeyError, ValueError, TypeError, OverflowError) as exc:
        raise TVToolError(f"{where}: not Flowers102 metadata ({type(exc).__name__}: {str(exc)[:80]}); re-download "
                          "it with `tvtool data prepare flowers102`") from None
    if ids and not (1 <= min(ids) and max(ids) <= len(labels_by_id)):
        raise TVToolError(f"{base / 'setid.mat'}: image ids beyond imagelabels.mat; re-download Flowers102")
    check_classes("flowers102", max(labels_by_id, default=-1) + 1, base / "imagelabels.mat")
    paths = [str(images / f"image_{i:05d}.jpg") for i in ids]
    return file_listing(root, paths, [labels_by_id[i - 1] for i in ids], source=str(images), n_classes=102)


def prepare(root: Path, echo) -> None:
    import torchvision

    torchvision_download("flowers102", lambda: torchvision.datasets.Flowers102(str(root), download=True), LAYOUT)
    echo("flowers-102: downloaded")


register_real("flowers102", listing, epochs=147, native_val=True, layout_help=LAYOUT, prepare=prepare)
