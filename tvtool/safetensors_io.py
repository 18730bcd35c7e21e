"""The safetensors format itself: reading and validating files, writing them, dtype codes and array conversions, and
the fingerprint that identifies a set of weights.

Everything above this module (weight sources, checkpoint formats, task vectors) reads and writes safetensors through
it. It needs only numpy: ``import torch`` costs seconds of start-up, so torch is loaded only by the code paths that
hand out tensors (``SafetensorsFile.get``, the torch <-> code tables, conversions of torch tensors).

The fingerprint identifies the *image tower* a task vector was taken against: only ``visual.*`` tensors count
(the published checkpoints drop the text tower), dtype does not (an fp16 file and its fp32 upcast agree), and it
reads a fixed strided sample of each tensor so that it costs milliseconds, not a pass over the whole model.
"""
from __future__ import annotations

import collections
import hashlib
import json
import mmap
import os
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from ._lazy import lazy_module
from .errors import TVToolError, brief
from .fileio import atomic_path, open_input

torch = lazy_module("torch")

# safetensors dtype codes: numpy storage (bf16 is kept as its raw uint16 bits) and item sizes
NP_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
ITEMSIZE = {code: np.dtype(t).itemsize for code, t in NP_DTYPES.items()}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})


_TORCH_TABLES: list = []  # [{code: torch dtype}, {torch dtype: code}], built on first use


def _torch_tables() -> tuple[dict, dict]:
    if not _TORCH_TABLES:
        st = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
        _TORCH_TABLES.extend([st, {v: k for k, v in st.items()}])
    return _TORCH_TABLES[0], _TORCH_TABLES[1]


def torch_dtype(code: str):
    """The torch dtype of a safetensors dtype code (imports torch)."""
    return _torch_tables()[0][code]


def torch_code(dtype) -> str:
    """The safetensors dtype code of a torch dtype."""
    return _torch_tables()[1][dtype]


# --dtype names -> safetensors codes
DTYPE_CODES = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}
# elements per block of the streaming arithmetic: 512 KiB of fp32, so the accumulator and one converted input
# stay in the CPU's L2 cache while every input streams through once
BLOCK = 1 << 17
# The metadata entry holding tvtool's JSON document (task vectors, models written by `apply`).
META_KEY = "tvtool"
FINGERPRINT_SAMPLES = 1024
_MAX_HEADER = 100 * 1024 * 1024


# --------------------------------------------------------------------------------------------------- reading
class SafetensorsFile:
    """A read-only, memory-mapped safetensors file. ``get`` returns zero-copy views of the mapping.

    Written here rather than taken from ``safetensors.safe_open`` because streaming operations need views that
    cost no copy and pages that can be released (``release``) once a tensor is done, so resident memory stays
    near one tensor per input however large the files are.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open_input(self.path, "a safetensors file")  # refuses FIFOs / devices / folders at once
        try:
            self._entries, self.metadata, self._data_start = _read_header(self._file, self.path)
            size = os.fstat(self._file.fileno()).st_size
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
        except OSError as exc:
            self._file.close()
            raise TVToolError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        except BaseException:
            self._file.close()
            raise

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def code(self, key: str) -> str:
        """The safetensors dtype code ("F32", "BF16", ...)."""
        return self._entries[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return torch_dtype(self._entries[key][0])

    def _check_size(self, key: str, end: int) -> None:
        """Before handing out a view: the file must still hold the tensor. Reading a mapped page past the end of a
        file that shrank since it was mapped is SIGBUS, which no Python code can catch: the process dies, leaving
        its temp output behind. (A file truncated *while* a tensor is being read still faults; nothing short of
        copying every byte through read() closes that window.)"""
        size = os.fstat(self._file.fileno()).st_size
        if size < self._data_start + end:
            raise TVToolError(f"{self.path}: changed while being read (now {size} bytes, tensor {brief(key)} ends at "
                              f"byte {self._data_start + end}); was it overwritten or truncated? Try again once it "
                              "is complete")

    def array(self, key: str) -> np.ndarray:
        """A read-only zero-copy numpy view of the tensor (bf16 as its raw uint16 bits)."""
        code, shape, begin, end = self._entries[key]
        if end == begin:
            return np.empty(shape, dtype=NP_DTYPES[code])
        self._check_size(key, end)
        return np.frombuffer(self._mm, dtype=NP_DTYPES[code], count=(end - begin) // ITEMSIZE[code],
                             offset=self._data_start + begin).reshape(shape)

    def get(self, key: str) -> torch.Tensor:
        """A read-only zero-copy view of the tensor (copy it before modifying in place)."""
        code, shape, begin, end = self._entries[key]
        dtype = self.dtype(key)
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        self._check_size(key, end)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "buffer is not writable": we never write through these views
            flat = torch.frombuffer(self._mm, dtype=dtype, count=(end - begin) // ITEMSIZE[code],
                                    offset=self._data_start + begin)
        return flat.view(shape)

    def release(self, key: str) -> None:
        """Drop this tensor's pages from our resident set (they stay in the page cache)."""
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, _, begin, end = self._entries[key]
        page = mmap.PAGESIZE
        start = (self._data_start + begin) // page * page
        length = self._data_start + end - start
        if length > 0:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, start, length)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        # Views handed out by get() keep the mapping alive; closing it under them would be a use-after-free,
        # so the mapping is closed only when nothing references it (mmap raises BufferError otherwise).
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _reject_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _DuplicateKey(ValueError):
    pass


