"""Stanford Cars, torchvision's ``StanfordCars`` layout under ``stanford_cars/``.

Labels: the annotation's class id - 1, i.e. the order of ``devkit/cars_meta.mat`` ``class_names`` and of
``templates/cars.yaml``. Examples come in annotation-file order (the reference's order).
"""
from __future__ import annotations

from pathlib import Path

from .base import check_classes, file_listing, register_real, require

LAYOUT = (
    "ROOT/stanford_cars/{cars_train,cars_test}/*.jpg, ROOT/stanford_cars/devkit/{cars_meta.mat,cars_train_annos.mat} "
    "and ROOT/stanford_cars/cars_test_annos_withlabels.mat. The original host (ai.stanford.edu/~jkrause) is gone: "
    "get the images from a mirror (e.g. Kaggle 'jessicali9530/stanford-cars-dataset'; flatten cars_train/cars_train), "
    "car_devkit.tgz and cars_test_annos_withlabels.mat as described in github.com/pytorch/vision/issues/7545"
)


def _loadmat(path: Path):
    import scipy.io

    from ..errors import TVToolError

    try:
        return scipy.io.loadmat(str(require("cars", path)), squeeze_me=True)
    except TVToolError:
        raise
    except Exception as exc:  # scipy raises ValueError/TypeError/... on a damaged .mat
        raise TVToolError(f"{path}: unreadable ({exc}); re-download it (see `tvtool data prepare cars`)") from None


def listing(split: str, root: Path):
    base = root / "stanford_cars"
    if split == "train":
        annos, images = base / "devkit" / "cars_train_annos.mat", base / "cars_train"
    else:
        annos, images = base / "cars_test_annos_withlabels.mat", base / "cars_test"
    require("cars", images)
    classes = _loadmat(base / "devkit" / "cars_meta.mat")["class_names"]
    check_classes("cars", len(classes), base / "devkit" / "cars_meta.mat")
    records = _loadmat(annos)["annotations"]
    records = records.reshape(-1)  # squeeze_me turns a single annotation into a scalar record
    paths = [str(images / str(r["fname"])) for r in records]
    labels = [int(r["class"]) - 1 for r in records]
    return file_listing(root, paths, labels, source=str(images))


register_real("cars", listing, epochs=35, layout_help=LAYOUT)
