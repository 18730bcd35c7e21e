"""Datasets as FusionBench publishes them: Hugging Face parquet snapshots (``tanganke/<task>``), read offline.

A snapshot holds ``data/<split>-NNNNN-of-MMMMM.parquet`` files with an ``image`` column (the ``datasets`` Image
feature: a struct of encoded ``bytes`` and a ``path``) and an integer ``label`` column; the schema's ``huggingface``
metadata names the classes (a ``ClassLabel``). tvtool reads one from

- a folder under the data root named after the repository: ``ROOT/tanganke/<name>/data/...`` (what
  ``hf download tanganke/<name> --repo-type dataset --local-dir ROOT/tanganke/<name>`` writes), or
- the local Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``):
  ``datasets--tanganke--<name>/snapshots/<revision>/data/...``, the revision ``refs/main`` names (else the newest),
  which ``datasets.load_dataset("tanganke/<name>")`` or ``hf download`` fill.

Rows keep the snapshot's order (shards in name order), so the protocol's Val split (10% of train, seed 0) is drawn
over that order. Images are decoded with the same checks as the folder layouts' files (``files.image_from_bytes``:
the dataset formats only, Pillow's pixel bound); a cell without embedded bytes is an unreadable example. Reading needs ``pyarrow`` (``pip install pyarrow``).
"""
from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._lazy import lazy_module
from ..errors import TVToolError
from .base import Listing, get_dataset, templates_path
from .files import image_from_bytes

torch = lazy_module("torch")

# tvtool task -> the snapshot FusionBench loads for it (fusion_bench/config/dataset/image_classification/*). Their
# class lists (fusion_bench/tasks/clip_classification) agree in order with tvtool's for every one of these. Tasks
# not listed have no tanganke snapshot (FusionBench reads MNIST, SVHN and the other 20-task additions from other
# hub datasets, and its EMNIST is the `letters`/`mnist` split, not tvtool's `digits`).
SNAPSHOTS = {
    "sun397": "tanganke/sun397",
    "cars": "tanganke/stanford_cars",
    "resisc45": "tanganke/resisc45",
    "eurosat": "tanganke/eurosat",
    "gtsrb": "tanganke/gtsrb",
    "dtd": "tanganke/dtd",
    "stl10": "tanganke/stl10",
    "cifar10": "tanganke/cifar10",
    "cifar100": "tanganke/cifar100",
    "kmnist": "tanganke/kmnist",
}
# a protocol's native split -> the snapshot's split names, first match wins
SPLIT_FILES = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub resolves it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):  # the second is the older name huggingface_hub still reads
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


@dataclass(frozen=True)
class Snapshot:
    task: str
    repo: str
    folder: Path  # the snapshot's root (holding data/)

    def files(self, split: str) -> list[Path]:
        """Parquet shards of a native split (train / val / test), in order; [] when the snapshot lacks it."""
        for name in SPLIT_FILES[split]:
            found = sorted(p for p in (self.folder / "data").glob(f"{name}-*.parquet")) or sorted(
                (self.folder / "data").glob(f"{name}.parquet"))
            if found:
                return found
        return []

    def has(self, split: str) -> bool:
        return bool(self.files(split))

    def listing(self, split: str) -> Listing:
        return snapshot_listing(self, split)


def _has_parquet(folder: Path) -> bool:
    return (folder / "data").is_dir() and any((folder / "data").glob("*.parquet"))


def find_snapshot(task: str, data_root: Path | None) -> Snapshot | None:
    """The snapshot of ``task`` under the data root or in the local hub cache, or None."""
    repo = SNAPSHOTS.get(task)
    if repo is None:
        return None
    if data_root is not None and _has_parquet(Path(data_root) / repo):
        return Snapshot(task, repo, Path(data_root) / repo)
    cached = hub_cache() / f"datasets--{repo.replace('/', '--')}"
    snapshots = cached / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = cached / "refs" / "main"
    try:
        rev = ref.read_text().strip() if ref.is_file() else ""
    except OSError:
        rev = ""
    if rev and re.fullmatch(r"[0-9a-fA-F]{6,64}", rev) and _has_parquet(snapshots / rev):
        return Snapshot(task, repo, snapshots / rev)
    candidates = [p for p in snapshots.iterdir() if p.is_dir() and _has_parquet(p)]
    if not candidates:
        return None
    return Snapshot(task, repo, max(candidates, key=lambda p: p.stat().st_mtime))


def fetch_help(task: str, root_hint: str = "ROOT") -> str:
    """How to get the task's snapshot, or "" when FusionBench publishes none."""
    repo = SNAPSHOTS.get(task)
    if repo is None:
        return ""
    return (f"or use FusionBench's Hugging Face snapshot: `hf download {repo} --repo-type dataset --local-dir "
            f"{root_hint}/{repo}` (pip install huggingface_hub), or any `datasets.load_dataset(\"{repo}\")` that "
            "filled the local Hugging Face cache; tvtool reads either offline (needs `pip install pyarrow`)")


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TVToolError("reading Hugging Face parquet snapshots needs pyarrow; install it with `pip install pyarrow` "
                          "(or `pip install tvtool[parquet]`)") from None
    return pq


