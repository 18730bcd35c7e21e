"""The fast input path: every protocol split decoded once, preprocessed, and kept as a uint8 safetensors file.

``$TVTOOL_CACHE/datasets/<name>/<split>-<S>.safetensors`` (default ``~/.cache/tvtool``) holds ``images``
(uint8 [N, 3, S, S]) and ``labels`` (int64 [N]); its header metadata holds a key: a hash of everything that
determines the content (dataset, split, size, preprocessing version, the listed files with their sizes and
modification times and their labels, or the mini generator's source and settings). A file whose key differs, or that cannot be read, is rebuilt; files are written to
a temporary name and renamed, so a crash never leaves a half-written cache.

Preprocessing is the protocol's eval transform: Resize(short side S, bicubic) + CenterCrop(S), then RGB (the order
open_clip uses). Training augmentation (RandomResizedCrop(S, scale 0.9-1.0) + CLIP mean/std normalization) runs later
on the device in the training code, so the train crop is taken inside this cached center square, not the full image.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .. import defaults
from ..errors import TVToolError
from .base import DatasetSpec, Listing, protocol_val_split, resolve_data_root

log = logging.getLogger("tvtool.datasets")

# Bump when the decoded pixels would change (transform, interpolation, colour conversion): old caches get rebuilt.
PREPROCESS_VERSION = "resize-short-bicubic+centercrop+rgb/v1"
MAX_BAD_FRACTION = 0.01
_CHUNK = 64


def cache_root() -> Path:
    return defaults.cache_root() / "datasets"


def cache_path(name: str, split: str, image_size: int) -> Path:
    return cache_root() / name / f"{split}-{image_size}.safetensors"


def preprocess(img, image_size: int) -> np.ndarray:
    """PIL image -> uint8 [3, S, S]: the protocol's eval transform (torchvision's resize/crop arithmetic)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    img = TF.resize(img, image_size, interpolation=InterpolationMode.BICUBIC)
    img = TF.center_crop(img, image_size)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img).transpose(2, 0, 1)


