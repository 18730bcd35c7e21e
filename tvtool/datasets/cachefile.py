"""The image-cache file: one split's uint8 images and int64 labels, built in place in chunks and read by rows.

A finished cache is a plain safetensors file (any safetensors reader loads it; docs/FORMAT.md "The image cache"):

    [u64 header length H][JSON header, padded with spaces to H bytes][images uint8 [N,3,S,S]][labels int64 [N]]

It is built as ``<name>.partial``: the header space is reserved up front (its length depends only on the split's
size), rows are written where they belong as they are decoded, and a log beside it (``<name>.partial.log``)
records each finished chunk, so a build that is killed continues where it stopped. Examples that could not be
decoded leave a hole that :meth:`CacheBuild.finish` closes by moving the later rows down; it then writes the labels
and the header and renames the file into place. The space of the whole file is reserved before the first image is
decoded (refused at once when the disk is too small); a write that fails anyway (a full disk, a file-size limit)
removes the partial file and says so in one line, and never touches a finished cache.

Reading (:class:`ImageSplit`): the file is opened and validated as a safetensors file (memory-mapped for that), then
batches are read by row with ``pread`` straight into their destination buffers, so resident memory stays at the
batches in flight whatever the split's size (the OS page cache keeps what fits). The header, the labels and a
strided sample of the pixels are checked on every open; a file that is truncated, edited or written by anything
else is reported as invalid and rebuilt by the caller.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import struct
import time
import weakref
from pathlib import Path

import numpy as np
import torch

from ..safetensors_io import SafetensorsFile
from ..errors import TVToolError
from ..fileio import OutputError

log = logging.getLogger("tvtool.datasets")

FORMAT = "tvtool.image-cache"
FORMAT_VERSION = "2"
CHUNK = 64  # rows decoded, written and logged together
SAMPLES = 256  # pixel windows checked on every open (random reads: cheap on SSD and HDD alike)
SAMPLE_BYTES = 64
LOG_EVERY_S = 1.0  # how often finished chunks are made durable (data fdatasync'ed, then logged)
DISK_MARGIN = 64 << 20  # free space kept beyond the file's own size


def human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def _disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


# ------------------------------------------------------------------------------------------------ header and digests
def _header(n: int, image_size: int, meta: dict[str, str]) -> bytes:
    row = 3 * image_size * image_size
    head = {
        "__metadata__": meta,
        "images": {"dtype": "U8", "shape": [n, 3, image_size, image_size], "data_offsets": [0, n * row]},
        "labels": {"dtype": "I64", "shape": [n], "data_offsets": [n * row, n * row + 8 * n]},
    }
    return json.dumps(head, separators=(",", ":")).encode()


def _sample_offsets(nbytes: int) -> list[int]:
    """Start offsets of the pixel windows hashed on open: SAMPLES evenly strided windows (all bytes if fewer)."""
    if nbytes <= SAMPLES * SAMPLE_BYTES:
        return list(range(0, nbytes, SAMPLE_BYTES))
    last = nbytes - SAMPLE_BYTES
    return [k * last // (SAMPLES - 1) for k in range(SAMPLES)]


def _content_digest(read, images_nbytes: int, labels: np.ndarray) -> str:
    """SHA-256 over the labels and a strided sample of the image bytes; ``read(offset, size)`` reads the images."""
    h = hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    for off in _sample_offsets(images_nbytes):
        h.update(read(off, min(SAMPLE_BYTES, images_nbytes - off)))
    return h.hexdigest()


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        got = os.pread(fd, size - len(out), offset + len(out))
        if not got:
            raise OSError(errno.EIO, "unexpected end of file")
        out += got
    return bytes(out)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


# ------------------------------------------------------------------------------------------------ writing
class CacheBuild:
    """A cache file under construction (see the module docstring): create or resume, write rows, finish.

    ``meta`` (strings) is stored in the header together with the ``key`` that says what the file holds; a partial
    file whose log names another key, size or format is discarded and started again.
    """

    def __init__(self, path: Path, key: str, n: int, image_size: int, meta: dict | None = None):
        if n < 1:
            raise ValueError("a cache holds at least one example")
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.log_path = self.path.with_name(self.path.name + ".partial.log")
        self.key, self.n, self.image_size = key, int(n), int(image_size)
        self.row_bytes = 3 * self.image_size * self.image_size
        self.meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "key": key, "image_size": str(image_size),
                     **{k: str(v) for k, v in (meta or {}).items()}}
        # The finished header (N' <= n rows, a 64-hex digest) is never longer than this one: the space is reserved.
        widest = _header(self.n, self.image_size, {**self.meta, "n": str(self.n), "skipped": str(self.n),
                                                   "content_sha256": "0" * 64})
        self.reserve = (len(widest) + 64 + 7) // 8 * 8
        self.data_start = 8 + self.reserve
        self.done: set[int] = set()  # chunk starts whose rows are written and durable
        self.bad: dict[int, str] = {}  # row -> why it could not be decoded
        self._fd: int | None = None
        self._log = None
        self._pending_log: list[str] = []
        self._last_flush = 0.0

    @property
    def size(self) -> int:
        return self.data_start + self.n * self.row_bytes + 8 * self.n

    def _log_head(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "key": self.key, "n": self.n,
                "image_size": self.image_size, "chunk": CHUNK, "reserve": self.reserve}

    def begin(self, *, resume: bool = True) -> int:
        """Open the partial file, resuming a matching one; returns the number of rows already decoded.

        A fresh build first checks the free disk space against the whole file and reserves it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.path.parent}: cannot create the cache folder ({exc.strerror or exc}); set "
                              "TVTOOL_CACHE to a writable folder") from None
        if resume and self._resume():
            return sum(min(CHUNK, self.n - s) for s in self.done)
        self.discard()
        free = shutil.disk_usage(self.path.parent).free
        if free < self.size + DISK_MARGIN:
            raise TVToolError(f"{self.path}: this split's image cache needs {human(self.size)} but only {human(free)} "
                              "is free there; free some space or set TVTOOL_CACHE to a folder on a larger disk")
        try:
            self._fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.posix_fallocate(self._fd, 0, self.size)  # the space is ours before any decoding
            except AttributeError:  # no posix_fallocate (macOS): sparse, checked above
                os.ftruncate(self._fd, self.size)
            except OSError as exc:
                if _disk_full(exc):
                    raise
                os.ftruncate(self._fd, self.size)  # a filesystem without fallocate: sparse, checked above
            self._log = open(self.log_path, "w", encoding="utf-8")
            self._log.write(json.dumps(self._log_head()) + "\n")
            self._log.flush()
        except OSError as exc:
            self.fail(exc)
        return 0

    def _resume(self) -> bool:
        if not (self.partial.is_file() and self.log_path.is_file()):
            return False
        try:
            with open(self.log_path, encoding="utf-8") as f:
                lines = f.read().split("\n")
            if json.loads(lines[0]) != self._log_head() or os.path.getsize(self.partial) != self.size:
                return False
            for line in lines[1:-1]:  # the last piece has no newline: written by a killed process, ignored
                rec = json.loads(line)
                start = int(rec["done"])
                if start % CHUNK or not 0 <= start < self.n:
                    return False
                self.done.add(start)
                self.bad.update({int(r): str(why) for r, why in rec.get("bad", [])})
            self._fd = os.open(self.partial, os.O_RDWR)
            self._log = open(self.log_path, "a", encoding="utf-8")
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            self.done.clear()
            self.bad.clear()
            return False
        if lines[-1]:  # cut off the torn last line so new records start on their own line
            self._log.write("\n")
        return True

    def pending(self) -> list[int]:
        """Starts of the chunks still to decode (row ranges [start, min(start + CHUNK, n)))."""
        return [s for s in range(0, self.n, CHUNK) if s not in self.done]

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write decoded rows (uint8 [k, 3, S, S]) at row ``start``."""
        write_rows(self._fd, self.data_start, self.row_bytes, start, rows)

    def mark(self, start: int, bad: list[tuple[int, str]] = (), *, flush: bool = False) -> None:
        """Record that the chunk at ``start`` is written (``bad`` rows: could not be decoded). Records reach the log
        in batches, each after the data it describes is on disk, so the log never claims rows a crash lost."""
        self.done.add(start)
        self.bad.update({int(r): why for r, why in bad})
        self._pending_log.append(json.dumps({"done": start, "bad": [[int(r), why] for r, why in bad]}))
        now = time.monotonic()
        if flush or now - self._last_flush >= LOG_EVERY_S:
            self._flush_log()
            self._last_flush = now

    def _flush_log(self) -> None:
        if not self._pending_log:
            return
        try:
            getattr(os, "fdatasync", os.fsync)(self._fd)
            self._log.write("".join(line + "\n" for line in self._pending_log))
            self._log.flush()
        except OSError as exc:
            self.fail(exc)
        self._pending_log.clear()

    def finish(self, labels) -> np.ndarray:
        """Close the holes of undecodable rows, write labels and header, publish the file; returns the kept mask."""
        labels = np.asarray(labels, dtype=np.int64)
        assert labels.shape == (self.n,) and not self.pending(), "finish() needs every chunk written"
        self._flush_log()
        keep = np.ones(self.n, dtype=bool)
        keep[list(self.bad)] = False
        m = int(keep.sum())
        fd, rb, d0 = self._fd, self.row_bytes, self.data_start
        try:
            if self.bad:
                # Rows are about to move: the log no longer describes the file, so a crash from here on restarts
                # the build instead of resuming into shifted rows.
                self._close_log()
                self.log_path.unlink()
                # move every kept row after the first hole down, in runs of up to CHUNK rows
                dst = min(self.bad)
                src = dst
                while src < self.n:
                    if not keep[src]:
                        src += 1
                        continue
                    run = 1
                    while src + run < self.n and keep[src + run] and run < CHUNK:
                        run += 1
                    _pwrite_all(fd, _pread_exact(fd, run * rb, d0 + src * rb), d0 + dst * rb)
                    src, dst = src + run, dst + run
            kept = labels[keep]
            _pwrite_all(fd, kept.astype("<i8").tobytes(), d0 + m * rb)
            os.ftruncate(fd, d0 + m * rb + 8 * m)
            digest = _content_digest(lambda off, k: _pread_exact(fd, k, d0 + off), m * rb, kept)
            meta = {**self.meta, "n": str(m), "skipped": str(self.n - m), "content_sha256": digest}
            head = _header(m, self.image_size, meta)
            _pwrite_all(fd, struct.pack("<Q", self.reserve) + head.ljust(self.reserve, b" "), 0)
            os.fsync(fd)
        except OSError as exc:
            self.fail(exc)
        os.close(fd)
        self._fd = None
        os.replace(self.partial, self.path)
        with contextlib.suppress(OSError):  # the rename is durable once the folder is
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self._close_log()
        with contextlib.suppress(FileNotFoundError):
            self.log_path.unlink()
        return keep

    def fail(self, exc: OSError):
        """Raise an OSError of the build (a full disk, a file-size limit, no permission) as one line naming the file;
        the partial file is removed first: nothing half-written is kept."""
        self.discard()
        why = exc.strerror or str(exc)
        if _disk_full(exc):
            try:
                free = f", {human(shutil.disk_usage(self.path.parent).free)} free now"
            except OSError:
                free = ""
            raise OutputError(f"{self.path}: cannot write the image cache ({why}; {human(self.size)} needed{free}); "
                              "the partial file was removed. Free some space or set TVTOOL_CACHE to a folder on a "
                              "larger disk") from None
        raise OutputError(f"{self.path}: cannot write the image cache ({why}); set TVTOOL_CACHE to a writable "
                          "folder") from None

    def close(self) -> None:
        """Stop without finishing (interrupted): what is logged stays for the next run to resume."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self._flush_log()
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None

    def discard(self) -> None:
        """Remove the partial file and its log."""
        self._pending_log.clear()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self._close_log()
        for p in (self.partial, self.log_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self.done.clear()
        self.bad.clear()


def write_rows(fd: int, data_start: int, row_bytes: int, start: int, rows: np.ndarray) -> None:
    """Write uint8 rows at row ``start`` of an open cache file (used by the decoding workers too)."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    if rows.size:
        _pwrite_all(fd, rows.reshape(-1), data_start + start * row_bytes)


@contextlib.contextmanager
def build_lock(path: Path):
    """One builder per cache file across processes (torchrun ranks, parallel jobs): the others wait, then read
    what it wrote."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): builds may race; each publishes a complete file by rename
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: another process is building this cache; waiting for it", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_cache(path: Path, key: str, images: torch.Tensor, labels: torch.Tensor, **meta) -> None:
    """Write in-memory tensors (uint8 [N,3,S,S], labels [N]) as a finished cache file, chunk by chunk."""
    images = images.contiguous()
    build = CacheBuild(path, key, images.shape[0], images.shape[-1], meta)
    build.begin(resume=False)  # in-memory data is written whole: nothing to resume
    try:
        for start in build.pending():
            build.write(start, images[start:start + CHUNK].numpy())
            build.mark(start)
        build.finish(labels.to(torch.int64).numpy())
    except BaseException:
        build.discard()
        raise


# ------------------------------------------------------------------------------------------------ reading
class ImageSplit:
    """A split's uint8 images [N, 3, S, S] and int64 labels [N], read by rows: from a cache file (:meth:`open`), or
    from tensors already in memory (:meth:`from_tensors`).

    ``read(rows)`` / ``read_range(a, b)`` return host tensors (optionally into ``out``, e.g. a pinned buffer);
    ``tensor()`` is the whole split in host memory and ``to(device)`` on a device, both filled in chunks. A file is
    read with ``pread`` straight into the destination: nothing is mapped, so the process's resident memory is the
    batches it asked for (a mapping would count every page it touched, and fault in whole folios around each row),
    the read releases the GIL, and no intra-op thread pool is involved (a prefetch thread must not compete with the
    step's own threads).
    """

    def __init__(self, labels: torch.Tensor, image_size: int, *, images: torch.Tensor | None = None,
                 fd: int | None = None, offset: int = 0, path: Path | None = None):
        self.labels = labels
        self._size = int(image_size)
        self._images = images  # in memory, or None for a file read at byte ``offset`` through ``fd``
        self._fd, self._offset, self.path = fd, offset, path

    @classmethod
    def from_tensors(cls, images: torch.Tensor, labels: torch.Tensor) -> "ImageSplit":
        return cls(torch.as_tensor(labels, dtype=torch.int64), images.shape[-1], images=images)

    @classmethod
    def open(cls, path: Path, key: str, image_size: int, num_classes: int | None = None,
             max_n: int | None = None) -> "ImageSplit | None":
        """The cache at ``path`` if it is a finished cache with this key whose content is what the key promises
        (see :func:`cache_problem`), else None (logged): the caller rebuilds it."""
        if not path.is_file():
            return None
        try:
            f = SafetensorsFile(path)  # header validated like any safetensors input; a truncated file fails here
        except (TVToolError, OSError) as exc:
            log.warning("%s: unreadable cache (%s), rebuilding", path, exc)
            return None
        try:
            return cls._checked(f, path, key, image_size, num_classes, max_n)
        finally:
            f.close()

    @classmethod
    def _checked(cls, f: SafetensorsFile, path: Path, key, image_size, num_classes, max_n) -> "ImageSplit | None":
        meta = f.metadata
        if meta.get("key") != key:
            log.info("%s: stale cache (key changed), rebuilding", path)
            return None
        problem = None
        if meta.get("format") is None:  # tvtool's first cache format: the same pixels, written whole
            log.info("%s: cache written by an older tvtool, rebuilding", path)
            return None
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            problem = f"format {meta.get('format')!r} version {meta.get('format_version')!r}"
        elif set(f.keys()) != {"images", "labels"}:
            problem = f"holds {sorted(f.keys())}, not images and labels"
        elif f.code("images") != "U8" or f.code("labels") != "I64":
            problem = f"images are {f.code('images')}, labels {f.code('labels')}"
        if problem is None:
            labels = f.get("labels").clone()
            problem = cache_problem(torch.empty(f.shape("images"), dtype=torch.uint8, device="meta"), labels,
                                    image_size, num_classes, max_n)
        if problem is None:
            fd = os.open(path, os.O_RDONLY)
            try:
                with open(path, "rb") as raw:  # where the images start: the (validated) header says
                    head_len = struct.unpack("<Q", raw.read(8))[0]
                    begin = json.loads(raw.read(head_len))["images"]["data_offsets"][0]
                offset = 8 + head_len + begin
                nbytes = len(labels) * 3 * image_size * image_size
                digest = _content_digest(lambda off, k: _pread_exact(fd, k, offset + off), nbytes, labels.numpy())
            except BaseException:
                os.close(fd)
                raise
            if digest == meta.get("content_sha256"):
                split = cls(labels, image_size, fd=fd, offset=offset, path=path)
                weakref.finalize(split, os.close, fd)
                return split
            os.close(fd)
            problem = "content changed since it was written"
        log.warning("%s: invalid cache (%s), rebuilding", path, problem)  # never trusted
        return None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_size(self) -> int:
        return self._size

    @property
    def row_bytes(self) -> int:
        return 3 * self._size * self._size

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    def head(self, n: int) -> "ImageSplit":
        """The first ``n`` examples (a view: nothing is read)."""
        images = None if self._images is None else self._images[:n]
        view = ImageSplit(self.labels[:n], self._size, images=images, fd=self._fd, offset=self._offset,
                          path=self.path)
        view._parent = self  # keeps the file open as long as a view needs it
        return view

    def empty(self, n: int, *, pin: bool = False) -> torch.Tensor:
        return torch.empty((n, 3, self._size, self._size), dtype=torch.uint8, pin_memory=pin)

    def read(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Images of ``rows`` (int64, any order) as a host tensor."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        out = self.empty(len(rows)) if out is None else out[:len(rows)]
        if self._images is not None:
            return torch.index_select(self._images, 0, rows, out=out)
        if not len(rows):
            return out
        flat, rb = out.numpy().reshape(len(rows), -1), self.row_bytes
        order = rows.tolist()
        j = 0
        while j < len(order):  # runs of consecutive rows are one read
            k = j + 1
            while k < len(order) and order[k] == order[k - 1] + 1:
                k += 1
            self._pread_into(flat[j:k], self._offset + order[j] * rb)
            j = k
        return out

    def read_range(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        out = self.empty(stop - start) if out is None else out[:stop - start]
        if self._images is not None:
            return out.copy_(self._images[start:stop])
        if stop > start:
            self._pread_into(out.numpy().reshape(stop - start, -1), self._offset + start * self.row_bytes)
        return out

    def _pread_into(self, rows: np.ndarray, offset: int) -> None:
        view = memoryview(rows).cast("B")
        while len(view):
            got = os.preadv(self._fd, [view[:1 << 30]], offset)
            if got <= 0:
                raise TVToolError(f"{self.path}: the image cache ended early (changed while in use?); run again to "
                                  "rebuild it")
            view, offset = view[got:], offset + got

    def tensor(self, chunk: int = 1024) -> torch.Tensor:
        """The whole split in host memory."""
        if self._images is not None:
            return self._images
        out = self.empty(len(self))
        for a in range(0, len(self), chunk):
            self.read_range(a, min(a + chunk, len(self)), out[a:])
        return out

    def to(self, device, chunk: int = 512) -> torch.Tensor:
        """The whole split on ``device``, staged through two pinned buffers on CUDA (never whole on the host)."""
        device = torch.device(device)
        if device.type != "cuda":
            return self.tensor().to(device)
        out = torch.empty((len(self), 3, self._size, self._size), dtype=torch.uint8, device=device)
        staging = [self.empty(min(chunk, len(self)), pin=True) for _ in range(2)]
        done = [None, None]
        for k, a in enumerate(range(0, len(self), chunk)):
            b = min(a + chunk, len(self))
            if done[k % 2] is not None:
                done[k % 2].synchronize()  # the copy that last used this buffer has finished
            buf = self.read_range(a, b, staging[k % 2])
            out[a:b].copy_(buf, non_blocking=True)
            done[k % 2] = torch.cuda.Event()
            done[k % 2].record()
        torch.cuda.current_stream(device).synchronize()
        return out


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
