"""``torch.save`` checkpoints read without importing or running anything from the file.

The published task-arithmetic checkpoints pickle a whole module (``src.modeling.ImageEncoder`` around an open_clip
2.0-era CLIP): a normal unpickler needs that repository's source and old open_clip class names, and runs whatever
the file asks for. Here, only a fixed allow-list of (module, name) pairs resolves to real callables: torch's tensor
rebuild functions (re-implemented, so even they take only data), plain containers and dtypes. Every other global
becomes an inert stub class whose instances only record their pickled state; nn.Modules pickle their tensors in
``_parameters`` / ``_buffers`` and their children in ``_modules``, so the state dict is collected from the stubs.
Calling a stub whose name looks like a function (``os.system``, ``builtins.eval``), or naming a module that exists
to run code (os, subprocess, builtins, ...), refuses the whole file before anything runs.

Both of torch's formats are read: the zip archive (torch >= 1.6, what the published checkpoints use) and the legacy
stream (pickles followed by raw storage bytes).

A hostile file may also try to exhaust memory or time rather than run code, so every size it declares is checked
before anything is allocated: a storage must hold exactly the bytes it declares and fit in the file (a compressed
zip member may not inflate past what deflate can do); a tensor must lie inside its storage and may not repeat its
elements (a stride-0 view would turn 4 stored bytes into gigabytes of output); all tensors together may not be much
larger than their storages; nested modules are walked without recursion, to a bounded depth; and no message ever
prints a pickled value whole (:func:`tvtool.errors.brief`).

Every pickle tvtool reads goes through this module: :func:`read_pickle` (the object; full unpickling only as the
announced ``--trust-pickle`` fallback), :func:`load_pickle` (its state dict) and :func:`open_pickle` (a WeightSource).
"""
from __future__ import annotations

import _compat_pickle
import collections
import functools
import io
import os
import pickle
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import torch

from ..errors import TVToolError, brief
from ..weight_source import WeightSource
from . import pickle_scan, tangent
from .arch import infer

# Modules whose globals exist to run code or touch the system: naming any of them refuses the file.
_DANGEROUS_ROOTS = {
    "os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "shutil", "socket", "importlib", "runpy",
    "pty", "ctypes", "pickle", "_pickle", "marshal", "code", "codeop", "webbrowser", "multiprocessing", "signal",
    "io", "_io", "types", "threading", "_thread", "asyncio", "tempfile", "glob", "urllib", "http", "ftplib",
    "inspect", "pdb", "timeit", "platform", "sysconfig", "zipimport", "torch.hub",
}
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}

# Looked up in the module's namespace, never with getattr: torch's module __getattr__ imports submodules lazily.
_TORCH_DTYPES = {name: obj for name, obj in vars(torch).items() if isinstance(obj, torch.dtype)}


class UnsafePickle(Exception):
    """The pickle asked for something the restricted reader will not do.

    ``final``: it named a module that exists to run code (os, subprocess, builtins, ...); no checkpoint needs that,
    so not even ``--trust-pickle`` unpickles it. Other refusals (a function call the reader does not know) may be
    fully unpickled with ``--trust-pickle``."""

    def __init__(self, message: str, final: bool = False):
        super().__init__(message)
        self.final = final


class BadCheckpoint(Exception):
    """The file is damaged or lies about its sizes (not a code-execution attempt: ``--trust-pickle`` may still
    unpickle it fully, with torch's own checks)."""


# data.pkl of the largest published whole-module pickles is well below 1 MB; legacy pickles hold their storages
# after the pickle, and those are bounded by the file itself
MAX_PICKLE_BYTES = 256 << 20
# torch.save stores its zip members uncompressed; a re-zipped archive's members (weights: noise that deflate barely
# shrinks) inflate a few times at most, so a member inflating more than this, beyond a small allowance, is a
# decompression bomb (deflate reaches ~1000:1 on zeros)
MAX_INFLATE_RATIO = 20
INFLATE_ALLOWANCE = 16 << 20
# nn.Module trees nest a few levels (a wrapper, the CLIP, its towers, blocks, layers); far deeper is hostile
MAX_MODULE_DEPTH = 64
MAX_MODULE_VISITS = 200_000  # a ViT-L CLIP has about 500 modules
# tensors may share storages (tied weights, views of one flat buffer), but all of them together may not need many
# times the bytes the storages hold: that is data amplification, not a checkpoint
VIEW_BUDGET_FACTOR = 4
VIEW_BUDGET_SLACK = 1 << 20