def _norm(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def check_class_order(task: str, names: list[str] | None, where) -> None:
    """The snapshot's class names against tvtool's (the labels index tvtool's class list): same count, and no
    name sitting at another class's position. Names spelt differently ("AnnualCrop" / "annual crop land") pass."""
    if names is None or not templates_path(task).is_file():
        return
    ours = get_dataset(task).classnames
    if len(names) != len(ours):
        raise TVToolError(f"{task}: the snapshot {where} has {len(names)} classes, tvtool's {task} has {len(ours)}; "
                          "is it the right dataset?")
    position = {}
    for j, o in enumerate(ours):
        position.setdefault(_norm(o), j)
    for i, (s, o) in enumerate(zip(names, ours)):
        a, b = _norm(s), _norm(o)
        if a == b or (a and b and (a in b or b in a)):
            continue
        j = position.get(a)
        if j is not None and j != i:
            raise TVToolError(f"{task}: the snapshot {where} lists class {i} as {s!r}, which is tvtool's class {j} "
                              f"(tvtool's class {i} is {o!r}); its labels are in another order than "
                              f"tvtool/data/templates/{task}.yaml")


def _class_names(schema) -> list[str] | None:
    meta = schema.metadata or {}
    try:
        info = json.loads(meta[b"huggingface"].decode("utf-8"))
        feature = info["info"]["features"]["label"]
    except (KeyError, ValueError, TypeError, UnicodeDecodeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
    return [str(n) for n in names] if isinstance(names, list) else None


def snapshot_listing(snap: Snapshot, split: str) -> Listing:
    """Listing of a native split of a snapshot: labels read up front, images decoded row group by row group."""
    pq = _parquet()
    files = snap.files(split)
    if not files:
        raise TVToolError(f"{snap.task}: the Hugging Face snapshot {snap.folder} has no {split} split "
                          f"(data/{SPLIT_FILES[split][0]}-*.parquet)")
    labels, starts, groups, fps = [], [0], [], []
    for path in files:
        rel = path.relative_to(snap.folder).as_posix()
        try:
            pf = pq.ParquetFile(path)
            schema = pf.schema_arrow
            missing = [c for c in ("image", "label") if c not in schema.names]
            if missing:
                raise TVToolError(f"{path}: no {' or '.join(missing)} column (has {', '.join(schema.names)}); "
                                  "is this an image-classification snapshot?")
            if path == files[0]:
                check_class_order(snap.task, _class_names(schema), snap.folder)
            column = pf.read(columns=["label"], use_threads=False).column("label")
        except TVToolError:
            raise
        except Exception as exc:  # pyarrow's ArrowInvalid / OSError on a damaged or foreign file
            raise TVToolError(f"{path}: unreadable parquet file ({type(exc).__name__}: {str(exc)[:200]}); "
                              "download the snapshot again") from None
        if column.null_count:
            raise TVToolError(f"{path}: {column.null_count} rows have no label")
        values = column.to_numpy()
        if values.dtype.kind not in "iu":
            raise TVToolError(f"{path}: labels are {column.type}, expected integers")
        labels.append(values.astype(np.int64))
        starts.append(starts[-1] + len(values))
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        groups.append(np.cumsum([0] + sizes))
        st = path.stat()
        fps.append(f"{rel}:{st.st_size}:{st.st_mtime_ns}")
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if all_labels.size and templates_path(snap.task).is_file():
        n = get_dataset(snap.task).num_classes
        if all_labels.min() < 0 or all_labels.max() >= n:
            raise TVToolError(f"{snap.task}: the snapshot {snap.folder} has labels {all_labels.min()}..{all_labels.max()}"
                              f", tvtool's {snap.task} has classes 0..{n - 1}")
    starts_a = np.asarray(starts)
    rels = [p.relative_to(snap.folder).as_posix() for p in files]
    ids = [f"{rels[k]}#{r}" for k in range(len(files)) for r in range(starts[k + 1] - starts[k])]
    reader = _RowGroupReader(files, groups)

    def open_row(i: int):
        k = int(np.searchsorted(starts_a, i, side="right")) - 1
        data = reader.image_bytes(k, i - starts[k])
        if data is None:
            raise ValueError("no embedded image bytes")
        return image_from_bytes(data, ids[i])

    return Listing(ids, torch.from_numpy(all_labels), open_row, source=f"Hugging Face snapshot {snap.folder} ({split})",
                   fingerprint=";".join(fps))


class _RowGroupReader:
    """Image bytes by (file, row), one row group at a time: decoding walks rows in order, so the group just read
    serves the next rows. Each process opens its own files (decoding forks workers); threads share under a lock."""

    def __init__(self, files: list[Path], groups: list[np.ndarray]):
        self.files, self.groups = files, groups
        self._lock = threading.Lock()
        self._pid = None
        self._open: dict[int, object] = {}
        self._cached: tuple[int, int, object] | None = None  # (file, group, image column)

    def image_bytes(self, k: int, row: int) -> bytes | None:
        g = int(np.searchsorted(self.groups[k], row, side="right")) - 1
        with self._lock:
            if self._pid != os.getpid():  # a forked worker: nothing inherited is used
                self._pid, self._open, self._cached = os.getpid(), {}, None
            if self._cached is None or self._cached[:2] != (k, g):
                if k not in self._open:
                    self._open[k] = _parquet().ParquetFile(self.files[k])
                table = self._open[k].read_row_group(g, columns=["image"], use_threads=False)
                self._cached = (k, g, table.column("image").combine_chunks())
            cell = self._cached[2][row - int(self.groups[k][g])]
        value = cell.as_py()
        if isinstance(value, dict):
            return value.get("bytes")
        return value if isinstance(value, (bytes, bytearray)) else None
