"""ImageNet (ILSVRC-2012), the control task for negation: ``imagenet/train/<wnid>/`` and ``imagenet/val/<wnid>/``.

Classes: sorted wnid folder names (n01440764 ... n15075141), the standard order of ``templates/imagenet.yaml``.
The test split is the official validation set arranged into wnid folders (``val_in_folder/`` is accepted too).
"""
from __future__ import annotations

from pathlib import Path

from .base import image_folder, register_real

LAYOUT = (
    "ROOT/imagenet/train/<wnid>/*.JPEG and ROOT/imagenet/val/<wnid>/*.JPEG. Register at image-net.org, download "
    "ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz into ROOT/imagenet/, then "
    "`python -c \"import torchvision; torchvision.datasets.ImageNet('ROOT/imagenet', split='val')\"` (and split='train') "
    "extracts them into wnid folders"
)


def listing(split: str, root: Path):
    base = root / "imagenet"
    if split == "train":
        folder = base / "train"
    else:
        folder = base / "val_in_folder" if (base / "val_in_folder").is_dir() else base / "val"
    return image_folder("imagenet", root, folder)[1]


register_real("imagenet", listing, epochs=10, layout_help=LAYOUT, control=True)
