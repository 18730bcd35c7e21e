"""PatchCamelyon, torchvision's layout: ``pcam/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5`` (``x``:
uint8 [N, 96, 96, 3], ``y``: [N, 1, 1, 1] with 1 = metastatic tissue).

Ships its own validation split (262,144 train, 32,768 valid, 32,768 test), used as Val (``native_val``); TALL masks
instead validates on 10% of train capped at 5,000. Reading needs h5py, an optional dependency (not installed with
tvtool). Epochs: 1 (TALL masks ``finetune.py``; 2,048 steps of 128).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from .._lazy import lazy_module
from ..errors import TVToolError
from ..fileio import check_input
from .base import Listing, check_classes, check_labels, register_real, require, torchvision_download
from .files import MAX_EXAMPLES, check_declared

torch = lazy_module("torch")  # listing the registry must not import torch

LAYOUT = (
    "ROOT/pcam/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5; `tvtool data prepare pcam` downloads them "
    "via torchvision (7.5 GB; needs h5py)"
)
FILE_SPLITS = {"train": "train", "val": "valid", "test": "test"}


def _h5py():
    try:
        import h5py
    except ImportError:
        raise TVToolError("pcam: reading PCAM's .h5 files needs h5py; install it with `pip install h5py`") from None
    return h5py


SIDE = 96


def _dataset(h5py, f, key: str, path: Path):
    """``f[key]`` if it is an array (an h5 group or a missing key is one line)."""
    obj = f.get(key)
    if not isinstance(obj, h5py.Dataset):
        what = "missing" if obj is None else f"not an array ({type(obj).__name__})"
        raise TVToolError(f"{path}: '{key}' is {what}; re-download PCAM with `tvtool data prepare pcam`")
    return obj


def _check_storage(ds, path: Path, what: str) -> None:
    """The bytes an h5 array declares must be plausibly stored: at most deflate's ratio over what the file has
    allocated for it (a dataset declared with billions of entries and no data is refused before reading)."""
    declared = ds.size * ds.dtype.itemsize
    stored = ds.id.get_storage_size()
    if ds.shape and ds.shape[0] > MAX_EXAMPLES:
        raise TVToolError(f"{path}: declares {ds.shape[0]} {what} (more than any dataset has); re-download PCAM")
    check_declared(path, declared, f"{what} of shape {ds.shape}", compressed=True, available=stored)


def listing(split: str, root: Path):
    stem = root / "pcam" / f"camelyonpatch_level_2_split_{FILE_SPLITS[split]}"
    x_path, y_path = require("pcam", Path(f"{stem}_x.h5")), require("pcam", Path(f"{stem}_y.h5"))
    for p in (x_path, y_path):
        check_input(p, "a PCAM .h5 file")  # before h5py opens it: a FIFO must not block
    h5py = _h5py()  # after the files: a missing download is the more useful message
    try:
        with h5py.File(y_path, "r") as f:
            ys = _dataset(h5py, f, "y", y_path)
            if ys.dtype.kind not in "iub":
                raise TVToolError(f"{y_path}: labels are {ys.dtype}, not whole numbers; re-download PCAM")
            _check_storage(ys, y_path, "labels")
            labels = np.asarray(ys).reshape(-1)
        with h5py.File(x_path, "r") as f:
            xs = _dataset(h5py, f, "x", x_path)
            shape, dtype = xs.shape, xs.dtype
    except TVToolError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:  # h5py's errors on a damaged file
        raise TVToolError(f"{stem}_{{x,y}}.h5: unreadable ({type(exc).__name__}: {str(exc)[:120]}); re-download "
                          "with `tvtool data prepare pcam`") from None
    if dtype != np.uint8 or len(shape) != 4 or tuple(shape[1:]) != (SIDE, SIDE, 3):
        raise TVToolError(f"{x_path}: images are {dtype} {tuple(shape)}, expected uint8 [N, {SIDE}, {SIDE}, 3] "
                          f"({SIDE}x{SIDE} RGB); re-download PCAM")
    if labels.size != shape[0]:
        raise TVToolError(f"{y_path}: {labels.size} labels for {shape[0]} images in {x_path.name}; re-download PCAM")
    labels = check_labels(labels, 2, y_path)
    check_classes("pcam", 2, y_path)
    handle: dict = {}
    lock = threading.Lock()

    def open_image(i: int):
        from PIL import Image

        with lock:  # one open file shared by the decoding threads; h5py serialises reads anyway
            if "x" not in handle:
                handle["x"] = h5py.File(x_path, "r")["x"]
            pixels = np.asarray(handle["x"][i])
        return Image.fromarray(pixels)

    fp = ";".join(f"{p.name}:{os.stat(p).st_size}:{os.stat(p).st_mtime_ns}" for p in (x_path, y_path))
    ids = [f"{x_path.name}#{i}" for i in range(labels.size)]
    return Listing(ids, torch.from_numpy(labels), open_image, source=str(x_path), fingerprint=fp)


def prepare(root: Path, echo) -> None:
    import torchvision

    _h5py()  # torchvision's PCAM needs it too: say so before a 7.5 GB download
    for split in ("train", "val", "test"):
        torchvision_download("pcam", lambda: torchvision.datasets.PCAM(str(root), split=split, download=True), LAYOUT)
    echo("pcam: downloaded")


register_real("pcam", listing, epochs=1, native_val=True, layout_help=LAYOUT, prepare=prepare)