def _read_header(f, path: Path):
    """Parse and validate a safetensors header the way the safetensors library does.

    Checks: header length bounded and inside the file; UTF-8 JSON object without duplicate keys; string-to-string
    ``__metadata__``; every tensor a known dtype, a shape of non-negative integers and ``[begin, end]`` offsets whose
    span is exactly numel x itemsize; sorted by offset the tensors are contiguous from 0 (no gap, no overlap) and
    end exactly where the file ends.
    Returns ({key: (dtype, shape, begin, end)} in header order, metadata, data start).
    """
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        raise TVToolError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", head)
    if n == 0 or n > _MAX_HEADER or 8 + n > size:
        raise TVToolError(f"{path}: not a safetensors file, or truncated (bad header length)")
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as exc:
        raise TVToolError(f"{path}: corrupt safetensors header (key {brief(exc.args[0])} appears twice)") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise TVToolError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise TVToolError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TVToolError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for key, info in header.items():
        bad = f"{path}: corrupt safetensors header at tensor {brief(key)}"
        if not isinstance(info, dict):
            raise TVToolError(bad)
        dtype = info.get("dtype")
        if not isinstance(dtype, str) or dtype not in NP_DTYPES:
            raise TVToolError(f"{bad} (unknown dtype {brief(info.get('dtype'))})")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_uint(s) for s in shape):
            raise TVToolError(f"{bad} (shape must be a list of non-negative integers, got {brief(shape)})")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(x) for x in offsets):
            raise TVToolError(f"{bad} (data_offsets must be two non-negative integers, got {brief(offsets)})")
        begin, end = offsets
        numel = 1
        for s in shape:
            numel *= s
        if end < begin or end - begin != numel * ITEMSIZE[dtype]:
            raise TVToolError(f"{bad} (offsets span {end - begin} bytes, shape and dtype need "
                              f"{numel * ITEMSIZE[dtype]})")
        entries[key] = (dtype, tuple(shape), begin, end)
    expected = 0
    for key, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != expected:
            what = "overlaps another tensor" if begin < expected else "leaves a gap before it"
            raise TVToolError(f"{path}: corrupt safetensors header (tensor {brief(key)} {what})")
        expected = end
    data_start = 8 + n
    if data_start + expected != size:
        if data_start + expected > size:
            raise TVToolError(f"{path}: truncated file ({size} bytes, header needs {data_start + expected})")
        raise TVToolError(f"{path}: corrupt safetensors file ({size - data_start - expected} bytes after the last "
                          "tensor)")
    return entries, metadata, data_start


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


