"""RESISC45: ``resisc45/NWPU-RESISC45/<class>/*.jpg`` plus the split lists ``resisc45/resisc45-{train,val,test}.txt``.

Classes: sorted folder names (ImageFolder, every class folder counts), the order of ``templates/resisc45.yaml``.
A split holds the files whose base name is in its list, as in the reference (TorchGeo's) loader. The protocol's
validation part is 10% of ``train`` (seed 0); ``resisc45-val.txt`` is not used.
"""
from __future__ import annotations

import os
from pathlib import Path

from .base import image_folder, missing, register_real
from .files import read_text

LAYOUT = (
    "ROOT/resisc45/NWPU-RESISC45/<class>/*.jpg and ROOT/resisc45/resisc45-{train,val,test}.txt. The split lists "
    "moved from their old Google Storage bucket; TorchGeo mirrors images and lists: `pip install torchgeo` then "
    "`python -c \"import torchgeo.datasets as d; d.RESISC45('ROOT/resisc45', split='train', download=True)\"` "
    "(repeat with split='test'), which produces exactly this layout"
)


def listing(split: str, root: Path):
    base = root / "resisc45"
    lst = base / f"resisc45-{split}.txt"
    if not os.path.lexists(lst):
        raise missing("resisc45", lst, "split list")
    keep = set(read_text(lst, "RESISC45's split list").split())
    return image_folder("resisc45", root, base / "NWPU-RESISC45", keep=keep.__contains__)[1]


register_real("resisc45", listing, epochs=15, layout_help=LAYOUT)
