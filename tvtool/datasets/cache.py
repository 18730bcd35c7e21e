"""Every protocol split decoded once, preprocessed, and kept as a uint8 cache file read by rows (``cachefile.py``).

``$TVTOOL_CACHE/datasets/<name>/<split>-<S>.safetensors`` (default ``~/.cache/tvtool``) holds ``images``
(uint8 [N, 3, S, S]) and ``labels`` (int64 [N]) of one protocol split; its header metadata holds a key: a hash of
everything that determines the content (dataset, split, size, preprocessing version, the listed files with their
sizes and modification times and their labels, or the mini generator's source and settings). A file whose key
differs, or whose content does not match its header, is rebuilt. Train and Val are carved from one listing of the
training split, so every image is decoded exactly once whichever splits a command asks for, and a command that
needs only Val (evaluation) decodes only Val.

Decoding runs in worker processes (one per CPU, ``TVTOOL_DECODE_WORKERS`` to change; PIL's decoders hold the GIL
for part of each image, so threads stop scaling at a few cores), each writing its chunk of rows straight into the
file being built; nothing holds the split in memory, a killed build resumes where it stopped, and a progress bar
(or, in a batch job, a line every 30 s) shows long builds.

Preprocessing is the protocol's eval transform: Resize(short side S, bicubic) + CenterCrop(S), then RGB (the order
open_clip uses). Training augmentation (RandomResizedCrop(S, scale 0.9-1.0) + CLIP mean/std normalization) runs later
on the device in the training code, so the train crop is taken inside this cached center square, not the full image.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import inspect
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .. import defaults
from ..errors import TVToolError
from ..fileio import OutputError
from .base import DatasetSpec, Listing, protocol_val_split, resolve_data_root, templates_path
from .cachefile import (CHUNK, CacheBuild, ImageSplit, build_lock, cache_problem, human, write_cache,  # noqa: F401
                        write_rows)
from .sources import protocol_listing

log = logging.getLogger("tvtool.datasets")

# Bump when the decoded pixels would change (transform, interpolation, colour conversion): old caches get rebuilt.
PREPROCESS_VERSION = "resize-short-bicubic+centercrop+rgb/v1"
MAX_BAD_FRACTION = 0.01
PROGRESS_MIN = 2000  # builds this large show progress
PLAIN_PROGRESS_S = 30.0


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


# ------------------------------------------------------------------------------------------------ decoding
# What the workers decode: set before the pool forks, so they inherit it (listings hold closures, not picklable);
# one build at a time per process owns it.
_JOB: dict = {}
_FDS: dict = {}
_JOB_LOCK = threading.Lock()


def decode_workers() -> int:
    """Processes used to decode: ``TVTOOL_DECODE_WORKERS`` if set, else one per CPU this process may use."""
    env = os.environ.get("TVTOOL_DECODE_WORKERS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise TVToolError(f"TVTOOL_DECODE_WORKERS={env!r}: use a whole number of processes") from None
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _decode_chunk(start: int) -> list[tuple[int, str]]:
    """Decode rows [start, start + CHUNK) of the job into its cache file; returns the rows that failed, and why."""
    job = _JOB
    listing, rows, size = job["listing"], job["rows"], job["size"]
    stop = min(start + CHUNK, len(rows))
    out = np.zeros((stop - start, 3, size, size), dtype=np.uint8)
    bad = []
    for j in range(start, stop):
        i = rows[j]
        try:
            with _opened(listing.open(i)) as img:
                out[j - start] = preprocess(img, size)
        except Exception as exc:  # any decoder failure means "corrupt file": skip it, never mislabel it
            bad.append((j, f"{listing.ids[i]} ({type(exc).__name__})"))
    key = (os.getpid(), job["path"])
    if key not in _FDS:
        _FDS[key] = os.open(job["path"], os.O_WRONLY)
    write_rows(_FDS[key], job["data_start"], job["row_bytes"], start, out)
    return bad


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    try:  # die with the parent (a killed build must not leave decoders running)
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def build(listing: Listing, rows, path: Path, key: str, image_size: int, *, what: str, meta: dict) -> None:
    """Decode ``listing[rows]`` into the cache file at ``path`` (resuming a partial build of the same key)."""
    with _JOB_LOCK:
        _build(listing, rows, path, key, image_size, what=what, meta=meta)


def _build(listing: Listing, rows, path: Path, key: str, image_size: int, *, what: str, meta: dict) -> None:
    rows = torch.as_tensor(rows, dtype=torch.int64).tolist()
    n = len(rows)
    if n:
        from ..environment import require_torchvision

        require_torchvision()  # a broken torch/torchvision pair would otherwise read as n unreadable images
    b = CacheBuild(path, key, n, image_size, meta)
    done = b.begin()
    pending = b.pending()
    workers = min(decode_workers(), len(pending))
    forking = workers > 1 and "fork" in multiprocessing.get_all_start_methods()
    log.info("decoding %d images of %s at %dpx with %d processes%s", n - done, what, image_size, max(workers, 1),
             f" (resuming: {done} done)" if done else "")
    _JOB.update(listing=listing, rows=rows, size=image_size, path=str(b.partial), data_start=b.data_start,
                row_bytes=b.row_bytes)
    try:
        with _progress(n, done, what) as advance:
            if not forking:
                for start in pending:
                    b.mark(start, _decode_chunk(start))
                    advance(min(CHUNK, n - start))
            else:
                pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                              initializer=_worker_init)
                try:
                    futures = {pool.submit(_decode_chunk, s): s for s in pending}
                    for fut in cf.as_completed(futures):
                        start = futures[fut]
                        b.mark(start, fut.result())  # re-raises anything that is not a per-image decode failure
                        advance(min(CHUNK, n - start))
                finally:
                    pool.shutdown(wait=True, cancel_futures=True)
    except OutputError:  # already one line, the partial file removed
        raise
    except OSError as exc:
        b.fail(exc)
    except cf.process.BrokenProcessPool:
        b.close()
        raise TVToolError(f"{what}: a decoding process died (out of memory?); run again to resume the build, with "
                          "fewer processes if needed (TVTOOL_DECODE_WORKERS=N)") from None
    except BaseException:
        b.close()  # interrupted: what is logged stays for the next run to resume
        raise
    finally:
        _JOB.clear()
        for key_fd in [k for k in _FDS if k[0] == os.getpid()]:
            os.close(_FDS.pop(key_fd))
    if b.bad:
        bad = sorted(b.bad.values())
        msg = f"{what}: skipped {len(bad)} of {n} unreadable images (e.g. {', '.join(bad[:3])})"
        if len(bad) > MAX_BAD_FRACTION * n:
            b.discard()
            raise TVToolError(f"{msg}; more than {MAX_BAD_FRACTION:.0%} are bad: re-download or re-extract the data")
        log.warning(msg)
    b.finish(listing.labels[torch.as_tensor(rows, dtype=torch.int64)].numpy())


@contextlib.contextmanager
def _progress(n: int, done: int, what: str):
    """A progress bar on an interactive stderr for long decodes, a plain line every 30 s in a batch job's log."""
    if n < PROGRESS_MIN:
        yield lambda k: None
        return
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True), transient=True) as bar:  # stdout stays clean for --json
            task = bar.add_task(f"decoding {what}", total=n, completed=done)
            yield lambda k: bar.advance(task, k)
        return
    state = {"done": done, "t0": time.monotonic(), "last": time.monotonic(), "start": done}

    def advance(k: int) -> None:
        state["done"] += k
        now = time.monotonic()
        if now - state["last"] >= PLAIN_PROGRESS_S or state["done"] == n:
            rate = (state["done"] - state["start"]) / max(now - state["t0"], 1e-9)
            eta = (n - state["done"]) / rate if rate > 0 else 0
            print(f"tvtool: decoding {what}: {state['done']}/{n} images, {rate:.0f} img/s, "
                  f"{time.strftime('%H:%M:%S', time.gmtime(eta))} left", file=sys.stderr, flush=True)
            state["last"] = now

    yield advance


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


