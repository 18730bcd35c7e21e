"""GTSRB, torchvision's layout under ``gtsrb/``: ``GTSRB/Training/<class id>/*.ppm`` and
``GTSRB/Final_Test/Images/*.ppm`` labelled by ``GT-final_test.csv`` (in ``gtsrb/`` as torchvision puts it, or in
``Final_Test/Images``).

Labels: the class id (folder ``00000`` ... ``00042`` sorted = id), the order of ``templates/gtsrb.yaml``. Test
examples come in CSV row order.
"""
from __future__ import annotations

import csv
from pathlib import Path

from .base import check_classes, file_listing, image_folder, missing, register_real, require, torchvision_download

LAYOUT = (
    "ROOT/gtsrb/GTSRB/Training/<00000..00042>/*.ppm, ROOT/gtsrb/GTSRB/Final_Test/Images/*.ppm and "
    "ROOT/gtsrb/GT-final_test.csv; `tvtool data prepare gtsrb` downloads them via torchvision"
)
N_CLASSES = 43


def listing(split: str, root: Path):
    base = root / "gtsrb"
    if split == "train":
        return image_folder("gtsrb", root, base / "GTSRB" / "Training", extensions=(".ppm",))[1]
    images = require("gtsrb", base / "GTSRB" / "Final_Test" / "Images")
    for gt in (base / "GT-final_test.csv", images / "GT-final_test.csv"):
        if gt.is_file():
            break
    else:
        raise missing("gtsrb", base / "GT-final_test.csv", "test labels")
    with open(gt, newline="") as f:
        rows = list(csv.DictReader(f, delimiter=";", skipinitialspace=True))
    paths = [str(images / r["Filename"]) for r in rows]
    labels = [int(r["ClassId"]) for r in rows]
    check_classes("gtsrb", N_CLASSES, gt)
    return file_listing(root, paths, labels, source=str(images))


def prepare(root: Path, echo) -> None:
    import torchvision

    for split in ("train", "test"):
        torchvision_download(
            "gtsrb", lambda: torchvision.datasets.GTSRB(str(root), split=split, download=True), LAYOUT
        )
    echo("gtsrb: downloaded")


register_real("gtsrb", listing, epochs=11, layout_help=LAYOUT, prepare=prepare)
