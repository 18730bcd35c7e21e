"""GTSRB, torchvision's layout under ``gtsrb/``: ``GTSRB/Training/<class id>/*.ppm`` and
``GTSRB/Final_Test/Images/*.ppm`` labelled by ``GT-final_test.csv`` (in ``gtsrb/`` as torchvision puts it, or in
``Final_Test/Images``).

Labels: the class id (folder ``00000`` ... ``00042`` sorted = id), the order of ``templates/gtsrb.yaml``. Test
examples come in CSV row order.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from ..errors import TVToolError
from .base import check_classes, file_listing, image_folder, missing, register_real, require, torchvision_download
from .files import read_text, reject_nul

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
        if os.path.lexists(gt):
            break
    else:
        raise missing("gtsrb", base / "GT-final_test.csv", "test labels")
    paths, labels = [], []
    how = "re-download it with `tvtool data prepare gtsrb`"
    reader = csv.DictReader(io.StringIO(read_text(gt, "GTSRB's test labels (csv)")), delimiter=";",
                            skipinitialspace=True)
    try:
        if not {"Filename", "ClassId"} <= set(reader.fieldnames or ()):
            raise TVToolError(f"{gt}: expected the columns Filename and ClassId (';'-separated); got "
                              f"{sorted(reader.fieldnames or ())[:8]}; {how}")
        for row in reader:
            where = f"{gt}:{reader.line_num}"
            name, cls = row["Filename"] or "", (row["ClassId"] or "").strip()
            if "/" in name or "\\" in name:  # the test images are one flat folder
                raise TVToolError(f"{where}: Filename {name[:80]!r} is not a file of {images}; {how}")
            reject_nul(name, where)
            if not cls.isdigit():
                raise TVToolError(f"{where}: ClassId {cls[:20]!r} is not a whole number; {how}")
            if int(cls) >= N_CLASSES:
                raise TVToolError(f"{where}: ClassId {cls} outside 0..{N_CLASSES - 1}; {how}")
            paths.append(str(images / name))
            labels.append(int(cls))
    except csv.Error as exc:
        raise TVToolError(f"{gt}:{reader.line_num}: not a GTSRB row ({str(exc)[:80]}); {how}") from None
    check_classes("gtsrb", N_CLASSES, gt)
    return file_listing(root, paths, labels, source=str(images), n_classes=N_CLASSES)


def prepare(root: Path, echo) -> None:
    import torchvision

    for split in ("train", "test"):
        torchvision_download(
            "gtsrb", lambda: torchvision.datasets.GTSRB(str(root), split=split, download=True), LAYOUT
        )
    echo("gtsrb: downloaded")


register_real("gtsrb", listing, epochs=11, layout_help=LAYOUT, prepare=prepare)
