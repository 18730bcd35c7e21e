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

Every pickle tvtool reads goes through this module: :func:`read_pickle` (the object; full unpickling only as the
announced ``--trust-pickle`` fallback), :func:`load_pickle` (its state dict) and :func:`open_pickle` (a WeightSource).
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import torch

from ..errors import TVToolError
from ..weight_source import WeightSource
from . import tangent
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
    state = _normalize_state_dict(to_state_dict(obj), str(path))
    return _strip_wrapper_prefix(state) if strip_prefixes else state


def open_pickle(path: Path, trust_pickle: bool, describe: dict) -> WeightSource:
    """A pickle as a WeightSource; a pickled module's class names tell QuickGELU from GELU, which the recorded
    architecture needs and the shapes cannot show."""
    obj = read_pickle(path, trust_pickle)
    quick = activation(obj)
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
        raise TVToolError(f"{path}: cannot be loaded as a torch checkpoint ({type(exc).__name__}: {exc})") from None
    return obj.state_dict() if isinstance(obj, torch.nn.Module) else obj


def _normalize_state_dict(obj, origin: str) -> dict[str, torch.Tensor]:
    """Accept a state dict, {"state_dict": ...}, or a whole nn.Module; strip DDP / wrapper prefixes."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TVToolError(f"{origin}: does not hold a state dict of tensors")
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