def _index(x, what: str) -> int:
    if type(x) is not int or x < 0:
        raise BadCheckpoint(f"a tensor {what} that is not a non-negative integer ({brief(x)})")
    return x


def _dims(x, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list, torch.Size)) or len(x) > 64:
        raise BadCheckpoint(f"a tensor {what} that is not a short list of integers ({brief(x)})")
    return tuple(_index(d, what) for d in x)


def _check_view(storage_bytes: int, itemsize: int, offset: int, size: tuple, stride: tuple) -> int:
    """Refuse a tensor that reaches outside its storage or repeats stored elements; returns its bytes."""
    if len(size) != len(stride):
        raise BadCheckpoint(f"a tensor with {len(size)} sizes but {len(stride)} strides")
    numel = 1
    for d in size:
        numel *= d
    if numel == 0:
        return 0
    capacity = storage_bytes // itemsize
    last = offset + sum((d - 1) * s for d, s in zip(size, stride))
    if last >= capacity:
        raise BadCheckpoint(f"a tensor of shape {list(size)} reaches element {last} of a storage holding {capacity}")
    # Non-overlapping when, smallest stride first, each stride exceeds the furthest offset the smaller ones reach;
    # every layout torch.save writes (contiguous, transposed, sliced, expand() of size-1 dims) passes.
    reach = 0
    for s, d in sorted((s, d) for d, s in zip(size, stride) if d > 1):
        if s <= reach:
            raise BadCheckpoint(f"a tensor of shape {list(size)} with strides {list(stride)} repeats its stored "
                                f"elements (a stride-0 or overlapping view of {capacity} stored values); re-save it "
                                "with .contiguous() tensors")
        reach += s * (d - 1)
    return numel * itemsize


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(budget: list, storage, storage_offset, size, stride, *rest):
    """torch._utils._rebuild_tensor(_v2), checked; ``budget``: [storage bytes, tensor bytes] of the file so far."""
    if not (isinstance(storage, tuple) and len(storage) == 2 and isinstance(storage[0], torch.UntypedStorage)):
        raise BadCheckpoint("a tensor without a storage")
    data, dtype = storage
    offset, size, stride = _index(storage_offset, "offset"), _dims(size, "shape"), _dims(stride, "stride")
    nbytes = _check_view(data.nbytes(), torch.empty((), dtype=dtype).element_size(), offset, size, stride)
    budget[1] += nbytes
    if budget[1] > VIEW_BUDGET_FACTOR * budget[0] + VIEW_BUDGET_SLACK:
        raise BadCheckpoint(f"its tensors need {budget[1]} bytes but its storages hold only {budget[0]} (the same "
                            "stored values under many names)")
    t = torch.empty((0,), dtype=dtype)
    return t.set_(data, offset, torch.Size(size), stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    if not isinstance(data, torch.Tensor):
        raise UnsafePickle("a parameter that is not a tensor")
    return data  # a plain tensor is all a state dict needs


def _rebuild_from_type(func, cls, args, state):
    # Tensor subclasses: rebuild the plain tensor only (func is itself resolved through the allow-list).
    return func(*args)


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # How protocol-2 pickles spell bytes; only the text encodings torch uses.
    if not isinstance(encoding, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise UnsafePickle(f"_codecs.encode with encoding {brief(encoding)}")
    if not isinstance(text, str) or errors != "strict":
        raise UnsafePickle(f"_codecs.encode of {brief(text)}")
    return text.encode(encoding)


def _reconstructor(cls, base, state):
    # copyreg._reconstructor: protocol 0/1 spelling of "make an instance of cls"; only stubs are ever built.
    if not (isinstance(cls, type) and issubclass(cls, Stub)):
        raise UnsafePickle(f"copyreg._reconstructor of {brief(cls)}")
    obj = cls.__new__(cls)
    if state is not None:
        obj.__setstate__(state)
    return obj


_REBUILD_TENSOR = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")}
_ALLOWED = {
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch._utils", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "object"): object,
    ("_codecs", "encode"): _codecs_encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("torch", "device"): torch.device, ("torch", "Size"): torch.Size,
}


# Data-only constructors of non-tensor attributes some checkpoints carry (numpy scalars and arrays, dates): they
# become inert stubs too, without importing numpy, instead of being refused as unknown function calls.
_INERT = {
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "dtype"), ("numpy", "ndarray"), ("datetime", "datetime"), ("datetime", "date"),
    ("datetime", "timedelta"),
}


class Stub:
    """An instance of a class the reader does not import: records what the pickle gave it, runs nothing."""

    _stub_name = "?"

    def __init__(self, *args, **kwargs):
        self.__dict__["_stub_args"] = args

    def __setstate__(self, state):
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif state is not None:
            self.__dict__["_stub_state"] = state
        if isinstance(slots, dict):
            self.__dict__.update(slots)

    # Lists and dicts pickled by APPENDS / SETITEMS into a subclass instance.
    def append(self, item):
        self.__dict__.setdefault("_stub_items", []).append(item)

    def extend(self, items):
        for item in items:
            self.append(item)

    def __setitem__(self, key, value):
        self.__dict__.setdefault("_stub_map", {})[key] = value

    def __repr__(self):
        return f"<stub {self._stub_name}>"


def _looks_like_function(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1].lstrip("_")
    return not leaf[:1].isupper()


def _make_stub(module: str, name: str) -> type:
    qual = f"{module[:80]}.{name[:80]}"
    if _looks_like_function(name) and (module, name) not in _INERT:
        # Referencing a function is harmless (transforms keep some as attributes); calling one is refused.
        def refuse(cls, *args, **kwargs):
            raise UnsafePickle(f"it calls {qual}")

        return type(name, (Stub,), {"_stub_name": qual, "__new__": refuse, "__module__": "tvtool.stub"})
    return type(name, (Stub,), {"_stub_name": qual, "__module__": "tvtool.stub"})


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storages, budget: list | None = None):
        super().__init__(file)
        self._storages = storages
        self._stubs: dict[tuple[str, str], type] = {}
        self._budget = budget if budget is not None else [0, 0]  # [storage bytes, tensor bytes] so far

    def find_class(self, module: str, name: str):
        # Protocol 0-2 pickles spell Python 2 names ('commands' for subprocess, '__builtin__'): map them exactly as
        # pickle's own fix_imports does, so the checks below see the module that would really be imported.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) in _REBUILD_TENSOR:
            return functools.partial(_rebuild_tensor, self._budget)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        root = module.split(".")[0]
        if root in _DANGEROUS_ROOTS or module in _DANGEROUS_ROOTS:
            raise UnsafePickle(f"it names {module[:80]}.{name[:80]}", final=True)
        key = (module, name)
        if key not in self._stubs:
            self._stubs[key] = _make_stub(module, name)
        return self._stubs[key]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")):
            raise UnsafePickle(f"unknown persistent id {brief(pid)}")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickle("a storage of unknown type")
        if not isinstance(key, str) or len(key) > 64:
            raise BadCheckpoint(f"a storage named {brief(key)}")
        itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
        return self._storages(key, _index(numel, "storage size") * itemsize), storage_type.dtype