# --------------------------------------------------------------------------------------------------- dtypes
def dtype_code(dtype) -> str | None:
    """None, a --dtype name ("fp16"), a safetensors code ("F16") or a torch dtype -> the safetensors code."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype in DTYPE_CODES:
            return DTYPE_CODES[dtype]
        if dtype in NP_DTYPES:
            return dtype
        raise TVToolError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CODES)}")
    return torch_code(dtype)


def finite_array(a: np.ndarray, code: str) -> bool:
    """True unless a floating array holds NaN or inf. A sum is one cheap pass and is non-finite whenever an
    element is (or, rarely, on overflow: then the exact elementwise check decides)."""
    if code not in FLOAT_CODES or not a.size:
        return True
    if code == "BF16":  # raw bits: non-finite exactly when every exponent bit is set
        flat = a.reshape(-1)
        for s in range(0, flat.size, BLOCK):
            if np.any(np.bitwise_and(flat[s:s + BLOCK], 0x7F80) == 0x7F80):
                return False
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.sum(a, dtype=np.float64 if code == "F64" else np.float32))) or \
            bool(np.isfinite(a).all())


def tensor_to_array(t) -> tuple[np.ndarray, str]:
    """A torch tensor as (numpy array on the CPU, safetensors code); bf16 becomes its raw uint16 bits."""
    t = t.detach().to("cpu").contiguous()
    code = torch_code(t.dtype)
    if code == "BF16":
        return t.view(torch.int16).numpy().view(np.uint16), code
    return t.numpy(), code


def array_to_tensor(a: np.ndarray, code: str):
    """The inverse of :func:`tensor_to_array`: a torch tensor sharing ``a``'s memory where it can (never written
    through: read-only mmap views are fine)."""
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)  # (not unconditionally: it turns a 0-d array into 1-d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "array is not writable"
        if code == "BF16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)


def to_float32(a: np.ndarray, code: str, out: np.ndarray | None = None) -> np.ndarray:
    """Values as float32 (exact for bf16 / fp16); ``out`` (same size) avoids an allocation."""
    if code == "BF16":
        wide = np.left_shift(a, 16, dtype=np.uint32, out=None if out is None else out.view(np.uint32))
        return wide.view(np.float32)
    if out is None:
        return a.astype(np.float32, copy=False)
    np.copyto(out, a, casting="unsafe")
    return out


def from_float32(x: np.ndarray, code: str, out: np.ndarray | None = None) -> np.ndarray:
    """float32 values stored as ``code``: round to nearest even, as torch converts (bf16 via its bit pattern)."""
    if code == "BF16":
        u = x.view(np.uint32)
        r = np.right_shift(u, 16)
        r &= 1
        r += 0x7FFF
        r += u  # + 0x7FFF + lowest kept bit, then truncate: round half to even (NaN is refused before this)
        r >>= 16
        if out is None:
            return r.astype(np.uint16)
        np.copyto(out, r, casting="unsafe")
        return out
    if out is None:
        return x.astype(NP_DTYPES[code], copy=False)
    np.copyto(out, x, casting="unsafe")
    return out


# --------------------------------------------------------------------------------------------------- writing
def _header_bytes(specs: Mapping[str, tuple[str, tuple]], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key, (code, shape) in specs.items():
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * ITEMSIZE[code]
        header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as safetensors writes it
    return raw


def spec_codes(specs: Mapping[str, tuple]) -> dict[str, tuple[str, tuple]]:
    """Specs with torch dtypes, --dtype names or safetensors codes -> specs with codes."""
    return {k: (dtype_code(d), tuple(int(x) for x in s)) for k, (d, s) in specs.items()}


def _as_array(value, code: str) -> np.ndarray:
    """A torch tensor or numpy array as a numpy array stored as ``code`` (bf16: uint16 bits), converting via fp32
    with torch's rounding (round half to even)."""
    if isinstance(value, np.ndarray):
        a, src = value, None
    else:
        a, src = tensor_to_array(value)
    if a.dtype == NP_DTYPES[code] and (src is None or src == code):
        return a
    if code not in FLOAT_CODES:
        return a.astype(NP_DTYPES[code])
    if src is None:
        src = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64"}.get(a.dtype)
        if src is None:
            src, a = "F32", a.astype(np.float32)
    if code == "F64":
        return to_float32(a, src).astype(np.float64) if src != "F64" else a
    with np.errstate(over="ignore", invalid="ignore"):
        return from_float32(a.astype(np.float32) if src == "F64" else to_float32(a, src), code)


