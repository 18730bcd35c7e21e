"""Oxford-IIIT Pet, torchvision's layout: ``oxford-iiit-pet/images/<id>.jpg`` and
``oxford-iiit-pet/annotations/{trainval,test}.txt`` (lines ``<id> <class 1-37> <species> <breed id>``).

Train = trainval (3,680), test = test (3,669). No validation split ships: Val = 10% of trainval (368), as in TALL
masks. Labels: class - 1, the order of ``templates/oxfordiiitpet.yaml``; examples in file order. Epochs: 82 (TALL
masks ``finetune.py``).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import TVToolError
from .base import check_classes, file_listing, missing, register_real, require, torchvision_download
from .files import read_text, relative_name

LAYOUT = (
    "ROOT/oxford-iiit-pet/images/*.jpg and ROOT/oxford-iiit-pet/annotations/{trainval,test}.txt; "
    "`tvtool data prepare oxfordiiitpet` downloads them via torchvision"
)
N_CLASSES = 37


def listing(split: str, root: Path):
    base = root / "oxford-iiit-pet"
    ann = base / "annotations" / f"{'trainval' if split == 'train' else 'test'}.txt"
    if not os.path.lexists(ann):
        raise missing("oxfordiiitpet", ann)
    text = read_text(ann, "Oxford-IIIT Pet's annotations")
    images = require("oxfordiiitpet", base / "images")
    paths, labels = [], []
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        try:
            label = int(fields[1]) - 1
        except (IndexError, ValueError):
            raise TVToolError(f"{ann}:{n}: expected '<image id> <class id> ...'; re-download the annotations") from None
        if not 0 <= label < N_CLASSES:
            raise TVToolError(f"{ann}:{n}: class id {label + 1} outside 1..{N_CLASSES}; re-download the annotations")
        paths.append(str(images / f"{relative_name(fields[0], f'{ann}:{n}')}.jpg"))
        labels.append(label)
    check_classes("oxfordiiitpet", N_CLASSES, ann)
    return file_listing(root, paths, labels, source=str(images))


def prepare(root: Path, echo) -> None:
    import torchvision

    torchvision_download("oxfordiiitpet", lambda: torchvision.datasets.OxfordIIITPet(str(root), download=True), LAYOUT)
    echo("oxford-iiit-pet: downloaded")


register_real("oxfordiiitpet", listing, epochs=82, layout_help=LAYOUT, prepare=prepare)
