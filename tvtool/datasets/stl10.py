"""STL-10, torchvision's layout: ``stl10_binary/{train,test}_{X,y}.bin`` (the unlabeled part is not used).

``*_X.bin`` holds uint8 images as [N, 3, 96, 96] stored column-major per channel (torchvision transposes H and W);
``*_y.bin`` labels 1-10 (-> 0-9, the order of ``stl10_binary/class_names.txt`` and ``templates/stl10.yaml``).
No validation split ships: Val = 10% of train (5,000 -> 500), as in TALL masks. Epochs: 60 (TALL masks
``finetune.py``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import TVToolError
from ..fileio import check_input
from .base import array_listing, check_classes, check_labels, register_real, require, torchvision_download
from .files import MAX_EXAMPLES, read_bytes

LAYOUT = "ROOT/stl10_binary/{train,test}_{X,y}.bin; `tvtool data prepare stl10` downloads them via torchvision (2.6 GB)"
SIDE = 96


def listing(split: str, root: Path):
    base = root / "stl10_binary"
    part = "train" if split == "train" else "test"
    x_path, y_path = require("stl10", base / f"{part}_X.bin"), require("stl10", base / f"{part}_y.bin")
    size = check_input(x_path, "STL-10's images").st_size  # a FIFO must not reach numpy.memmap
    labels = np.frombuffer(read_bytes(y_path, "STL-10's labels", MAX_EXAMPLES), dtype=np.uint8).astype(np.int64) - 1
    if size != labels.size * 3 * SIDE * SIDE:
        raise TVToolError(f"{x_path}: {size} bytes do not hold {labels.size} labelled 96x96 images; re-download STL-10")
    labels = check_labels(labels, 10, y_path)
    # lazily: only the decoded examples are read (an empty file cannot be memory-mapped)
    raw = np.memmap(x_path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    images = raw.reshape(-1, 3, SIDE, SIDE).transpose(0, 3, 2, 1)  # [N, C, W, H] on disk -> [N, H, W, C]
    check_classes("stl10", 10, y_path)
    return array_listing(images, labels, x_path.name, [x_path, y_path], source=str(x_path))


def prepare(root: Path, echo) -> None:
    import torchvision

    torchvision_download("stl10", lambda: torchvision.datasets.STL10(str(root), split="train", download=True), LAYOUT)
    echo("stl10_binary: downloaded")


register_real("stl10", listing, epochs=60, layout_help=LAYOUT, prepare=prepare)
