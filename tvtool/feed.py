"""How a split's images reach the device: held there whole, or streamed from the cache file batch by batch.

Held (the fast path for splits that fit): the uint8 images are copied to the device once and every batch is a
device-side gather. Streamed (everything else): a background thread reads each batch's rows from the cache file,
into pinned buffers on CUDA, and copies them to the device on a side stream ahead of the step, so the step never
waits for the host and host memory stays at a few batches whatever the split's size.

``--data-on-device auto`` holds a split when its images fit the device's budget (half its free memory on CUDA, a
quarter of the host's available memory on the CPU), counting what is already held; ``yes`` / ``no`` force either
way; the choice is printed (evaluation names only the splits it streams). Both paths hand the model the same bytes in the same order, so results are identical.
"""
from __future__ import annotations

import contextlib
import math
import queue
import sys
import threading
import weakref
from typing import Iterable, Iterator

import torch

from .datasets.cachefile import ImageSplit, human
from .errors import TVToolError

PLACEMENTS = ("auto", "yes", "no")
PREFETCH = 3  # batches prepared ahead of the consumer


def check_placement(mode: str) -> str:
    if mode not in PLACEMENTS:
        raise TVToolError(f"--data-on-device {mode!r}: use auto, yes or no")
    return mode


def memory_budget(device: torch.device) -> int:
    """Bytes of images that ``auto`` may hold on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()}
        available = info.get("MemAvailable", info.get("MemFree", 0))
    except (OSError, ValueError, IndexError):
        import os

        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 0
    return available // 4


class Placement:
    """Decides, split by split, whether images are held on the device or streamed (and says so on stderr)."""

    def __init__(self, device, mode: str = "auto", *, say=None, announce_held: bool = True):
        self.device = torch.device(device)
        self.mode = check_placement(mode)
        self.announce_held = announce_held  # evaluation names only what it streams: many splits, few lines
        self.held = 0
        self._budget: int | None = None
        self._say = say if say is not None else (lambda line: print(f"tvtool: {line}", file=sys.stderr, flush=True))

    def hold(self, nbytes: int, what: str, n: int) -> bool:
        if self.mode == "auto" and self._budget is None:
            self._budget = memory_budget(self.device)
        keep = self.mode == "yes" or (self.mode == "auto" and self.held + nbytes <= self._budget)
        size = f"{n} images ({human(nbytes)})"
        if keep:
            self.held += nbytes
            why = "--data-on-device yes" if self.mode == "yes" else f"fits the budget of {human(self._budget)}"
            if self.announce_held:
                self._say(f"{what}: {size} held on {self.device} ({why})")
        else:
            why = ("--data-on-device no" if self.mode == "no" else
                   f"over the budget of {human(max(self._budget - self.held, 0))} left; --data-on-device yes holds it")
            self._say(f"{what}: {size} streamed from the cache ({why})")
        return keep


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetcher:
    """Batches of a split on ``device``, prepared by a background thread ``depth`` batches ahead.

    ``jobs`` yields what each batch holds: an int64 tensor of rows (any order) or a ``(start, stop)`` range. Each
    item is ``(images uint8 [b,3,S,S], labels int64 [b])`` on the device. The host buffers are a fixed ring: on the
    CPU a batch is a view of one, valid until the next batch is taken (copy it to keep it); on CUDA it was copied
    from a pinned one on a side stream that the consumer's stream waits for.
    """

    def __init__(self, data: ImageSplit, device, jobs: Iterable, max_rows: int, depth: int = PREFETCH):
        self.device = torch.device(device)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        # depth queued + one being filled + one held by the consumer: a slot is refilled only after its batch's
        # consumer has taken the next one
        state = {"data": data, "device": self.device, "jobs": iter(jobs), "queue": self._queue, "stop": self._stop,
                 "max_rows": max_rows, "slots": depth + 2}
        self._thread = threading.Thread(target=_produce, args=(state,), daemon=True, name="tvtool-prefetch")
        self._thread.start()
        # a consumer that is dropped (an exception in the loop) still stops the thread
        self._finalizer = weakref.finalize(self, _stop_thread, self._stop, self._queue)

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        item = self._queue.get()
        if item is None:
            raise StopIteration
        if isinstance(item, _Failed):
            raise item.exc
        x, y, event = item
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            x.record_stream(stream)  # allocated on the side stream, used on this one
            y.record_stream(stream)
        return x, y

    def close(self) -> None:
        self._finalizer()
        self._thread.join(timeout=10)


def _stop_thread(stop: threading.Event, q: queue.Queue) -> None:
    stop.set()
    try:
        while True:
            q.get_nowait()  # unblock a producer waiting to put
    except queue.Empty:
        pass


def _put(state, item) -> bool:
    while not state["stop"].is_set():
        try:
            state["queue"].put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(state) -> None:
    data, device, stop = state["data"], state["device"], state["stop"]
    cuda = device.type == "cuda"
    try:
        labels = data.labels
        with torch.cuda.device(device) if cuda else contextlib.nullcontext():
            stream = torch.cuda.Stream(device) if cuda else None
            # A fixed ring of host buffers, reused: nothing is allocated per batch (per-batch allocations from this
            # thread left glibc holding freed memory, RSS growing with every batch until a malloc_trim)
            slots = [(data.empty(state["max_rows"], pin=cuda),
                      torch.empty(state["max_rows"], dtype=torch.int64, pin_memory=cuda), [None])
                     for _ in range(state["slots"])]
            for k, job in enumerate(state["jobs"]):
                if stop.is_set():
                    return
                bx, by, done = slots[k % len(slots)]
                if done[0] is not None:
                    done[0].synchronize()  # the copy that last read this buffer has finished
                if isinstance(job, tuple):
                    hx = data.read_range(job[0], job[1], bx)
                    hy = by[:job[1] - job[0]].copy_(labels[job[0]:job[1]])
                else:
                    hx = data.read(job, bx)
                    hy = torch.index_select(labels, 0, job, out=by[:len(job)])
                if not cuda:
                    item = (hx, hy, None)  # valid until the consumer takes the next one (see the ring's size)
                else:
                    with torch.cuda.stream(stream):
                        x = hx.to(device, non_blocking=True)
                        y = hy.to(device, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(stream)
                    done[0] = event
                    item = (x, y, event)
                if not _put(state, item):
                    return
            _put(state, None)
    except BaseException as exc:  # handed to the consumer, raised there
        _put(state, _Failed(exc))


# ------------------------------------------------------------------------------------------------ evaluation
class StreamedImages:
    """A split's images streamed to ``device`` in contiguous batches: ``batches(b)`` yields uint8 [b,3,S,S]."""

    def __init__(self, data: ImageSplit, device):
        self.data = data
        self.device = torch.device(device)
        self.shape = (len(data), 3, data.image_size, data.image_size)

    def __len__(self) -> int:
        return len(self.data)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        n = len(self.data)
        # two batches ahead: evaluation batches are large (256 images, 38 MB at 224 px) and reads are sequential
        feed = Prefetcher(self.data, self.device, ((a, min(a + batch_size, n)) for a in range(0, n, batch_size)),
                          max_rows=min(batch_size, n), depth=2)
        try:
            for x, _ in feed:
                yield x
        finally:
            feed.close()


