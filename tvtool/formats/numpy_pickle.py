"""Data files that are pickles, read without running anything: plain containers and numpy number arrays only.

CIFAR's python batches (``data_batch_*``, ``test_batch``, ``train``, ``test``, ``meta``) are pickled dicts of a uint8
array, lists of labels and file names. This reader resolves exactly the globals numpy's own pickles name (array and
scalar reconstruction, dtypes) and refuses every other global, so a crafted file cannot run code; there is no flag
to widen it. Array dtypes are rebuilt here from their type string (numbers only: no object arrays, whose items
would be arbitrary objects, no structured types), and every array is checked against the bytes the pickle really
holds before numpy sees it. The file is read whole first, from a regular file of bounded size.

It sits beside ``safe_pickle`` (the checkpoint pickles, which need torch) but imports neither torch nor any model
code: the dataset layer may use it (docs/ARCHITECTURE.md, foundation layer).
"""
from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import struct
from pathlib import Path

from ..errors import TVToolError
from . import pickle_scan


class UnsafePickle(Exception):
    """The pickle asked for something this reader will not do (never widened: data files need nothing more)."""


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # How protocol-2 pickles spell bytes (array data); only text encodings.
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise UnsafePickle(f"_codecs.encode with encoding {str(encoding)[:20]!r}")
    return str(text).encode(encoding, errors)


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
            raise UnsafePickle(f"it names {module[:60]}.{name[:60]}")
        return found

    def persistent_load(self, pid):
        raise UnsafePickle("a persistent id (not a plain data pickle)")


def _swap_arrays(obj):
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
        pickle_scan.check(data)  # no billion laughs, no nesting that crashes the interpreter (see there)
        # latin1: the CIFAR files are Python 2 pickles; their str objects are bytes (array data) or ASCII text
        return _swap_arrays(NumpyUnpickler(io.BytesIO(data), encoding="latin1").load())
    except pickle_scan.PickleShape as exc:
        raise TVToolError(f"{path}: refused: {exc}; re-download it from the dataset's own site") from None
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