def _member(zf: zipfile.ZipFile, name: str, what: str, limit: int | None = None) -> zipfile.ZipInfo:
    """A zip member whose declared size the file can hold: stored members exactly, compressed ones at most
    a few times their compressed size (so a small file cannot inflate to gigabytes)."""
    info = zf.getinfo(name)
    if info.compress_type == zipfile.ZIP_STORED:
        ok = info.file_size == info.compress_size
    else:
        ok = True
        if info.file_size > max(INFLATE_ALLOWANCE, info.compress_size * MAX_INFLATE_RATIO):
            raise BadCheckpoint(f"{what} would inflate {info.compress_size} compressed bytes to {info.file_size} (a "
                                "decompression bomb; torch.save stores its records uncompressed)")
    if not ok or info.compress_size > _zip_size(zf) or (limit is not None and info.file_size > limit):
        raise BadCheckpoint(f"{what} declares {info.file_size} bytes, which this file of {_zip_size(zf)} bytes "
                            f"cannot hold{'' if limit is None else f' (at most {limit})'}")
    return info


def _zip_size(zf: zipfile.ZipFile) -> int:
    fp = zf.fp
    return os.fstat(fp.fileno()).st_size if hasattr(fp, "fileno") else len(fp.getbuffer())


def _zip_storages(zf: zipfile.ZipFile, prefix: str, budget: list):
    cache: dict[str, torch.UntypedStorage] = {}

    def get(key: str, nbytes: int) -> torch.UntypedStorage:
        if key not in cache:
            name = f"{prefix}data/{key}"
            info = _member(zf, name, f"storage {key}")
            if info.file_size != nbytes:
                raise BadCheckpoint(f"storage {key} declares {nbytes} bytes but its record holds {info.file_size}")
            raw = bytearray(zf.read(name))
            cache[key] = torch.frombuffer(raw, dtype=torch.uint8).untyped_storage() if raw else torch.UntypedStorage(0)
            budget[0] += len(raw)
        return cache[key]

    return get


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's legacy (pre-1.6, non-zip) serialization