def batches(images, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive batches of held images (a device tensor) or streamed ones (:class:`StreamedImages`)."""
    if isinstance(images, StreamedImages):
        yield from images.batches(batch_size)
        return
    for i in range(0, images.shape[0], batch_size):
        yield images[i:i + batch_size]


# ------------------------------------------------------------------------------------------------ training
def micro_span(m: int, micro: int, n_batch: int, world: int, rank: int) -> tuple[int, int]:
    """Positions [a, b) of a step's batch that micro-batch ``m`` of ``rank`` trains on: the micro-batch's slice of
    the batch, split into ``world`` balanced contiguous parts as ``torch.tensor_split`` does (with a short last
    batch some ranks may get none)."""
    lo = min(m * micro, n_batch)
    length = min(n_batch, (m + 1) * micro) - lo
    q, r = divmod(max(length, 0), world)
    a = lo + rank * q + min(rank, r)
    return a, a + q + (1 if rank < r else 0)


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The data order of one epoch: a permutation (on the CPU) seeded by (seed, epoch) alone, so a resumed run sees
    the same."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
    return torch.randperm(n, generator=g)


class _Plan:
    """Which positions of which permutation every micro-batch of one process takes (plain numbers: the prefetch
    thread holds one without keeping its consumer alive)."""

    def __init__(self, n, seed, batch_size, grad_accum, world, rank, steps_per_epoch):
        self.n, self.seed, self.batch_size, self.grad_accum = n, seed, batch_size, grad_accum
        self.micro, self.world, self.rank, self.steps_per_epoch = batch_size // grad_accum, world, rank, steps_per_epoch

    def batch(self, step: int) -> tuple[int, int, list[tuple[int, int, int]]]:
        """(offset of the step's batch in its epoch's permutation, its size, per micro-batch (a, b, real): the span
        [a, b) of the batch it reads and how many of those images count; a micro-batch left empty by a short last
        batch reads the batch's first image as a stand-in that counts 0, so every rank runs the same step)."""
        off = (step % self.steps_per_epoch) * self.batch_size
        n_batch = min(self.batch_size, self.n - off)
        spans = []
        for m in range(self.grad_accum):
            a, b = micro_span(m, self.micro, n_batch, self.world, self.rank)
            spans.append((a, b, b - a) if b > a else (0, 1, 0))
        return off, n_batch, spans

    def rows(self, first: int, total: int):
        """The rows of every micro-batch of steps ``first .. total - 1``, in order."""
        perm, epoch = None, -1
        for step in range(first, total):
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                perm = epoch_permutation(self.seed, epoch, self.n)
            off, _, spans = self.batch(step)
            for a, b, _ in spans:
                yield perm[off + a:off + b]


class TrainFeed:
    """The training batches of one process: step ``s`` takes positions ``[s % spe * B, ...)`` of epoch ``e``'s
    permutation (:func:`epoch_permutation`), micro-batch ``m`` of ``rank`` the span :func:`micro_span` gives.

    ``step(s)`` -> (size of the global batch, iterator of ((a, b), images that count, images uint8 on the device,
    labels) per micro-batch; see :meth:`_Plan.batch` for a micro-batch a short batch leaves empty). Steps are asked for in order, from ``first_step``; a streamed micro-batch is valid until the
    next one is taken.
    """

    def __init__(self, data: ImageSplit, device, hold: bool, *, seed: int, batch_size: int, grad_accum: int,
                 world: int, rank: int, steps_per_epoch: int, first_step: int, total_steps: int):
        self.device, self.hold = torch.device(device), hold
        self.plan = _Plan(len(data), seed, batch_size, grad_accum, world, rank, steps_per_epoch)
        self._perm, self._perm_epoch = None, -1
        self._prefetch = None
        if hold:
            self.images = data.to(self.device)
            self.labels = data.labels.to(self.device)
        else:
            self._prefetch = Prefetcher(data, self.device, self.plan.rows(first_step, total_steps),
                                        max_rows=max(1, math.ceil(self.plan.micro / world)))

    def step(self, step: int):
        off, n_batch, spans = self.plan.batch(step)
        if not self.hold:
            return n_batch, (((a, b), real, *next(self._prefetch)) for a, b, real in spans)
        epoch = step // self.plan.steps_per_epoch
        if epoch != self._perm_epoch:  # the same permutation, kept on the device for device-side gathers
            self._perm = epoch_permutation(self.plan.seed, epoch, self.plan.n).to(self.device)
            self._perm_epoch = epoch
        idx = [self._perm[off + a:off + b] for a, b, _ in spans]
        return n_batch, (((a, b), real, self.images.index_select(0, i), self.labels.index_select(0, i))
                         for (a, b, real), i in zip(spans, idx))

    def close(self) -> None:
        """Stop the prefetch thread and let go of held images (device memory for what follows)."""
        if self._prefetch is not None:
            self._prefetch.close()
        self.images = self.labels = self._perm = None
