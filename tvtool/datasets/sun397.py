"""SUN397: ``sun397/train/<class>/`` and ``sun397/val/<class>/``; the "val" folder is the test set.

Classes: sorted folder names (ImageFolder), the order of ``templates/sun397.yaml``. The reference preparation
takes partition 1 (``Training_01.txt`` -> train, ``Testing_01.txt`` -> val) and names each class folder after its
path with '/' -> '_' (``/a/abbey/x.jpg`` -> ``a_abbey``).
"""
from __future__ import annotations

from pathlib import Path

from .base import image_folder, link_or_copy, register_real
from .files import read_text, relative_name

LAYOUT = (
    "ROOT/sun397/train/<class>/*.jpg and ROOT/sun397/val/<class>/*.jpg (test set). The original host "
    "(vision.princeton.edu) no longer serves SUN397.tar.gz and Partitions.zip: get both from a mirror, extract the "
    "images to ROOT/SUN397/ and put Training_01.txt and Testing_01.txt in ROOT/SUN397/, then run "
    "`tvtool data prepare sun397` to arrange them"
)


def listing(split: str, root: Path):
    return image_folder("sun397", root, root / "sun397" / ("train" if split == "train" else "val"))[1]


def prepare(root: Path, echo) -> None:
    from ..errors import TVToolError

    src = root / "SUN397"
    parts = [src / "Training_01.txt", src / "Testing_01.txt"]
    if not all(p.is_file() for p in parts):
        raise TVToolError(f"sun397: cannot be downloaded automatically; manual steps: {LAYOUT}")
    for lst, out in zip(parts, ("train", "val")):
        names = read_text(lst, "a SUN397 partition file").split()
        for rel in names:  # "/a/abbey/sun_xxx.jpg"
            relative_name(rel.lstrip("/"), lst)
            cls = "_".join(rel.split("/")[1:-1])
            link_or_copy(src / rel.lstrip("/"), root / "sun397" / out / cls / rel.split("/")[-1])
        echo(f"sun397/{out}: {len(names)} images")


register_real("sun397", listing, epochs=14, layout_help=LAYOUT, prepare=prepare)