class _LegacyUnpickler(RestrictedUnpickler):
    """Legacy files name each storage by (type, key, location, numel, view): storages are allocated here and their
    bytes, which follow the pickles in the file, filled in afterwards."""

    def __init__(self, file, storages: dict, available: int):
        super().__init__(file, None)
        self._legacy = storages
        self._available = available  # the file's bytes: every storage's data must be among them

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise UnsafePickle(f"unknown persistent id {brief(pid)}")
        kind = pid[0].decode("latin1") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":  # ('module', class, source file, source): only the (stub) class matters
            return pid[1]
        if kind != "storage" or len(pid) != 6 or not isinstance(pid[1], _StorageType):
            raise UnsafePickle(f"unknown persistent id {brief(pid)}")
        storage_type, key, _, numel, view = pid[1:]
        if not isinstance(key, str) or len(key) > 64:
            raise BadCheckpoint(f"a storage named {brief(key)}")
        dtype = storage_type.dtype
        size = torch.empty((), dtype=dtype).element_size()
        numel = _index(numel, "storage size")
        if key not in self._legacy:
            # allocated now, filled after the pickle: declared sizes are checked against the file first
            if self._budget[0] + numel * size > self._available:
                raise BadCheckpoint(f"its storages declare {self._budget[0] + numel * size} bytes but the file holds "
                                    f"only {self._available}")
            self._legacy[key] = (torch.UntypedStorage(numel * size), dtype)
            self._budget[0] += numel * size
        root = self._legacy[key][0]
        if view is not None:
            if not (isinstance(view, tuple) and len(view) == 3):
                raise BadCheckpoint(f"a storage view {brief(view)}")
            offset, view_numel = _index(view[1], "storage offset"), _index(view[2], "storage size")
            if (offset + view_numel) * size > root.nbytes():
                raise BadCheckpoint(f"a view of {view_numel} elements at {offset} in storage {key} of "
                                    f"{root.nbytes() // size}")
            return root[offset * size: (offset + view_numel) * size], dtype
        return root, dtype


def _scanned(f):
    """``f``, its next pickle checked by :func:`pickle_scan.check` (then rewound to it)."""
    start = f.tell()
    pickle_scan.check(f)
    f.seek(start)
    return f


def _load_legacy(path: Path, f):
    def plain():
        return RestrictedUnpickler(_scanned(f), None).load()

    if plain() != _LEGACY_MAGIC:
        raise TVToolError(f"{path}: not a torch checkpoint (neither a zip archive nor torch's legacy format)")
    plain()  # protocol version
    info = plain()
    if isinstance(info, dict) and info.get("little_endian") is False:
        raise TVToolError(f"{path}: a big-endian checkpoint; load it with torch on that machine and re-save")
    storages: dict = {}
    obj = _LegacyUnpickler(_scanned(f), storages, os.fstat(f.fileno()).st_size).load()
    keys = plain()
    if not isinstance(keys, list) or not all(isinstance(k, str) and k in storages for k in keys):
        raise BadCheckpoint("the list of storages does not name the storages of the pickle")
    for key in keys:
        storage, dtype = storages[key]
        (numel,) = struct.unpack("<q", f.read(8))
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes != storage.nbytes():
            raise TVToolError(f"{path}: corrupt legacy checkpoint (storage {key} size)")
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise TVToolError(f"{path}: truncated legacy checkpoint")
        if nbytes:
            view = torch.empty((0,), dtype=torch.uint8).set_(storage)
            view.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return obj


