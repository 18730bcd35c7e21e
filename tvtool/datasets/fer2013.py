"""FER2013, the Kaggle csv under ``fer2013/``: ``fer2013.csv`` (columns ``emotion,pixels,Usage``) or
``icml_face_data.csv`` (``emotion, Usage, pixels``), the files torchvision's ``FER2013`` reads with labelled tests.

Train = the ``Training`` rows (28,709); test = ``PublicTest`` + ``PrivateTest`` (7,178), torchvision's test split
and the size of the test split the published runs used (TALL masks loads the Hugging Face copy
``Jeneral/fer-2013``). PublicTest is not used as Val, so the test set stays the published one: Val = 10% of train
(2,870). Labels: the ``emotion`` column 0-6, the order of ``templates/fer2013.yaml``. Images: 48x48 grey. Epochs: 10
(TALL masks ``finetune.py``). Not downloadable automatically (Kaggle needs a login).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from .._lazy import lazy_module
from ..errors import TVToolError
from .base import Listing, check_classes, missing, register_real
from .files import MAX_EXAMPLES, not_utf8, open_text

torch = lazy_module("torch")  # listing the registry must not import torch

LAYOUT = (
    "ROOT/fer2013/fer2013.csv (or icml_face_data.csv). Kaggle requires a login: download fer2013.tar.gz from "
    "kaggle.com/c/challenges-in-representation-learning-facial-expression-recognition-challenge (or "
    "icml_face_data.csv from its data page) and extract the csv into ROOT/fer2013/"
)
USAGES = {"train": ("Training",), "test": ("PublicTest", "PrivateTest")}
SIDE = 48


def _csv(root: Path) -> Path:
    for fname in ("fer2013.csv", "icml_face_data.csv"):
        if os.path.lexists(root / "fer2013" / fname):
            return root / "fer2013" / fname
    if (root / "fer2013" / "train.csv").is_file():
        raise TVToolError(
            f"fer2013: {root / 'fer2013'} has Kaggle's train.csv/test.csv, whose test part has no labels; "
            "get fer2013.csv or icml_face_data.csv instead (see `tvtool data prepare fer2013`)"
        )
    raise missing("fer2013", root / "fer2013" / "fer2013.csv")


def listing(split: str, root: Path):
    path = _csv(root)
    pixels: list[str] = []
    labels: list[int] = []
    line = 1
    try:
        with open_text(path, "FER2013's csv") as f:
            reader = csv.DictReader(f, skipinitialspace=True)  # icml_face_data.csv has ' Usage', ' pixels'
            fields = set(reader.fieldnames or ())
            if not {"emotion", "pixels", "Usage"} <= fields:
                raise TVToolError(f"{path}: expected columns emotion, pixels, Usage; got {sorted(fields)[:10]}")
            for row in reader:
                line = reader.line_num
                if row["Usage"] in USAGES[split]:
                    try:
                        labels.append(int(row["emotion"]))
                    except (TypeError, ValueError):
                        raise TVToolError(f"{path}:{line}: emotion {str(row['emotion'])[:20]!r} is not a label "
                                          "0..6") from None
                    if not 0 <= labels[-1] < 7:
                        raise TVToolError(f"{path}:{line}: emotion {labels[-1]} outside 0..6; is this FER2013?")
                    p = row["pixels"] or ""
                    if p.count(" ") != SIDE * SIDE - 1:  # cheap: a short row would fail to decode much later
                        raise TVToolError(f"{path}:{line}: pixels holds {len(p.split())} values, expected "
                                          f"{SIDE * SIDE} ({SIDE}x{SIDE}); the file is damaged, re-download it")
                    pixels.append(p)
                    if len(labels) > MAX_EXAMPLES:
                        raise TVToolError(f"{path}: more than {MAX_EXAMPLES} rows; is this FER2013?")
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except csv.Error as exc:
        raise TVToolError(f"{path}:{line + 1}: not a FER2013 row ({str(exc)[:80]}); the file is damaged, "
                          "re-download it") from None
    check_classes("fer2013", 7, path)

    def open_image(i: int):
        from PIL import Image

        return Image.fromarray(np.array(pixels[i].split(), dtype=np.uint8).reshape(SIDE, SIDE))

    st = os.stat(path)
    ids = [f"{path.name}#{'+'.join(USAGES[split])}#{i}" for i in range(len(labels))]
    return Listing(ids, torch.tensor(labels, dtype=torch.int64), open_image, source=str(path),
                   fingerprint=f"{path.name}:{st.st_size}:{st.st_mtime_ns}")


register_real("fer2013", listing, epochs=10, layout_help=LAYOUT)
