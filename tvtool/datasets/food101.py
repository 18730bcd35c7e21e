"""Food-101, torchvision's layout: ``food-101/images/<class>/<id>.jpg`` and ``food-101/meta/{train,test}.json``
(``{class: ["<class>/<id>", ...]}``).

Labels: position of the class in the sorted json keys (torchvision's), the order of ``templates/food101.yaml``;
examples in json order. No validation split ships: Val = 10% of train (75,750 -> capped at 5,000), as in TALL
masks. Epochs: 4 (TALL masks ``finetune.py``).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import TVToolError
from .base import check_classes, file_listing, missing, register_real, torchvision_download
from .files import read_json, relative_name

LAYOUT = (
    "ROOT/food-101/images/<class>/*.jpg and ROOT/food-101/meta/{train,test}.json; `tvtool data prepare food101` "
    "downloads them via torchvision (5 GB)"
)


def listing(split: str, root: Path):
    base = root / "food-101"
    meta = base / "meta" / f"{'train' if split == 'train' else 'test'}.json"
    if not os.path.lexists(meta):
        raise missing("food101", meta)
    entries = read_json(meta, "Food-101's metadata")
    how = "re-download it with `tvtool data prepare food101`"
    if not isinstance(entries, dict):
        raise TVToolError(f"{meta}: not Food-101 metadata (expected a mapping class -> list of images); {how}")
    bad = next((c for c, v in entries.items() if not isinstance(v, list) or not all(isinstance(r, str) for r in v)),
               None)
    if bad is not None:
        raise TVToolError(f"{meta}: class {bad[:60]!r} does not map to a list of image names; {how}")
    classes = sorted(entries)
    index = {c: i for i, c in enumerate(classes)}
    paths = [str(base / "images" / f"{relative_name(rel, meta)}.jpg") for c in entries for rel in entries[c]]
    labels = [index[c] for c in entries for _ in entries[c]]
    check_classes("food101", len(classes), meta)
    return file_listing(root, paths, labels, source=str(base / "images"))


def prepare(root: Path, echo) -> None:
    import torchvision

    torchvision_download("food101", lambda: torchvision.datasets.Food101(str(root), download=True), LAYOUT)
    echo("food-101: downloaded")


register_real("food101", listing, epochs=4, layout_help=LAYOUT, prepare=prepare)