def write_safetensors(path: str | os.PathLike, items: Iterable[tuple[str, object]],
                      specs: Mapping[str, tuple], metadata: dict,
                      *, force: bool = False, fingerprint_key: str | None = None,
                      check_finite: bool = True, explain_non_finite: Callable[[str], None] | None = None,
                      recycle: Callable[[np.ndarray], None] | None = None) -> str:
    """Stream tensors (torch tensors or numpy arrays) into a safetensors file atomically; returns the content
    fingerprint.

    ``specs`` (key -> (dtype, shape); dtype a torch dtype, a --dtype name or a safetensors code) fixes the header up
    front so tensors can be written as they are produced. Every floating tensor is checked for NaN / inf as it is
    written, after the conversion to its output dtype; ``explain_non_finite(key)`` may raise a more precise error
    (which input holds the NaN); ``recycle(array)`` is called once an array has been written (buffer reuse). If
    ``fingerprint_key`` names a field of the JSON document under
    ``metadata[META_KEY]``, the content fingerprint is filled in there once every tensor has been written (it has a
    fixed length, so the header keeps its size).
    """
    specs = spec_codes(specs)
    meta = dict(metadata)
    doc = json.loads(meta[META_KEY]) if META_KEY in meta else None
    if fingerprint_key and doc is not None:
        doc[fingerprint_key] = FINGERPRINT_PLACEHOLDER
        meta[META_KEY] = json.dumps(doc)
    header = _header_bytes(specs, meta)
    digests: dict[str, bytes] = {}
    with atomic_path(path, force) as tmp, open(tmp, "wb") as f, ThreadPoolExecutor(1) as writer:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        done = set()
        # Writing overlaps with producing the next tensor (both release the GIL); at most two tensors wait, so
        # memory stays bounded.
        pending: collections.deque = collections.deque()
        for key, value in items:
            code, shape = specs[key]
            if tuple(value.shape) != shape:
                raise TVToolError(f"tensor {key}: shape {tuple(value.shape)} differs from {shape}")
            a = np.ascontiguousarray(_as_array(value, code))
            # checked on what is written, after the cast: large values overflow fp16 to inf
            if check_finite and not finite_array(a, code):
                cause = _non_finite_cause(key, value, a, code, explain_non_finite)
                raise TVToolError(f"tensor {key} has NaN or inf values{cause}; refusing to write {path}")
            if code in FLOAT_CODES:
                digests[key] = sample_digest(key, a, code)
            if a.size:
                pending.append(writer.submit(_write_array, f, a, recycle))
                while len(pending) > 2:
                    pending.popleft().result()
            done.add(key)
        while pending:
            pending.popleft().result()
        missing = [k for k in specs if k not in done]
        if missing:
            raise TVToolError(f"internal: tensors {missing[:3]} were never written")
        fp = combine_digests(digests) if digests else FINGERPRINT_PLACEHOLDER
        if fingerprint_key and doc is not None:
            doc[fingerprint_key] = fp
            meta[META_KEY] = json.dumps(doc)
            new_header = _header_bytes(specs, meta)
            assert len(new_header) == len(header)
            f.seek(8)
            f.write(new_header)
    return fp


_CODE_NAMES = {code: name for name, code in DTYPE_CODES.items()}