# ------------------------------------------------------------------------------------------------ the cache
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


def _num_classes(spec: DatasetSpec) -> int | None:
    return spec.num_classes if templates_path(spec.name).is_file() else None


def open_cached(spec: DatasetSpec, split: str, data_root, image_size: int) -> ImageSplit:
    """Protocol split of ``spec`` through the cache (see module docstring), built first if needed."""
    if spec.listing is None:
        return _open_generated(spec, split, data_root, image_size)
    listing, idx = protocol_listing(spec, split, data_root)
    if len(idx) == 0:
        raise TVToolError(f"{spec.name}: the {split} split ({listing.source or data_root}) has no examples; check "
                          "the data with `tvtool data check`")
    chosen = idx.tolist()
    ids = [listing.ids[i] for i in chosen]
    stamps = [listing.stamp(i) for i in chosen] if listing.stamp is not None else []
    key = _hash(spec.name, split, image_size, PREPROCESS_VERSION, spec.cache_extra, listing.fingerprint, ids, stamps,
                listing.labels[idx])
    path = cache_path(spec.name, split, image_size)
    n_classes = _num_classes(spec)
    hit = ImageSplit.open(path, key, image_size, n_classes, len(chosen))
    if hit is not None:
        return hit
    with build_lock(path):
        hit = ImageSplit.open(path, key, image_size, n_classes, len(chosen))  # built while we waited?
        if hit is None:
            build(listing, idx, path, key, image_size, what=f"{spec.name}/{split}",
                  meta={"dataset": spec.name, "split": split, "source": listing.source,
                        "preprocess": PREPROCESS_VERSION})
            hit = ImageSplit.open(path, key, image_size, n_classes, len(chosen))
    if hit is None:
        raise TVToolError(f"{path}: the cache just written does not read back; delete it and check the disk")
    return hit