def decode(listing: Listing, indices, image_size: int, *, what: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``listing[indices]`` in a thread pool (PIL releases the GIL while decoding and resizing).

    Unreadable examples are skipped together with their labels and counted; more than 1% bad is an error.
    """
    indices = torch.as_tensor(indices, dtype=torch.int64)
    n = len(indices)
    out = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    ok = np.ones(n, dtype=bool)
    bad: list[str] = []
    idx_list = indices.tolist()

    def work(start: int) -> None:
        for j in range(start, min(start + _CHUNK, n)):
            i = idx_list[j]
            try:
                with _opened(listing.open(i)) as img:
                    out[j] = preprocess(img, image_size)
            except Exception as exc:  # any decoder failure means "corrupt file": skip it, never mislabel it
                ok[j] = False
                bad.append(f"{listing.ids[i]} ({type(exc).__name__})")

    if n:
        log.info("decoding %d images of %s at %dpx", n, what or listing.source, image_size)
        workers = max(1, min(32, os.cpu_count() or 1, (n + _CHUNK - 1) // _CHUNK))
        with ThreadPoolExecutor(max_workers=workers) as pool, _progress(n, what or listing.source) as advance:
            futures = [pool.submit(work, start) for start in range(0, n, _CHUNK)]
            for start, fut in zip(range(0, n, _CHUNK), futures):
                fut.result()  # re-raises anything that is not a per-image decode failure
                advance(min(_CHUNK, n - start))
    labels = listing.labels[indices]
    if bad:
        msg = f"{what or listing.source}: skipped {len(bad)} of {n} unreadable images (e.g. {', '.join(sorted(bad)[:3])})"
        if len(bad) > MAX_BAD_FRACTION * n:
            raise TVToolError(f"{msg}; more than {MAX_BAD_FRACTION:.0%} are bad: re-download or re-extract the data")
        log.warning(msg)
        keep = torch.from_numpy(ok)
        return torch.from_numpy(out)[keep].contiguous(), labels[keep].contiguous()
    return torch.from_numpy(out), labels.contiguous()


@contextlib.contextmanager
def _progress(n: int, what: str):
    """A progress bar on an interactive stderr for long decodes (the first epoch of a real dataset)."""
    if n < 2000 or not sys.stderr.isatty():
        yield lambda k: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:  # stdout stays clean for --json
        task = bar.add_task(f"decoding {what}", total=n)
        yield lambda k: bar.advance(task, k)


class _opened:
    """Close PIL images (and their file handles) promptly; plain objects pass through."""

    def __init__(self, img):
        self.img = img

    def __enter__(self):
        return self.img

    def __exit__(self, *exc):
        close = getattr(self.img, "close", None)
        if close is not None:
            close()


def _hash(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.contiguous().numpy().tobytes())
        elif isinstance(p, (list, tuple)):
            h.update("\n".join(map(str, p)).encode())
        else:
            h.update(str(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:32]


def _source_hash(fn) -> str:
    """Hash of the module that defines ``fn``: a changed generator/loader invalidates its caches."""
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    try:
        src = inspect.getsource(module) if module is not None else repr(fn)
    except (OSError, TypeError):
        src = repr(fn)
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def cache_problem(images, labels, image_size: int, num_classes: int | None, max_n: int | None = None) -> str | None:
    """What is wrong with a split's tensors against what its key promises, or None: uint8 images [N, 3, S, S],
    int64 labels [N] in [0, num_classes), N <= max_n (decoding may skip unreadable files, never add any)."""
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        return "missing tensors"
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, image_size, image_size):
        return f"images are {images.dtype} {tuple(images.shape)}, expected uint8 [N, 3, {image_size}, {image_size}]"
    if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
        return f"labels are {labels.dtype} {tuple(labels.shape)} for {images.shape[0]} images, expected int64 [N]"
    if max_n is not None and images.shape[0] > max_n:
        return f"{images.shape[0]} examples where the split has {max_n}"
    if labels.numel() and (int(labels.min()) < 0 or (num_classes is not None and int(labels.max()) >= num_classes)):
        return f"labels span {int(labels.min())}..{int(labels.max())}, outside 0..{(num_classes or 1) - 1}"
    return None


def _num_classes(spec: DatasetSpec) -> int | None:
    from .base import templates_path

    return spec.num_classes if templates_path(spec.name).is_file() else None


def read_cache(path: Path, key: str, image_size: int | None = None, num_classes: int | None = None,
               max_n: int | None = None):
    """(images, labels) if ``path`` holds a readable cache with this key whose tensors are what the key promises
    (see :func:`cache_problem`; checked when ``image_size`` is given), else None: the caller rebuilds it."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                log.info("%s: stale cache (key changed), rebuilding", path)
                return None
            keys = set(f.keys())
            if keys != {"images", "labels"}:
                log.warning("%s: cache holds %s, not images and labels; rebuilding", path, sorted(keys))
                return None
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
    except Exception as exc:  # truncated or foreign file: rebuild rather than fail
        log.warning("%s: unreadable cache (%s), rebuilding", path, exc)
        return None
    if image_size is not None:
        problem = cache_problem(images, labels, image_size, num_classes, max_n)
        if problem is not None:  # right key, wrong content (edited or written by another tool): never trusted
            log.warning("%s: invalid cache (%s), rebuilding", path, problem)
            return None
    return images, labels


def _save(tensors: dict, path: Path, metadata: dict) -> None:
    """safetensors' save_file, its I/O errors (a full disk) raised as the OSError they are (the library wraps them
    in its own exception type), so ``atomic_path`` names the file and removes the temp."""
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata)
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None


