"""The CIFAR python pickles torchvision downloads (``cifar-10-batches-py/``, ``cifar-100-python/``): each file is a
pickled dict with ``data`` (uint8 [N, 3072], channel-major 32x32) and ``labels`` / ``fine_labels``.

They are read with the numpy-only restricted unpickler (``tvtool.formats.numpy_pickle.load_numpy``): plain
containers and number arrays, nothing else, and no option turns that off, so a crafted batch file cannot run code.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import TVToolError
from .base import array_listing, check_classes, check_labels, require

_PIXELS = 3 * 32 * 32


def read_batches(name: str, files: list[Path], label_key: str, n_classes: int):
    from ..formats.numpy_pickle import load_numpy

    images, labels = [], []
    for path in files:
        require(name, path)
        entry = load_numpy(path)
        how = f"re-download it with `tvtool data prepare {name}`"
        if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
            raise TVToolError(f"{path}: not a CIFAR batch (a mapping with 'data' and '{label_key}'); {how}")
        data, batch_labels = entry["data"], entry[label_key]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
            shape = data.shape if isinstance(data, np.ndarray) else type(data).__name__
            raise TVToolError(f"{path}: 'data' is {shape}, expected uint8 [N, {_PIXELS}] (32x32 RGB); {how}")
        if not isinstance(batch_labels, list) or not all(type(v) is int for v in batch_labels):
            raise TVToolError(f"{path}: '{label_key}' are not whole numbers; {how}")
        if len(batch_labels) != data.shape[0]:
            raise TVToolError(f"{path}: {len(batch_labels)} labels for {data.shape[0]} images; {how}")
        check_labels(batch_labels, n_classes, path)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.extend(batch_labels)
    data = np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1))  # -> [N, 32, 32, 3]
    return data, np.asarray(labels, dtype=np.int64)


def cifar_listing(name: str, files: list[Path], label_key: str, n_classes: int):
    images, labels = read_batches(name, files, label_key, n_classes)
    check_classes(name, n_classes, files[0].parent)
    return array_listing(images, labels, files[0].parent.name, files, source=str(files[0].parent))
