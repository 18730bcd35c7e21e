"""The entry point everybody loads images through: a protocol split of a registered dataset, decoded once and
cached (``cache.py``), as an :class:`~tvtool.datasets.cachefile.ImageSplit` read by batches (:func:`open_split`) or
whole as tensors (:func:`load_split`, for small splits and tests)."""
from __future__ import annotations

from ..errors import TVToolError
from .base import SPLITS, get_dataset
from .cache import open_cached
from .cachefile import ImageSplit
from .sources import check_available  # noqa: F401  (part of this layer's API)

__all__ = ["ImageSplit", "check_available", "load_split", "open_split"]


def open_split(name: str, split: str, data_root=None, image_size: int = 224) -> ImageSplit:
    """A protocol split, its images read from the cache file by rows (host memory does not grow with its size)."""
    spec = get_dataset(name)
    if split not in SPLITS:
        raise TVToolError(f"{name}: unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise TVToolError(f"image size must be a positive integer, got {image_size!r}")
    data = open_cached(spec, split, data_root, image_size)
    if len(data) == 0:  # training on nothing writes an all-zero vector; evaluating on nothing divides by 0
        raise TVToolError(f"{name}: the {split} split is empty; check the data with `tvtool data check`")
    return data


def load_split(name: str, split: str, data_root=None, image_size: int = 224):
    """A protocol split as ``(uint8 Tensor[N,3,S,S], int64 Tensor[N])`` in host memory."""
    data = open_split(name, split, data_root, image_size)
    return data.tensor(), data.labels.clone()
