"""The MNIST-family layout torchvision downloads: ``<Folder>/raw/<prefix>{train,t10k|test}-{images-idx3,labels-idx1}-ubyte``
(``.gz`` or the folder itself accepted too), read with :func:`read_idx`. Used by MNIST, Fashion-MNIST, KMNIST and
EMNIST.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import TVToolError
from ..fileio import open_input
from .base import array_listing, check_classes, check_labels, missing, torchvision_download
from .files import MAX_EXAMPLES, check_declared

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
              0x0E: np.dtype(">f8")}
_MAX_NDIM = 4  # images are [N, H, W], labels [N]; MNIST-like files never have more
_CHUNK = 1 << 22


def _damaged(path: Path, what: str, name: str = "") -> TVToolError:
    how = f"re-download it with `tvtool data prepare {name}`" if name else "re-download it"
    return TVToolError(f"{path}: {what}; {how}")


def read_idx(path: Path, name: str = "") -> np.ndarray:
    """An idx file (LeCun's format: 0, 0, type code, ndim, big-endian int32 dims, data) as a numpy array.

    The header is checked before anything is allocated: at most 4 dimensions, none negative, and a declared size
    the file can really hold (an uncompressed file exactly; a ``.gz`` within deflate's ratio). A ``.gz`` is
    inflated only as far as the header declares, and one with more data than that is refused."""
    gz = path.suffix == ".gz"
    with open_input(path, "an idx file") as raw:
        size = os.fstat(raw.fileno()).st_size
        f = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
        try:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_TYPES:
                raise _damaged(path, "not an idx file", name)
            ndim = head[3]
            if not 1 <= ndim <= _MAX_NDIM:
                raise _damaged(path, f"an idx header with {ndim} dimensions (MNIST-like files have 1 to "
                                     f"{_MAX_NDIM})", name)
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise _damaged(path, "truncated idx header", name)
            dims = struct.unpack(f">{ndim}i", dims_raw)
            if any(d < 0 for d in dims):
                raise _damaged(path, f"an idx header with negative dimensions {dims}", name)
            dtype = np.dtype(_IDX_TYPES[head[2]])
            numel = 1
            for d in dims:
                numel *= d  # Python ints: no overflow
            nbytes = numel * dtype.itemsize
            if dims[0] > MAX_EXAMPLES:
                raise _damaged(path, f"declares {dims[0]} examples (more than any dataset has)", name)
            if gz:  # inflating cannot produce more than deflate's best ratio allows
                check_declared(path, nbytes, f"shape {dims}", compressed=True, available=size)
            elif nbytes > size - 4 - 4 * ndim:
                raise _damaged(path, f"truncated idx file (its header declares shape {dims}, {nbytes} bytes; "
                                     f"{size - 4 - 4 * ndim} follow)", name)
            out = np.empty(nbytes, np.uint8)
            view = memoryview(out)
            got = 0
            while got < nbytes:
                n = f.readinto(view[got:got + _CHUNK])
                if not n:
                    break
                got += n
            if got < nbytes:
                raise _damaged(path, f"truncated idx file ({got // dtype.itemsize} values for shape {dims})", name)
            if f.read(1):
                raise _damaged(path, f"more data than its header declares (shape {dims})", name)
        except (OSError, EOFError, zlib.error) as exc:  # a damaged gzip stream
            raise _damaged(path, f"unreadable ({type(exc).__name__}: {str(exc)[:100]})", name) from None
        finally:
            if gz:
                f.close()
    return out.view(dtype).reshape(dims)


def find(name: str, root: Path, folder: str, stem: str) -> Path:
    for where in (root / folder / "raw", root / folder):
        for fname in (stem, stem + ".gz"):
            if os.path.lexists(where / fname):
                return where / fname
    raise missing(name, root / folder / "raw" / stem)


def idx_listing(name: str, root: Path, folder: str, images_stem: str, labels_stem: str, n_classes: int):
    img_path, lab_path = find(name, root, folder, images_stem), find(name, root, folder, labels_stem)
    images, labels = read_idx(img_path, name), read_idx(lab_path, name)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise _damaged(img_path, f"holds {images.dtype} values of shape {images.shape}, expected uint8 images "
                                 "[N, H, W]", name)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":  # torchvision reads only uint8 labels too
        raise _damaged(lab_path, f"holds {labels.dtype} labels of shape {labels.shape}, expected one label per "
                                 "image, whole numbers", name)
    if labels.size != images.shape[0]:
        raise _damaged(lab_path, f"{labels.size} labels for {images.shape[0]} images in {img_path.name}", name)
    check_labels(labels, n_classes, lab_path)
    check_classes(name, n_classes, lab_path)
    return array_listing(images, labels.astype(np.int64), img_path.name, [img_path, lab_path], source=str(img_path))


def mnist_like_listing(name: str, folder: str, n_classes: int):
    """listing(split, root) for torchvision's MNIST-style classes (train-* / t10k-* file names)."""

    def listing(split: str, root: Path):
        prefix = "train" if split == "train" else "t10k"
        return idx_listing(name, root, folder, f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte", n_classes)

    return listing


def torchvision_prepare(name: str, make, layout: str):
    """prepare(root, echo): run ``make(root, train)`` (a torchvision dataset with download=True) for both splits."""

    def prepare(root: Path, echo) -> None:
        for train in (True, False):
            torchvision_download(name, lambda: make(str(root), train), layout)
        echo(f"{name}: downloaded")

    return prepare
