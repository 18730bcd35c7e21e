"""MNIST from torchvision's raw idx files: ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (``.gz`` and
files directly in ``MNIST/`` are accepted too). Labels are the digits 0-9, the order of ``templates/mnist.yaml``.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ..errors import TVToolError
from .base import array_listing, check_classes, missing, register_real, torchvision_download

LAYOUT = "ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte; `tvtool data prepare mnist` downloads them via torchvision"
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (LeCun's format: 0, 0, type code, ndim, big-endian int32 dims, data) as a numpy array."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise TVToolError(f"{path}: not an idx file; re-download it with `tvtool data prepare mnist`")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4).astype(np.int64)
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise TVToolError(f"{path}: truncated idx file ({data.size} values for shape {tuple(dims)}); re-download it")
    return data.reshape(tuple(dims))


def _find(root: Path, stem: str) -> Path:
    for folder in (root / "MNIST" / "raw", root / "MNIST"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise missing("mnist", root / "MNIST" / "raw" / stem)


def listing(split: str, root: Path):
    prefix = "train" if split == "train" else "t10k"
    img_path, lab_path = _find(root, f"{prefix}-images-idx3-ubyte"), _find(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise TVToolError(f"{img_path}: {images.shape} images do not match {labels.shape} labels; re-download MNIST")
    check_classes("mnist", 10, lab_path)
    return array_listing(images, labels.astype(np.int64), img_path.name, [img_path, lab_path], source=str(img_path))


def prepare(root: Path, echo) -> None:
    import torchvision

    for train in (True, False):
        torchvision_download("mnist", lambda: torchvision.datasets.MNIST(str(root), train=train, download=True), LAYOUT)
    echo("MNIST: downloaded")


register_real("mnist", listing, epochs=5, layout_help=LAYOUT, prepare=prepare)