def load(path: str | Path):
    """Unpickle a ``torch.save`` file (zip, or the legacy format) with the restricted reader; raises
    :class:`UnsafePickle` or TVToolError."""
    path = Path(path)
    try:
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                return _load_legacy(path, f)
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkl = next((n for n in names if n.endswith("data.pkl") and n.count("/") == 1), None)
            if pkl is None:
                raise TVToolError(f"{path}: a zip file without data.pkl: not a torch checkpoint")
            prefix = pkl[: -len("data.pkl")]
            order = prefix + "byteorder"
            if order in names and zf.read(_member(zf, order, "byteorder", 64).filename).strip() not in (b"little", b""):
                raise TVToolError(f"{path}: a big-endian checkpoint; load it with torch on that machine and re-save")
            data = zf.read(_member(zf, pkl, "data.pkl", MAX_PICKLE_BYTES).filename)
            pickle_scan.check(data)
            budget = [0, 0]
            return RestrictedUnpickler(io.BytesIO(data), _zip_storages(zf, prefix, budget), budget).load()
    except (UnsafePickle, TVToolError):
        raise
    except (BadCheckpoint, pickle_scan.PickleShape) as exc:
        raise TVToolError(f"{path}: corrupt or hostile checkpoint: {exc}; refusing it") from None
    except KeyError as exc:
        raise TVToolError(f"{path}: corrupt checkpoint (missing record {brief(exc.args[0] if exc.args else '')})"
                          ) from None
    except RecursionError:
        raise TVToolError(f"{path}: nested too deeply to be a checkpoint; refusing it") from None
    except MemoryError:
        raise TVToolError(f"{path}: declares more data than fits in memory; the file is damaged or hostile") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, RuntimeError, OverflowError,
            struct.error, IndexError, zipfile.BadZipFile, zlib.error, UnicodeDecodeError, NotImplementedError) as exc:
        raise TVToolError(f"{path}: cannot be read as a torch checkpoint ({type(exc).__name__}: "
                          f"{_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    """An exception's message, bounded: its text when it is one (a pickled value in its args is never printed)."""
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else ""
    return (text.splitlines() or [""])[0][:160]


def _is_module_stub(obj) -> bool:
    return isinstance(obj, Stub) and isinstance(obj.__dict__.get("_parameters"), dict)


def _modules(obj, origin: str):
    """(dotted prefix, module stub) of a stubbed nn.Module tree, parents first in module order (a module shared
    by two parents under both names, as ``state_dict`` does). Walked without recursion; a pickle can loop or nest
    modules without end, or share them into exponentially many paths, so depth and visits are bounded."""
    stack = [(obj, "", 0)]
    visits = 0
    while stack:
        module, prefix, depth = stack.pop()
        visits += 1
        if depth > MAX_MODULE_DEPTH or visits > MAX_MODULE_VISITS:
            raise TVToolError(f"{origin}: modules nested over {MAX_MODULE_DEPTH} deep, in a loop or more than "
                              f"{MAX_MODULE_VISITS} of them; no model is, refusing it")
        yield prefix, module
        children = module.__dict__.get("_modules") or {}
        if not isinstance(children, dict):
            continue
        for name, child in reversed(list(children.items())):
            if _is_module_stub(child):
                if not isinstance(name, str):
                    raise TVToolError(f"{origin}: a module named {brief(name)}; names are text")
                stack.append((child, f"{prefix}{name}.", depth + 1))


def module_state_dict(obj, origin: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The state dict of a stubbed nn.Module tree: parameters and persistent buffers, dotted names, module order."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module in _modules(obj, origin):
        d = module.__dict__
        skip = d.get("_non_persistent_buffers_set")
        skip = skip if isinstance(skip, (set, frozenset)) else set()
        params, buffers = d.get("_parameters"), d.get("_buffers") or {}
        for name, t in list(params.items()) + [(n, b) for n, b in (buffers.items() if isinstance(buffers, dict)
                                                                     else ()) if n not in skip]:
            if isinstance(t, torch.Tensor):
                if not isinstance(name, str):
                    raise TVToolError(f"{origin}: a parameter named {brief(name)}; names are text")
                out[prefix + name] = t
    return out


def activation(obj, origin: str = "the checkpoint") -> bool | None:
    """Whether a stubbed module tree uses QuickGELU (True), GELU (False), or cannot tell (None): the class names
    of the pickled modules say what the weights' shapes cannot."""
    names = {type(module).__name__ for _, module in _modules(obj, origin)} if _is_module_stub(obj) else set()
    if "QuickGELU" in names:
        return True
    return False if "GELU" in names else None


def to_state_dict(obj, origin: str = "the checkpoint"):
    """A whole stubbed module becomes its state dict, as does a training checkpoint dict holding exactly one module
    beside non-tensor entries ({"epoch": 3, "model": ...}); anything else (dicts of tensors, ...) is returned as is."""
    if _is_module_stub(obj):
        return module_state_dict(obj, origin)
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        modules = [v for v in obj.values() if _is_module_stub(v)]
        if len(modules) == 1:
            return module_state_dict(modules[0], origin)
    return obj


# ------------------------------------------------------------------------------------------------ readers
def read_pickle(path: Path, trust_pickle: bool):
    """The unpickled object (stubs for every class not on the allow-list); full unpickling only as a fallback
    with ``trust_pickle``."""
    try:
        obj = load(path)
    except UnsafePickle as exc:
        if exc.final:
            raise TVToolError(f"{path}: refused: {exc}, which a checkpoint never needs (nothing was run); this file "
                              "may be malicious") from None
        if not trust_pickle:
            raise TVToolError(f"{path}: refused: {exc} (nothing was run); pass --trust-pickle only if you trust its "
                              "source") from None
        obj = _full_unpickle(path)
    except TVToolError:
        if not trust_pickle:
            raise
        obj = _full_unpickle(path)
    return obj


def load_pickle(path: Path, trust_pickle: bool, *, strip_prefixes: bool = True, obj=None) -> dict[str, torch.Tensor]:
    """A pickled checkpoint's state dict, read by the restricted unpickler, which runs nothing from the file. Only
    when it refuses and ``trust_pickle`` is set is the file fully unpickled. ``obj``: the already unpickled object,
    if the caller has it."""
    if obj is None:
        obj = read_pickle(path, trust_pickle)
    if tangent.is_linearized(obj):
        raise TVToolError(f"{path}: a tangent_task_arithmetic linearized checkpoint (a task vector, not weights); "
                          f"read it with `tvtool convert {path} -o VECTOR.safetensors`")
    state = _normalize_state_dict(to_state_dict(obj, str(path)), str(path))
    return _strip_wrapper_prefix(state) if strip_prefixes else state


def open_pickle(path: Path, trust_pickle: bool, describe: dict) -> WeightSource:
    """A pickle as a WeightSource; a pickled module's class names tell QuickGELU from GELU, which the recorded
    architecture needs and the shapes cannot show."""
    obj = read_pickle(path, trust_pickle)
    quick = activation(obj, str(path))
    state = load_pickle(path, trust_pickle, obj=obj)
    if quick is not None:
        describe["model"] = infer(state.keys(), lambda k: tuple(state[k].shape), quick_gelu=quick)[0]
    return WeightSource.from_state_dict(state, describe)


def _full_unpickle(path: Path):
    print(f"tvtool: --trust-pickle: fully unpickling {path}, which runs code from the file", file=sys.stderr,
          flush=True)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise TVToolError(f"{path}: cannot be loaded as a torch checkpoint ({type(exc).__name__}: "
                          f"{_first_line(exc)})") from None
    return obj.state_dict() if isinstance(obj, torch.nn.Module) else obj


def _normalize_state_dict(obj, origin: str) -> dict[str, torch.Tensor]:
    """Accept a state dict, {"state_dict": ...}, or a whole nn.Module; strip DDP / wrapper prefixes."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TVToolError(f"{origin}: does not hold a state dict of tensors")
    bad = next((k for k in obj if not isinstance(k, str)), None)
    if bad is not None:
        raise TVToolError(f"{origin}: a tensor named {brief(bad)}; a state dict names its tensors with text")
    state = dict(obj)
    for prefix in ("module.", "model."):  # DDP, and the task_vectors ImageEncoder wrapper
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _strip_wrapper_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Nested wrappers (e.g. a classifier holding ``image_encoder.model``): keep the CLIP under its one prefix."""
    if not state or any(k.startswith("visual.") for k in state):
        return state
    prefixes = {k[: k.index("visual.")] for k in state if ".visual." in k and k.index("visual.") > 0
                and k[k.index("visual.") - 1] == "."}
    if len(prefixes) != 1:
        return state
    (prefix,) = prefixes
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
