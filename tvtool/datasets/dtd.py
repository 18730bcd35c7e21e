"""DTD (Describable Textures): ``dtd/train/<class>/`` and ``dtd/val/<class>/``; the "val" folder is the test set.

Classes: sorted folder names (ImageFolder), the order of ``templates/dtd.yaml``. The reference preparation puts
partition 1's ``labels/train1.txt`` in ``train`` and ``labels/test1.txt`` in ``val``.
"""
from __future__ import annotations

from pathlib import Path

from .base import image_folder, link_or_copy, register_real, require, torchvision_download
from .files import read_text, relative_name

LAYOUT = (
    "ROOT/dtd/train/<class>/*.jpg (partition 1 train1.txt) and ROOT/dtd/val/<class>/*.jpg (test1.txt, used as the "
    "test set); `tvtool data prepare dtd` downloads dtd-r1.0.1 via torchvision and arranges it"
)


def listing(split: str, root: Path):
    return image_folder("dtd", root, root / "dtd" / ("train" if split == "train" else "val"))[1]


def prepare(root: Path, echo) -> None:
    import torchvision

    torchvision_download("dtd", lambda: torchvision.datasets.DTD(str(root), split="train", partition=1, download=True), LAYOUT)
    src = require("dtd", root / "dtd" / "dtd")  # torchvision's extraction folder
    for lst, out in (("train1.txt", "train"), ("test1.txt", "val")):
        names = read_text(src / "labels" / lst, "DTD's split list").split()
        for rel in names:  # "<class>/<file>.jpg"
            relative_name(rel, src / "labels" / lst)
            link_or_copy(src / "images" / rel, root / "dtd" / out / rel)
        echo(f"dtd/{out}: {len(names)} images")


register_real("dtd", listing, epochs=76, layout_help=LAYOUT, prepare=prepare)
