"""SVHN (cropped digits): ``svhn/train_32x32.mat`` and ``svhn/test_32x32.mat``. Labels: digits 0-9 (the file's
label 10 means digit 0, as in torchvision), the order of ``templates/svhn.yaml``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import TVToolError
from .base import array_listing, check_classes, check_labels, register_real, require, torchvision_download
from .files import loadmat

LAYOUT = "ROOT/svhn/{train,test}_32x32.mat; `tvtool data prepare svhn` downloads them via torchvision"


def listing(split: str, root: Path):
    path = require("svhn", root / "svhn" / f"{'train' if split == 'train' else 'test'}_32x32.mat")
    mat = loadmat(path, "an SVHN .mat file")
    x, y = mat.get("X"), mat.get("y")
    how = "re-download it with `tvtool data prepare svhn`"
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else "missing"
        raise TVToolError(f"{path}: 'X' is {got}, expected uint8 images 32x32x3xN; {how}")
    if not isinstance(y, np.ndarray) or y.dtype == object or y.size != x.shape[3] or (y.ndim > 1 and y.shape[1:] != (1,)):
        got = f"{y.size} labels" if isinstance(y, np.ndarray) else "no labels"
        raise TVToolError(f"{path}: {got} for {x.shape[3]} images ('y' must hold one label per image); {how}")
    labels = check_labels(y.reshape(-1), 11, path) % 10  # 1..10 in the file (0 tolerated): label 10 is the digit 0
    images = np.ascontiguousarray(np.transpose(x, (3, 0, 1, 2)))  # (32, 32, 3, N) -> (N, 32, 32, 3)
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