def write_cache(path: Path, key: str, images: torch.Tensor, labels: torch.Tensor, **meta) -> None:
    """Write one split's cache atomically; a failure (a full disk) is one line naming the file and saying how to
    make room, and no temp is left."""
    from ..fileio import OutputError, atomic_path

    info = {"key": key, "preprocess": PREPROCESS_VERSION, **{k: str(v) for k, v in meta.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, force=True) as tmp:
            _save({"images": images.contiguous(), "labels": labels.to(torch.int64).contiguous()}, tmp, info)
    except OutputError as exc:
        raise OutputError(f"{exc}; free some space there or point TVTOOL_CACHE at another disk") from None
    except OSError as exc:  # the cache folder itself cannot be made
        raise OutputError(f"{path.parent}: cannot create the cache folder ({exc.strerror or exc}); point "
                          "TVTOOL_CACHE at a writable folder") from None


def load_cached(spec: DatasetSpec, split: str, data_root, image_size: int):
    """Protocol split of ``spec`` through the cache (see module docstring). Called by ``base.load_split``."""
    held_out = split in ("train", "val") and not spec.native_val
    native = "train" if held_out else split
    common = (spec.name, split, image_size, PREPROCESS_VERSION, spec.cache_extra)
    if spec.listing is not None:
        root = resolve_data_root(data_root, name=spec.name)
        listing = spec.listing(native, root)
        if held_out:
            train_idx, val_idx = protocol_val_split(len(listing))
            idx = train_idx if split == "train" else val_idx
        else:
            idx = torch.arange(len(listing))
        chosen = idx.tolist()
        ids = [listing.ids[i] for i in chosen]
        stamps = [listing.stamp(i) for i in chosen] if listing.stamp is not None else []
        if not chosen:
            raise TVToolError(f"{spec.name}: the {split} split ({listing.source or root}) has no examples; check the "
                              "data with `tvtool data check`")
        key = _hash(*common, listing.fingerprint, ids, stamps, listing.labels[idx])
        path = cache_path(spec.name, split, image_size)
        n_classes = _num_classes(spec)
        hit = read_cache(path, key, image_size, n_classes, len(chosen))
        if hit is not None:
            return hit
        images, labels = decode(listing, idx, image_size, what=f"{spec.name}/{split}")
        problem = cache_problem(images, labels, image_size, n_classes, len(chosen))
        if problem is not None:
            raise TVToolError(f"{spec.name}/{split}: {problem}; check the data with `tvtool data check`")
        write_cache(path, key, images, labels, dataset=spec.name, split=split, image_size=image_size, n=len(labels))
        return images, labels

    # Loader-only datasets (the mini-world): the loader's source and settings determine the content.
    root = resolve_data_root(data_root, name=spec.name) if spec.needs_data_root else data_root
    src = _source_hash(spec.loader)

    def key_of(s: str) -> str:
        return _hash(spec.name, s, image_size, PREPROCESS_VERSION, spec.cache_extra, src)

    path = cache_path(spec.name, split, image_size)
    n_classes = _num_classes(spec)
    hit = read_cache(path, key_of(split), image_size, n_classes)
    if hit is not None:
        return hit
    images, labels = spec.loader(native, root, image_size)
    images, labels = _check_loaded(spec, images, labels, image_size)
    problem = cache_problem(images, labels, image_size, n_classes)
    if problem is not None:
        raise TVToolError(f"{spec.name}/{native}: the loader returned {problem}")
    if not held_out:
        write_cache(path, key_of(split), images, labels, dataset=spec.name, split=split, image_size=image_size)
        return images, labels
    # The full training split was produced anyway: store both protocol parts.
    parts = dict(zip(("train", "val"), protocol_val_split(len(labels))))
    for s, idx in parts.items():
        write_cache(
            cache_path(spec.name, s, image_size), key_of(s), images[idx], labels[idx],
            dataset=spec.name, split=s, image_size=image_size,
        )
    idx = parts[split]
    return images[idx].contiguous(), labels[idx].contiguous()


def _check_loaded(spec, images, labels, image_size):
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or tuple(
        images.shape[1:]
    ) != (3, image_size, image_size):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{spec.name}: loader must return uint8 [N,3,{image_size},{image_size}], got {got}")
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{spec.name}: loader returned {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
    return images.contiguous(), labels.contiguous()