def _open_generated(spec: DatasetSpec, split: str, data_root, image_size: int) -> ImageSplit:
    """Loader-only datasets (the mini-world): the loader's source and settings determine the content."""
    held_out = split in ("train", "val") and not spec.native_val
    native = "train" if held_out else split
    root = resolve_data_root(data_root, name=spec.name) if spec.needs_data_root else data_root
    src = _source_hash(spec.loader)
    n_classes = _num_classes(spec)

    def key_of(s: str) -> str:
        return _hash(spec.name, s, image_size, PREPROCESS_VERSION, spec.cache_extra, src)

    path = cache_path(spec.name, split, image_size)
    hit = ImageSplit.open(path, key_of(split), image_size, n_classes)
    if hit is not None:
        return hit
    with build_lock(path):
        hit = ImageSplit.open(path, key_of(split), image_size, n_classes)
        if hit is not None:
            return hit
        images, labels = spec.loader(native, root, image_size)
        images, labels = _check_loaded(spec, images, labels, image_size)
        problem = cache_problem(images, labels, image_size, n_classes)
        if problem is not None:
            raise TVToolError(f"{spec.name}/{native}: the loader returned {problem}")
        if labels.numel() == 0:
            raise TVToolError(f"{spec.name}: the {split} split is empty")
        # The full training split was produced anyway: store both protocol parts.
        parts = dict(zip(("train", "val"), protocol_val_split(len(labels)))) if held_out else {split: None}
        for s, idx in parts.items():
            x, y = (images, labels) if idx is None else (images[idx], labels[idx])
            if len(y):
                write_cache(cache_path(spec.name, s, image_size), key_of(s), x, y, dataset=spec.name, split=s,
                            preprocess=PREPROCESS_VERSION)
    hit = ImageSplit.open(path, key_of(split), image_size, n_classes)
    if hit is None:
        raise TVToolError(f"{spec.name}: the {split} split is empty")
    return hit


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
