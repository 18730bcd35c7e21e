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
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import torch

from ..errors import TVToolError

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


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    data, dtype = storage
    t = torch.empty((0,), dtype=dtype)
    return t.set_(data, storage_offset, torch.Size(size), tuple(stride))


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
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise UnsafePickle(f"_codecs.encode with encoding {encoding!r}")
    return str(text).encode(encoding, errors)


def _reconstructor(cls, base, state):
    # copyreg._reconstructor: protocol 0/1 spelling of "make an instance of cls"; only stubs are ever built.
    if not (isinstance(cls, type) and issubclass(cls, Stub)):
        raise UnsafePickle(f"copyreg._reconstructor of {cls!r}")
    obj = cls.__new__(cls)
    if state is not None:
        obj.__setstate__(state)
    return obj


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
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
    qual = f"{module}.{name}"
    if _looks_like_function(name) and (module, name) not in _INERT:
        # Referencing a function is harmless (transforms keep some as attributes); calling one is refused.
        def refuse(cls, *args, **kwargs):
            raise UnsafePickle(f"it calls {qual}")

        return type(name, (Stub,), {"_stub_name": qual, "__new__": refuse, "__module__": "tvtool.stub"})
    return type(name, (Stub,), {"_stub_name": qual, "__module__": "tvtool.stub"})


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storages):
        super().__init__(file)
        self._storages = storages
        self._stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        # Protocol 0-2 pickles spell Python 2 names ('commands' for subprocess, '__builtin__'): map them exactly as
        # pickle's own fix_imports does, so the checks below see the module that would really be imported.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        root = module.split(".")[0]
        if root in _DANGEROUS_ROOTS or module in _DANGEROUS_ROOTS:
            raise UnsafePickle(f"it names {module}.{name}", final=True)
        key = (module, name)
        if key not in self._stubs:
            self._stubs[key] = _make_stub(module, name)
        return self._stubs[key]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")):
            raise UnsafePickle(f"unknown persistent id {str(pid)[:60]}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickle("a storage of unknown type")
        return self._storages(key), storage_type.dtype


def _zip_storages(zf: zipfile.ZipFile, prefix: str):
    cache: dict[str, torch.UntypedStorage] = {}

    def get(key: str) -> torch.UntypedStorage:
        if key not in cache:
            raw = bytearray(zf.read(f"{prefix}data/{key}"))
            cache[key] = torch.frombuffer(raw, dtype=torch.uint8).untyped_storage() if raw else torch.UntypedStorage(0)
        return cache[key]

    return get


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's legacy (pre-1.6, non-zip) serialization


class _LegacyUnpickler(RestrictedUnpickler):
    """Legacy files name each storage by (type, key, location, numel, view): storages are allocated here and their
    bytes, which follow the pickles in the file, filled in afterwards."""

    def __init__(self, file, storages: dict):
        super().__init__(file, None)
        self._legacy = storages

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise UnsafePickle(f"unknown persistent id {str(pid)[:60]}")
        kind = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":  # ('module', class, source file, source): only the (stub) class matters
            return pid[1]
        if kind != "storage" or len(pid) != 6 or not isinstance(pid[1], _StorageType):
            raise UnsafePickle(f"unknown persistent id {str(pid)[:60]}")
        storage_type, key, _, numel, view = pid[1:]
        dtype = storage_type.dtype
        size = torch.empty((), dtype=dtype).element_size()
        if key not in self._legacy:
            self._legacy[key] = (torch.UntypedStorage(int(numel) * size), dtype)
        root = self._legacy[key][0]
        if view is not None:
            _, offset, view_numel = view
            return root[int(offset) * size: (int(offset) + int(view_numel)) * size], dtype
        return root, dtype


def _load_legacy(path: Path, f):
    def plain():
        return RestrictedUnpickler(f, None).load()

    if plain() != _LEGACY_MAGIC:
        raise TVToolError(f"{path}: not a torch checkpoint (neither a zip archive nor torch's legacy format)")
    plain()  # protocol version
    info = plain()
    if isinstance(info, dict) and info.get("little_endian") is False:
        raise TVToolError(f"{path}: a big-endian checkpoint; load it with torch on that machine and re-save")
    storages: dict = {}
    obj = _LegacyUnpickler(f, storages).load()
    for key in plain():
        storage, dtype = storages[str(key)] if str(key) in storages else storages[key]
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
            if order in names and zf.read(order).strip() not in (b"little", b""):
                raise TVToolError(f"{path}: a big-endian checkpoint; load it with torch on that machine and re-save")
            return RestrictedUnpickler(io.BytesIO(zf.read(pkl)), _zip_storages(zf, prefix)).load()
    except (UnsafePickle, TVToolError):
        raise
    except KeyError as exc:
        raise TVToolError(f"{path}: corrupt checkpoint (missing record {exc})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, RuntimeError,
            struct.error, IndexError) as exc:
        raise TVToolError(f"{path}: cannot be read as a torch checkpoint ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None


def _is_module_stub(obj) -> bool:
    return isinstance(obj, Stub) and isinstance(obj.__dict__.get("_parameters"), dict)


def module_state_dict(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of a stubbed nn.Module tree: parameters and persistent buffers, dotted names, module order."""
    out: dict[str, torch.Tensor] = {}
    d = obj.__dict__
    skip = d.get("_non_persistent_buffers_set") or set()
    for name, t in list(d.get("_parameters", {}).items()) + [
            (n, b) for n, b in (d.get("_buffers") or {}).items() if n not in skip]:
        if isinstance(t, torch.Tensor):
            out[prefix + name] = t
    for name, child in (d.get("_modules") or {}).items():
        if _is_module_stub(child):
            out.update(module_state_dict(child, f"{prefix}{name}."))
    return out


def activation(obj) -> bool | None:
    """Whether a stubbed module tree uses QuickGELU (True), GELU (False), or cannot tell (None): the class names
    of the pickled modules say what the weights' shapes cannot."""
    names: set[str] = set()
    seen: set[int] = set()

    def walk(o):
        if id(o) in seen or not _is_module_stub(o):
            return
        seen.add(id(o))
        names.add(type(o).__name__)
        for child in (o.__dict__.get("_modules") or {}).values():
            walk(child)

    walk(obj)
    if "QuickGELU" in names:
        return True
    return False if "GELU" in names else None


def to_state_dict(obj):
    """A whole stubbed module becomes its state dict, as does a training checkpoint dict holding exactly one module
    beside non-tensor entries ({"epoch": 3, "model": ...}); anything else (dicts of tensors, ...) is returned as is."""
    if _is_module_stub(obj):
        return module_state_dict(obj)
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        modules = [v for v in obj.values() if _is_module_stub(v)]
        if len(modules) == 1:
            return module_state_dict(modules[0])
    return obj


# ------------------------------------------------------------------------------ numpy-only pickles (dataset files)
# Dataset files that are pickles (CIFAR's python batches: dicts of a uint8 array, lists of labels and file names)
# need nothing but plain containers and numpy arrays. This reader resolves exactly the globals numpy's own pickles
# name and nothing else: no stubs, no flag to widen it. The arrays' dtypes are rebuilt here from their type string
# (only numbers: no object arrays, whose items would be arbitrary objects, no structured types), and every array is
# checked against the bytes the pickle really holds before numpy sees it.
_NUMPY_KINDS = "biufc"


class _Dtype:
    """numpy.dtype as a pickle spells it (``dtype('u1', False, True)`` + state): recorded, built by us on use."""

    def __init__(self, spec, align=False, copy=False):
        if not isinstance(spec, str) or len(spec) > 8:
            raise UnsafePickle("a numpy dtype that is not a plain number type")
        self.spec, self.order = spec, "|"

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "="):
            self.order = state[1]

    def resolve(self):
        import numpy as np

        try:
            dt = np.dtype(self.spec)
        except TypeError:
            raise UnsafePickle(f"numpy dtype {self.spec[:8]!r}") from None
        if dt.kind not in _NUMPY_KINDS or dt.fields is not None or dt.hasobject or dt.subdtype is not None:
            raise UnsafePickle(f"numpy dtype {self.spec[:8]!r} (only numbers are read)")
        return dt.newbyteorder(self.order) if self.order in "<>" else dt


def _np_shape(shape) -> tuple:
    if not isinstance(shape, tuple) or len(shape) > 32 or not all(type(d) is int and d >= 0 for d in shape):
        raise UnsafePickle("a numpy array with a malformed shape")
    return shape


def _np_numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _np_buffer(data) -> bytes:
    if isinstance(data, str):  # Python 2 pickles of arrays read with encoding="latin1"
        data = data.encode("latin1")
    if isinstance(data, pickle.PickleBuffer):
        data = data.raw()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UnsafePickle("a numpy array whose data is not bytes")
    return data


def _np_array(dtype, shape, data, fortran=False):
    import numpy as np

    if not isinstance(dtype, _Dtype):
        raise UnsafePickle("a numpy array without a plain dtype")
    dt, shape, buf = dtype.resolve(), _np_shape(shape), _np_buffer(data)
    if len(buf) != _np_numel(shape) * dt.itemsize:  # numpy would copy first; a lie costs nothing here
        raise UnsafePickle(f"a numpy array of shape {shape} with {len(buf)} bytes of data")
    return np.frombuffer(buf, dtype=dt).reshape(shape, order="F" if fortran else "C").copy()


class _ArrayUnderConstruction:
    """``_reconstruct(ndarray, (0,), b'b')`` then BUILD with (version, shape, dtype, fortran, data): the array is
    made from the checked state, by :func:`_np_array`; ``load_numpy`` swaps these for the arrays."""

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafePickle("a numpy array with a malformed state")
        shape, dtype, fortran, data = state[-4:]
        self.array = _np_array(dtype, shape, data, bool(fortran))


_NDARRAY = object()  # what "numpy.ndarray" resolves to: only ever an argument of _reconstruct


def _np_reconstruct(cls, shape, typecode):
    if cls is not _NDARRAY:
        raise UnsafePickle("numpy _reconstruct of something other than an ndarray")
    return _ArrayUnderConstruction()


def _np_frombuffer(buf, dtype, shape, order):
    return _np_array(dtype, shape, buf, order == "F")


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, _Dtype):
        raise UnsafePickle("a numpy scalar without a plain dtype")
    arr = _np_array(dtype, (), data if data is not None else b"")
    return arr[()]


_NUMPY_ALLOWED = {
    **{(m, "_reconstruct"): _np_reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _np_scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _np_frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Dtype,
    ("_codecs", "encode"): _codecs_encode,
}


class NumpyUnpickler(pickle.Unpickler):
    """Plain containers, numbers, text and numpy number arrays; any other global refuses the whole file."""

    def find_class(self, module: str, name: str):
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        found = _NUMPY_ALLOWED.get((module, name))
        if found is None:
            raise UnsafePickle(f"it names {module[:60]}.{name[:60]}", final=True)
        return found

    def persistent_load(self, pid):
        raise UnsafePickle("a persistent id (not a plain data pickle)", final=True)


def _swap_arrays(obj, depth: int = 0):
    """Replace the arrays under construction by their arrays, in dicts, lists and tuples (built by the loader,
    so bounded by the file; shared containers are visited once)."""
    seen: set[int] = set()
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, dict):
            for k, v in o.items():
                if isinstance(v, _ArrayUnderConstruction):
                    o[k] = v.array
                elif isinstance(v, (dict, list)):
                    stack.append(v)
        elif isinstance(o, list):
            for i, v in enumerate(o):
                if isinstance(v, _ArrayUnderConstruction):
                    o[i] = v.array
                elif isinstance(v, (dict, list)):
                    stack.append(v)
    return obj.array if isinstance(obj, _ArrayUnderConstruction) else obj


def load_numpy(path: str | Path, *, limit: int = 1 << 31):
    """Unpickle a data file (CIFAR's batches) that may hold only plain containers and numpy number arrays.

    The file is read whole first (a regular file of at most ``limit`` bytes, never a FIFO), so no length declared
    inside the pickle can make the reader allocate more than the file holds. Raises TVToolError naming the file
    (what it refused, in a few words, never the pickled values themselves)."""
    from ..fileio import open_input

    path = Path(path)
    with open_input(path, "a pickled data file") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise TVToolError(f"{path}: {size} bytes is more than a pickled data file can be ({limit})")
        data = f.read(size)  # read(n) allocates n bytes up front: ask for what the file holds, not the limit
    try:
        # latin1: the CIFAR files are Python 2 pickles; their str objects are bytes (array data) or ASCII text
        return _swap_arrays(NumpyUnpickler(io.BytesIO(data), encoding="latin1").load())
    except UnsafePickle as exc:
        raise TVToolError(f"{path}: refused: {exc}; a data file is read as plain arrays and lists only, and this "
                          "one asks for more. Re-download it from the dataset's own site") from None
    except RecursionError:
        raise TVToolError(f"{path}: nested too deeply to be a data file; re-download it") from None
    except MemoryError:
        raise TVToolError(f"{path}: declares more data than fits in memory; re-download it") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            struct.error, UnicodeDecodeError, OverflowError) as exc:
        raise TVToolError(f"{path}: not a readable data pickle ({type(exc).__name__}: "
                          f"{(str(exc).splitlines() or [''])[0][:120]}); re-download it") from None