def _non_finite_cause(key, value, written: np.ndarray, code: str, explain) -> str:
    """Why a tensor about to be written is not finite: ``explain`` raises if an input holds the NaN / inf;
    otherwise the values were finite before the conversion to the output dtype and overflowed it."""
    name = _CODE_NAMES.get(code, code)
    if explain is not None:
        explain(key)
        return f" after conversion to {name} (values too large for it)" if code != "F32" else " (fp32 overflow)"
    if value is written:
        return ""
    before, before_code = (value, None) if isinstance(value, np.ndarray) else tensor_to_array(value)
    before_code = before_code or code_of(before)
    return f" after conversion to {name} (values too large for it)" if finite_array(before, before_code) else ""


def _write_array(f, a: np.ndarray, recycle) -> None:
    f.write(memoryview(a.reshape(-1)).cast("B"))
    if recycle is not None:
        recycle(a)



def code_of(value) -> str:
    if isinstance(value, np.ndarray):
        codes = {np.dtype(t): c for c, t in NP_DTYPES.items() if c != "BF16"}
        if value.dtype not in codes:
            raise TVToolError(f"internal: no safetensors dtype for numpy {value.dtype}")
        return codes[value.dtype]
    return dtype_code(value.dtype)


# --------------------------------------------------------------------------------------------------- fingerprints
def _sample_indices(n: int) -> np.ndarray:
    """Round(linspace(0, n-1, FINGERPRINT_SAMPLES)) computed exactly as torch.linspace does in float64 (the first
    half counted up from the start, the second half down from the end), so fingerprints never changed."""
    steps = FINGERPRINT_SAMPLES
    step = (n - 1) / (steps - 1)
    k = np.arange(steps, dtype=np.float64)
    values = np.where(k < steps // 2, step * k, (n - 1) - step * (steps - 1 - k))
    return np.rint(values).astype(np.int64)


def sample_digest(key: str, array: np.ndarray, code: str) -> bytes:
    """Digest of a floating tensor: key, shape and FINGERPRINT_SAMPLES strided values as float32."""
    flat = array.reshape(-1)
    if flat.size > FINGERPRINT_SAMPLES:
        flat = flat[_sample_indices(flat.size)]
    values = np.ascontiguousarray(to_float32(flat, code), dtype=np.float32).tobytes()
    h = hashlib.sha256()
    h.update(key.encode())
    h.update(repr(tuple(int(s) for s in array.shape)).encode())
    h.update(values)
    return h.digest()


def _sample_digest(key: str, tensor) -> bytes:
    array, code = tensor_to_array(tensor)
    return sample_digest(key, array, code)


def combine_digests(digests: Mapping[str, bytes]) -> str:
    h = hashlib.sha256()
    for key in sorted(digests):
        h.update(digests[key])
    return "fp1:" + h.hexdigest()[:16]


FINGERPRINT_PLACEHOLDER = "fp1:" + "0" * 16


def fingerprint(source, *, visual_only: bool = True) -> str:
    """Deterministic, cheap identity of a set of weights (see module docstring).

    ``source`` is a WeightSource, a SafetensorsFile, or a plain mapping of tensors. With ``visual_only`` (the base
    model fingerprint) only ``visual.*`` floating tensors count when there are any.
    """
    keys = list(source.keys())
    if visual_only and any(k.startswith("visual.") for k in keys):
        keys = [k for k in keys if k.startswith("visual.")]
    digests = {}
    for k in keys:
        if hasattr(source, "array"):  # files: numpy views, no torch needed
            code = source.code(k)
            if code in FLOAT_CODES:
                digests[k] = sample_digest(k, source.array(k), code)
        else:
            t = source.get(k) if hasattr(source, "get") else source[k]
            if t.is_floating_point():
                digests[k] = _sample_digest(k, t)
    if not digests:
        raise TVToolError("cannot fingerprint weights with no floating-point tensors")
    return combine_digests(digests)
