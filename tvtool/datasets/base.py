"""The bottom layer of the datasets: the registry, the protocol splits and the helpers dataset modules build on.

Nothing here decodes or caches (``cache.py`` does, and ``splits.py`` is the entry point everybody loads images
through); of ``tvtool.datasets`` this module imports only ``files`` (the image opener). A dataset is a
:class:`DatasetSpec` registered by one small module (``tvtool/datasets/<name>.py``). Its class names and prompt
templates are data, read lazily from ``tvtool/data/templates/<name>.yaml`` (``classnames: [...]``,
``templates: ["a photo of a {c}.", ...]``; fill with ``template.format(c=name)``).

Splits (PROTOCOL.md "Data"): ``train`` is the training split minus the held-out validation part, ``val`` is 10% of
the training split (capped at 5,000, drawn with seed 0 exactly as ``torch.utils.data.random_split`` does in the
reference code), ``test`` is the test split. EuroSAT ships its own val folder (``native_val``).

Images come back as ``uint8 Tensor[N, 3, S, S]`` (the protocol's eval transform: Resize(short side S, bicubic) +
CenterCrop(S), RGB) and ``int64 Tensor[N]`` labels, cached on disk once per split and resolution (see ``cache.py``).
Every image is opened through ``files`` (``open_image`` for a file, ``image_from_bytes`` for a Hugging Face
snapshot's cell), the one place dataset images are decoded.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .._lazy import lazy_module
from ..errors import TVToolError
from .files import open_image, reject_nul

torch = lazy_module("torch")  # imported on first use: listing the registry must not pay for torch

SPLITS = ("train", "val", "test")
VAL_FRACTION = 0.1
VAL_CAP = 5000
VAL_SEED = 0


@dataclass
class Listing:
    """The examples of one native split, before decoding: what the cache key is computed from.

    ``ids[i]`` names example i stably (a path relative to the data root, or ``file#index``); ``open(i)`` returns it
    as a PIL image (it may raise for a corrupt file: that example is then skipped and counted).
    """

    ids: Sequence[str]
    labels: torch.Tensor  # int64 [N]
    open: Callable[[int], "object"]
    source: str = ""  # where it was read from, for messages
    fingerprint: str = ""  # extra identity for array files (size, mtime), part of the cache key
    # stamp(i) -> "size:mtime" of example i's file: a re-downloaded or repaired file invalidates the cache.
    stamp: Callable[[int], str] | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class DatasetSpec:
    name: str
    # Loader-only datasets (the mini-world): loader(split, data_root, image_size) -> (uint8 [N,3,S,S], int64 [N]);
    # split is "train" (the FULL training split) or "test", or "val" when native_val. Real datasets give ``listing``
    # instead and are decoded by the cache.
    loader: Callable | None = None
    epochs: int = 10
    native_val: bool = False
    kind: str = "real"  # "real" | "mini"
    needs_data_root: bool = True
    layout_help: str = ""
    control: bool = False
    # Real datasets also give the undecoded listing, so the cache key can name every file and only the requested
    # protocol split is decoded. listing(split, data_root: Path) -> Listing (native splits, like loader's).
    listing: Callable | None = field(default=None, repr=False)
    # Anything else that determines the content (e.g. a mini-world seed or generator version).
    cache_extra: str = ""
    # `tvtool data prepare`: prepare(data_root: Path, echo) downloads/arranges, or None when only manual steps exist.
    prepare: Callable | None = field(default=None, repr=False)

    @property
    def classnames(self) -> list[str]:
        return _templates_file(self.name)["classnames"]

    @property
    def templates(self) -> list[str]:
        return _templates_file(self.name)["templates"]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, classname: str) -> list[str]:
        return [t.format(c=classname) for t in self.templates]


_REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    if spec.kind not in ("real", "mini"):
        raise ValueError(f"{spec.name}: kind must be 'real' or 'mini', not {spec.kind!r}")
    if (spec.loader is None) == (spec.listing is None):
        raise ValueError(f"{spec.name}: give exactly one of loader (generated data) and listing (files on disk)")
    _REGISTRY[spec.name] = spec
    return spec


def get_dataset(name: str) -> DatasetSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        if canonical_task(name) in _REGISTRY:  # FusionBench's / TALL masks' spelling of a task
            return _REGISTRY[canonical_task(name)]
        known = ", ".join(sorted(_REGISTRY)) or "none registered"
        raise TVToolError(f"unknown dataset {name!r}; known datasets: {known}") from None


def canonical_task(name: str) -> str:
    """tvtool's name of a task given in tvtool's, FusionBench's or the TALL-masks code's spelling (``stanford-cars``,
    ``CarsVal``, ``oxford-iiit-pet`` -> ``cars``, ``cars``, ``oxfordiiitpet``; ``aliases.py``); an unknown name
    comes back as is."""
    from . import aliases

    if name in _REGISTRY:
        return name
    k = aliases.key(name)
    if k in aliases.NOT_ALIASES:
        raise TVToolError(f"{name}: {aliases.NOT_ALIASES[k]}; there is no tvtool task for it")
    by_key = {aliases.key(n): n for n in _REGISTRY}
    for candidate in (k, k[:-3] if k.endswith("val") else None):
        if candidate in by_key:
            return by_key[candidate]
        if candidate in aliases.TASK_ALIASES:
            return aliases.TASK_ALIASES[candidate]
    return name


def list_datasets(kind: str | None = None) -> list[str]:
    return sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)


def templates_path(name: str) -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "templates" / f"{name}.yaml"


@functools.lru_cache(maxsize=None)
def _templates_file(name: str) -> dict:
    import yaml

    path = templates_path(name)
    if not path.is_file():
        raise TVToolError(f"{name}: no class names/templates file {path}; add tvtool/data/templates/{name}.yaml")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("classnames"), list)
        or not isinstance(data.get("templates"), list)
        or not data["classnames"]
        or not data["templates"]
    ):
        raise TVToolError(f"{path}: needs non-empty lists 'classnames' and 'templates'")
    for t in data["templates"]:
        if "{c}" not in str(t):
            raise TVToolError(f"{path}: template {t!r} has no '{{c}}' placeholder")
    return {"classnames": [str(c) for c in data["classnames"]], "templates": [str(t) for t in data["templates"]]}


def protocol_val_split(n: int, seed: int = VAL_SEED, fraction: float = VAL_FRACTION, cap: int = VAL_CAP):
    """(train_idx, val_idx), both sorted int64: the reference's held-out validation part of a training split.

    Same membership as ``random_split(range(n), [n - v, v], generator=Generator().manual_seed(seed))`` with
    ``v = min(int(n * fraction), cap)``; returned sorted so cached splits keep the dataset's order.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    n_val = min(int(n * fraction), cap)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n - n_val].sort().values, perm[n - n_val :].sort().values


def resolve_data_root(data_root=None, *, name: str = "") -> Path:
    root = data_root if data_root is not None else os.environ.get("TVTOOL_DATA")
    if not root:
        what = f"{name}: " if name else ""
        raise TVToolError(f"{what}no data root; pass --data-root DIR or set TVTOOL_DATA to the folder that holds (or "
                          "will hold) the datasets (`tvtool data prepare NAME --data-root DIR` downloads one)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise TVToolError(f"data root {root} is not a folder; pass an existing --data-root or fix TVTOOL_DATA")
    return root


def native_split(spec: DatasetSpec, split: str) -> str:
    """The on-disk split a protocol split is drawn from (train and val both come from train unless native_val)."""
    return "train" if split in ("train", "val") and not spec.native_val else split



# ---- helpers for the small per-dataset modules -------------------------------------------------------------------

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def missing(name: str, path: Path, what: str = "") -> TVToolError:
    """The error for a dataset that is not where the layout says; points at `tvtool data prepare`."""
    extra = f" ({what})" if what else ""
    return TVToolError(f"{name}: expected {path}{extra}; run `tvtool data prepare {name} --data-root ROOT` for how to get it")


def require(name: str, path: Path, what: str = "") -> Path:
    if not path.exists():
        raise missing(name, path, what)
    return path


def class_folders(folder: Path) -> list[str]:
    """Sorted sub-folder names: the class order of ImageFolder-style layouts (and of their class-name files)."""
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir())
    except OSError as exc:
        raise TVToolError(f"{folder}: cannot list it ({exc.strerror or exc})") from None


def _link_error(path: str, why: str) -> TVToolError:
    return TVToolError(f"{path}: {why}; tvtool follows no folder link inside a dataset folder and no file link back "
                       "into it (a loop or a second copy of the same images); replace the link by the folder or file "
                       "itself, or remove it")


def _walk_class(name: str, top: str, trees: tuple[str, ...], keep, extensions, budget: list[int]) -> list[str]:
    """The image files under one class folder in ImageFolder's order (sorted walk, sorted files), without following
    links to folders; a file link is read unless it points back into the dataset (a duplicate). Anything else with
    an image name (FIFO, device, socket, dangling link) is refused: reading it would block or fail."""
    found: list[tuple[str, list[str]]] = []
    stack = [top]
    while stack:
        dirpath = stack.pop()
        files = []
        try:
            entries = list(os.scandir(dirpath))
        except OSError as exc:  # an unreadable sub-folder silently dropping its images would skew the labels
            raise TVToolError(f"{dirpath}: cannot list it ({exc.strerror or exc}); fix its permissions") from None
        budget[0] -= len(entries)
        if budget[0] < 0:
            raise TVToolError(f"{name}: more than {MAX_LISTED} entries under {top}; is the data root right?")
        for e in entries:
            wanted = e.name.lower().endswith(extensions) and (keep is None or keep(e.name))
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            elif e.is_symlink():
                if e.is_dir():
                    raise _link_error(e.path, "a link to a folder")
                if not wanted:
                    continue
                target = os.path.realpath(e.path)
                if any(target == t or target.startswith(t + os.sep) for t in trees):
                    raise _link_error(e.path, f"a link to {target}, inside the dataset")
                if not e.is_file():
                    raise TVToolError(f"{e.path}: a link to {target}, which is not a regular file; remove it")
                files.append(e.name)
            elif wanted:
                if not e.is_file(follow_symlinks=False):
                    kind = _special_kind(e.path)
                    raise TVToolError(f"{e.path}: is {kind}, not an image file; remove it from the dataset folder")
                files.append(e.name)
        found.append((dirpath, sorted(files)))
    return [os.path.join(d, f) for d, files in sorted(found) for f in files]


def _special_kind(path: str) -> str:
    import stat

    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "unreadable"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


MAX_LISTED = 50_000_000  # entries walked per split folder: ImageNet's train split has 1.3 M


def image_folder(
    name: str, root: Path, folder: Path, *, keep: Callable[[str], bool] | None = None, extensions=IMG_EXTENSIONS
) -> tuple[list[str], Listing]:
    """(classes, Listing) of ``folder/<class>/**/<image>`` with ImageFolder's order and labels.

    Classes are the sorted sub-folder names (label = position); inside a class, files come in sorted walk order,
    the order the reference's ImageFolder produces, so the seed-0 validation split picks the same examples.
    ``keep(basename)`` filters files (RESISC45's split lists). Links to folders inside a class are never followed
    and a class folder that is a link must lead outside the split folder, to a folder no other class uses (see
    ``_walk_class``): a link loop would otherwise multiply examples or relabel other classes' images.
    """
    require(name, folder)
    classes = class_folders(folder)
    if not classes:
        raise missing(name, folder, "one sub-folder per class")
    top = os.path.realpath(folder)
    targets: dict[str, str] = {}
    for cls in classes:
        path = os.path.join(folder, cls)
        real = os.path.realpath(path)
        if os.path.islink(path) and (real == top or real.startswith(top + os.sep) or top.startswith(real + os.sep)):
            raise _link_error(path, f"a class folder linked to {real}, inside the split folder")
        if real in targets.values():
            raise _link_error(path, f"a class folder linked to {real}, the folder of another class")
        targets[cls] = real
    trees = (top, *sorted(set(targets.values())))
    paths: list[str] = []
    labels: list[int] = []
    budget = [MAX_LISTED]
    for label, cls in enumerate(classes):
        files = _walk_class(name, os.path.join(folder, cls), trees, keep, extensions, budget)
        paths.extend(files)
        labels.extend([label] * len(files))
    counts = torch.bincount(torch.tensor(labels, dtype=torch.int64), minlength=len(classes))
    empty = [cls for cls, n in zip(classes, counts.tolist()) if n == 0]
    if empty:  # a class with no examples silently skews the head and the accuracies
        raise TVToolError(f"{name}: class folder {folder / empty[0]} has no images ({len(empty)} empty class "
                          f"folder(s)); add its images or check the layout with `tvtool data check`")
    check_classes(name, len(classes), folder)
    return classes, file_listing(root, paths, labels, source=str(folder))


def file_listing(root: Path, paths: Sequence[str], labels: Sequence[int], source: str = "",
                 n_classes: int | None = None) -> Listing:
    """A Listing of image files (opened with :func:`tvtool.datasets.files.open_image`, the one place dataset images
    are opened). With ``n_classes``, labels are checked to be in range first."""
    paths = [reject_nul(str(p), source or root) for p in paths]
    if n_classes is not None:
        check_labels(labels, n_classes, source or root)
    root_s = str(root).rstrip(os.sep) + os.sep
    ids = [p[len(root_s):] if p.startswith(root_s) else p for p in paths]

    def stamp(i: int) -> str:
        try:
            st = os.stat(paths[i])
        except OSError:
            return "missing"
        return f"{st.st_size}:{st.st_mtime_ns}"

    return Listing(ids, torch.tensor(labels, dtype=torch.int64), lambda i: open_image(paths[i]), source=source,
                   stamp=stamp)


def array_listing(images, labels, ids_prefix: str, files: Sequence[Path], source: str = "",
                  n_classes: int | None = None) -> Listing:
    """Listing over an in-memory uint8 array ([N,H,W] grey or [N,H,W,3] RGB), e.g. MNIST idx or SVHN .mat. With
    ``n_classes`` the labels are checked first: whole numbers in range, one per image."""
    from PIL import Image

    if n_classes is not None:
        if len(labels) != len(images):
            raise TVToolError(f"{source}: {len(labels)} labels for {len(images)} images; the files do not belong "
                              "together, re-download them")
        labels = check_labels(labels, n_classes, source)
    fp = ";".join(f"{Path(f).name}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in files)
    ids = [f"{ids_prefix}#{i}" for i in range(len(images))]
    return Listing(ids, torch.as_tensor(labels, dtype=torch.int64), lambda i: Image.fromarray(images[i]), source, fp)


def check_labels(labels, n_classes: int, where):
    """Labels as int64 numpy, refused in one line unless they are whole numbers in 0..n_classes-1 (what the loss
    and the cache accept); what `tvtool data check` reports."""
    import numpy as np

    arr = np.asarray(labels)
    if arr.dtype == object or arr.ndim != 1:
        raise TVToolError(f"{where}: labels are not a flat list of whole numbers; re-download the dataset")
    if arr.size and arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise TVToolError(f"{where}: labels are not whole numbers (e.g. {arr[arr != np.round(arr)][:1]}); is "
                              "this the right file?")
    elif arr.size and arr.dtype.kind not in "iub":
        raise TVToolError(f"{where}: labels are not whole numbers ({arr.dtype}); is this the right file?")
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise TVToolError(f"{where}: labels span {int(arr.min())}..{int(arr.max())}, outside 0..{n_classes - 1}; is "
                          "this the right file?")
    return arr.astype(np.int64)


def check_classes(name: str, found: int, where) -> None:
    """Labels are positions in the class-name file, so the number of classes must agree with it."""
    if not templates_path(name).is_file():
        return  # names not written yet: nothing to compare against
    expected = len(_templates_file(name)["classnames"])
    if found != expected:
        raise TVToolError(
            f"{name}: found {found} classes in {where}, expected {expected} (tvtool/data/templates/{name}.yaml); "
            "check the layout with `tvtool data check`"
        )


def register_real(name: str, listing: Callable, **kw) -> DatasetSpec:
    """Register an on-disk dataset from its ``listing(split, root) -> Listing``."""
    return register(DatasetSpec(name=name, listing=listing, **kw))


def link_or_copy(src: Path, dst: Path) -> None:
    """Place ``src`` at ``dst`` without doubling disk use where the filesystem allows (hard link), else copy."""
    import shutil

    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def torchvision_download(name: str, fn: Callable, manual: str) -> None:
    """Run a torchvision download; failures (offline, moved host) become one line that also gives the manual way."""
    try:
        fn()
    except TVToolError:
        raise
    except Exception as exc:  # URLError, HTTPError, RuntimeError("File not found or corrupted"), ...
        # the layout strings end by saying that `data prepare` downloads them, which is what just failed
        layout = manual.split("; `tvtool data prepare")[0]
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise TVToolError(f"{name}: download failed ({type(exc).__name__}: {reason}). Manual steps: on a machine "
                          f"with internet access, download it with torchvision's dataset class (download=True) or "
                          f"from the dataset's own site, then copy the files under the data root as {layout}; "
                          f"check with `tvtool data check {name}`") from None
