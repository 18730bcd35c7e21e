"""Stanford Cars, torchvision's ``StanfordCars`` layout under ``stanford_cars/``.

Labels: the annotation's class id - 1, i.e. the order of ``devkit/cars_meta.mat`` ``class_names`` and of
``templates/cars.yaml``. Examples come in annotation-file order (the reference's order).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import TVToolError
from .base import check_classes, file_listing, register_real, require
from .files import loadmat, relative_name

LAYOUT = (
    "ROOT/stanford_cars/{cars_train,cars_test}/*.jpg, ROOT/stanford_cars/devkit/{cars_meta.mat,cars_train_annos.mat} "
    "and ROOT/stanford_cars/cars_test_annos_withlabels.mat. The original host (ai.stanford.edu/~jkrause) is gone: "
    "get the images from a mirror (e.g. Kaggle 'jessicali9530/stanford-cars-dataset'; flatten cars_train/cars_train), "
    "car_devkit.tgz and cars_test_annos_withlabels.mat as described in github.com/pytorch/vision/issues/7545"
)


def _loadmat(path: Path):
    return loadmat(require("cars", path), "a Stanford Cars .mat file", squeeze_me=True)


def _parse(path: Path, fn):
    """``fn()`` on the contents of ``path``; a record of the wrong shape or type is one line naming the file."""
    try:
        return fn()
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, OverflowError) as exc:
        raise TVToolError(f"{path}: not Stanford Cars metadata ({type(exc).__name__}: {str(exc)[:80]}); "
                          "re-download it (see `tvtool data prepare cars`)") from None


def listing(split: str, root: Path):
    base = root / "stanford_cars"
    if split == "train":
        annos, images = base / "devkit" / "cars_train_annos.mat", base / "cars_train"
    else:
        annos, images = base / "cars_test_annos_withlabels.mat", base / "cars_test"
    require("cars", images)
    meta = base / "devkit" / "cars_meta.mat"
    meta_mat = _loadmat(meta)
    n_classes = _parse(meta, lambda: np.asarray(meta_mat["class_names"]).size)
    check_classes("cars", n_classes, meta)
    annos_mat = _loadmat(annos)
    records = _parse(annos, lambda: np.asarray(annos_mat["annotations"]).reshape(-1))  # squeeze_me: 1 -> scalar
    paths = _parse(annos, lambda: [str(images / relative_name(str(r["fname"]), annos)) for r in records])
    labels = _parse(annos, lambda: [int(r["class"]) - 1 for r in records])
    return file_listing(root, paths, labels, source=str(images), n_classes=n_classes)


register_real("cars", listing, epochs=35, layout_help=LAYOUT)
