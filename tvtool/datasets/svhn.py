"""SVHN (cropped digits): ``svhn/train_32x32.mat`` and ``svhn/test_32x32.mat``. Labels: digits 0-9 (the file's
label 10 means digit 0, as in torchvision), the order of ``templates/svhn.yaml``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import TVToolError
from .base import array_listing, check_classes, register_real, require, torchvision_download

LAYOUT = "ROOT/svhn/{train,test}_32x32.mat; `tvtool data prepare svhn` downloads them via torchvision"


def listing(split: str, root: Path):
    import scipy.io

    path = require("svhn", root / "svhn" / f"{'train' if split == 'train' else 'test'}_32x32.mat")
    try:
        mat = scipy.io.loadmat(str(path))
        x, y = mat["X"], mat["y"]
    except Exception as exc:
        raise TVToolError(f"{path}: unreadable ({exc}); re-download it with `tvtool data prepare svhn`") from None
    images = np.ascontiguousarray(np.transpose(x, (3, 0, 1, 2)))  # (32, 32, 3, N) -> (N, 32, 32, 3)
    labels = y.astype(np.int64).reshape(-1) % 10  # label 10 is the digit 0
    check_classes("svhn", 10, path)
    return array_listing(images, labels, path.name, [path], source=str(path))


def prepare(root: Path, echo) -> None:
    import torchvision

    for split in ("train", "test"):
        torchvision_download(
            "svhn", lambda: torchvision.datasets.SVHN(str(root / "svhn"), split=split, download=True), LAYOUT
        )
    echo("svhn: downloaded")


register_real("svhn", listing, epochs=4, layout_help=LAYOUT, prepare=prepare)
