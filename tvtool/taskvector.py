"""Task vectors as files: the format (docs/FORMAT.md), streaming reads and writes, and the arithmetic on them.

A task vector is a safetensors file whose tensor names are the base model's state-dict keys and whose
``__metadata__["tvtool"]`` holds a JSON document: format version, base model and its fingerprint, tasks,
fine-tuning mode, OrthoReg settings, metrics, and the history of operations that produced it.

Every operation streams tensor by tensor: inputs are memory-mapped, each output tensor is accumulated in fp32,
written, and its pages released before the next one, so resident memory stays near (inputs + 1) x the largest
tensor. Outputs are written to a temporary file beside the target and renamed into place only when complete.

The arithmetic runs on numpy views of the files, in cache-sized blocks (every input is read once, the fp32
accumulator stays in cache), so the file commands need no torch: it is imported only where tensors are handed out
(``TaskVectorFile.get``, ``to_dict``, torch dtypes) or where the weights come from torch (``ARCH:TAG`` bases,
pickles).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from . import __version__
from .checkpoints import open_weights
from .checks import check_alpha
from .errors import TVToolError, spell
from .fileio import parse_json
from .fileio import atomic_path, check_not_input, check_output  # noqa: F401  (re-exported: every writer uses them from here)
from .formats.arch import infer
from .safetensors_io import (
    BLOCK, FLOAT_CODES, ITEMSIZE, META_KEY, NP_DTYPES, SafetensorsFile, array_to_tensor, code_of, dtype_code,
    finite_array, fingerprint, from_float32, spec_codes, tensor_to_array, to_float32, torch, torch_dtype,
    write_safetensors,
)
from .weight_source import WeightSource

FORMAT = "tvtool.taskvector"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------- metadata
def new_meta(base: dict, *, tasks: Sequence[str] = (), mode: str | None = None, orthoreg: dict | None = None,
             history: list | None = None, **extra) -> dict:
    """The metadata document of a task vector (see docs/FORMAT.md)."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base": {"model": base.get("model"), "pretrained": base.get("pretrained"),
                 "fingerprint": base.get("fingerprint")},
        "tasks": list(tasks),
        "mode": mode,
        "orthoreg": orthoreg,
        "history": list(history or []),
    }
    meta.update(extra)
    return meta


def history_entry(op: str, **fields) -> dict:
    entry = {"op": op, **fields, "tvtool": __version__,
             "time": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()}
    return entry


def parse_dtype(name: str | None) -> torch.dtype | None:
    """A --dtype name as a torch dtype (imports torch; the file operations take the name itself)."""
    if name is None:
        return None
    return torch_dtype(dtype_code(name))


def all_finite(t) -> bool:
    """True unless a floating torch tensor holds NaN or inf."""
    if not t.is_floating_point() or not t.numel():
        return True
    a, code = tensor_to_array(t)
    return finite_array(a, code)


def _optional(kind):
    return lambda x: x is None or isinstance(x, kind)


def _str_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(i, str) for i in x)


def _history_ok(history, depth: int = 0) -> bool:
    """A list of operation objects; their ``inputs`` lists of objects whose own ``history`` is valid too."""
    if depth > 100 or not isinstance(history, list):
        return False
    for entry in history:
        if not isinstance(entry, dict) or not isinstance(entry.get("op", ""), str):
            return False
        inputs = entry.get("inputs", [])
        if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
            return False
        if not all(_history_ok(i.get("history", []), depth + 1) for i in inputs):
            return False
    return True


# field -> (check, what it must be); fields not listed here (metrics, train, ...) are free-form
_META_FIELDS = {
    "format": (lambda x: isinstance(x, str), "a string"),
    "format_version": (lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 1, "a positive integer"),
    "base": (_optional(dict), "an object or null"),
    "tasks": (lambda x: x is None or _str_list(x), "a list of strings"),
    "mode": (_optional(str), "a string or null"),
    "orthoreg": (_optional(dict), "an object or null"),
    "fingerprint": (_optional(str), "a string"),
    "history": (lambda x: x is None or _history_ok(x), "a list of operations (objects whose inputs are objects)"),
    "metrics": (_optional(dict), "an object or null"),
}
_BASE_FIELDS = ("model", "pretrained", "fingerprint")


def validate_meta(meta, path) -> None:
    """Raise a one-line TVToolError unless ``meta`` is a tvtool metadata document of the right JSON types."""
    if not isinstance(meta, dict):
        raise TVToolError(f"{path}: corrupt tvtool metadata (a JSON {type(meta).__name__}, expected an object)")
    if meta.get("format") != FORMAT:
        raise TVToolError(f"{path}: unknown format {meta.get('format')!r}")
    if "format_version" not in meta:
        raise TVToolError(f"{path}: corrupt tvtool metadata (no format_version)")
    for field, (ok, what) in _META_FIELDS.items():
        if field in meta and not ok(meta[field]):
            raise TVToolError(f"{path}: corrupt tvtool metadata ({field!r} must be {what}, got "
                              f"{json.dumps(meta[field])[:60]})")
    if meta["format_version"] > FORMAT_VERSION:
        raise TVToolError(f"{path}: format version {meta['format_version']} is newer than this tvtool understands "
                          f"({FORMAT_VERSION}); upgrade tvtool")
    for field in _BASE_FIELDS:
        value = (meta.get("base") or {}).get(field)
        if value is not None and not isinstance(value, str):
            raise TVToolError(f"{path}: corrupt tvtool metadata (base.{field} must be a string or null)")


# --------------------------------------------------------------------------------------------------- reading
class TaskVectorFile:
    """A task-vector file opened for lazy, memory-mapped reading."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = SafetensorsFile(self.path)
        raw = self._f.metadata.get(META_KEY)
        if raw is None:
            raise TVToolError(f"{self.path}: a safetensors file but not a tvtool task vector (no '{META_KEY}' "
                              "metadata); make one with `tvtool extract`")
        self.meta = parse_json(raw, f"{self.path}: corrupt tvtool metadata", "tvtool metadata")
        validate_meta(self.meta, self.path)
        self._finite: set[str] = set()

    def keys(self) -> list[str]:
        return self._f.keys()

    def __contains__(self, key):
        return key in self._f

    def __len__(self):
        return len(self._f)

    def shape(self, key):
        return self._f.shape(key)

    def dtype(self, key):
        """The torch dtype (imports torch); ``code`` gives the safetensors code without it."""
        return self._f.dtype(key)

    def code(self, key) -> str:
        return self._f.code(key)

    def check_finite(self, key: str) -> None:
        """Refuse (TVToolError naming file and tensor) a tensor holding NaN or inf: no computation should use it."""
        if key not in self._finite:
            if not finite_array(self._f.array(key), self._f.code(key)):
                raise TVToolError(f"{self.path}: tensor {key} holds NaN or inf values; this task vector is "
                                  "corrupt, re-create it")
            self._finite.add(key)

    def array(self, key: str, *, check: bool = True) -> np.ndarray:
        """Zero-copy read-only numpy view (bf16 as raw uint16 bits), refused if non-finite unless ``check=False``
        (for callers that check their result instead and call ``check_finite`` to name the culprit)."""
        if check:
            self.check_finite(key)
        return self._f.array(key)

    def get(self, key: str) -> torch.Tensor:
        """Zero-copy read-only torch view; ``.float()`` or ``.clone()`` before modifying. Refused if non-finite."""
        self.check_finite(key)
        return self._f.get(key)

    def release(self, key: str) -> None:
        self._f.release(key)

    @property
    def fingerprint(self) -> str:
        return self.meta.get("fingerprint") or "unknown"

    @property
    def base_fingerprint(self) -> str | None:
        return (self.meta.get("base") or {}).get("fingerprint")

    @property
    def tasks(self) -> list[str]:
        return list(self.meta.get("tasks") or [])

    def numel(self) -> int:
        total = 0
        for k in self.keys():
            n = 1
            for s in self.shape(k):
                n *= s
            total += n
        return total

    def to_dict(self, dtype="fp32") -> dict[str, torch.Tensor]:
        """Load everything as torch tensors (small vectors, notebooks, tests); streaming code uses ``get``.
        ``dtype``: a torch dtype or a --dtype name; None keeps each tensor's own."""
        dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        return {k: (self.get(k).to(dtype) if dtype else self.get(k).clone()) for k in self.keys()}

    def describe_input(self) -> dict:
        return {"path": self.path.name, "fingerprint": self.fingerprint, "tasks": self.tasks,
                "history": self.meta.get("history", [])}

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_vector(path: str | os.PathLike) -> TaskVectorFile:
    return TaskVectorFile(path)


def recorded_base_spec(vectors: Sequence[TaskVectorFile]) -> str | None:
    """The weights spec of the base the vectors record: its weights file or folder (recorded absolute), else
    ``ARCH:TAG``; None when they record none. Vectors recording different bases, or a file that is gone, are
    refused (pass the base explicitly)."""
    specs = {}
    for v in vectors:
        base = v.meta.get("base") or {}
        model, pre = base.get("model"), base.get("pretrained")
        if isinstance(pre, str) and os.path.isabs(pre):
            if not os.path.exists(pre):
                raise TVToolError(f"{v.path} records its base as {pre}, which no longer exists; pass "
                                  f"{spell('--pretrained', 'the base')} explicitly")
            spec = pre
        elif isinstance(pre, str) and pre.startswith("hf-hub:"):
            spec = pre
        elif isinstance(model, str) and model:
            spec = f"{model}:{pre}" if isinstance(pre, str) and pre else model
        else:
            continue
        specs.setdefault(spec, v.path)
    if len(specs) > 1:
        raise TVToolError(f"the vectors record different bases ({', '.join(sorted(specs))}); pass "
                          f"{spell('--pretrained', 'the base')} explicitly")
    return next(iter(specs), None)


def check_compatible(vectors: Sequence[TaskVectorFile], *, union: bool = False,
                     unknown_base_ok: bool = False) -> list[str]:
    """Raise TVToolError unless the vectors share a base, a tensor set (unless ``union``) and shapes.

    Every recorded base fingerprint must agree (with each other, not only with the first vector's). Under
    ``union`` the tensor sets differ, so nothing vouches that a vector recording no base fingerprint belongs to the
    base of the others: it is refused beside one that records a base, as ``apply`` refuses it (``unknown_base_ok``
    allows it, for read-only comparisons). Returns the output key order (the first vector's order, then keys only
    others have, under ``union``).
    """
    if not vectors:
        raise TVToolError("no task vectors given")
    first = vectors[0]
    known = [v for v in vectors if v.base_fingerprint]
    for v in known[1:]:
        a, b = known[0].base_fingerprint, v.base_fingerprint
        if a != b:
            raise TVToolError(f"{v.path} was taken against base {b} but {known[0].path} against {a}; task vectors "
                              "of different base models cannot be combined")
    if union and known and not unknown_base_ok:
        unknown = next((v for v in vectors if not v.base_fingerprint), None)
        if unknown is not None:
            raise TVToolError(f"{unknown.path} records no base fingerprint, so with --union (different tensor sets) "
                              f"nothing shows it belongs to the base of {known[0].path} "
                              f"({known[0].base_fingerprint}); extract it again against that base")
    keys = list(first.keys())
    seen = set(keys)
    for v in vectors[1:]:
        vk = set(v.keys())
        if vk != seen and not union:
            missing = sorted(seen - vk)[:3] or sorted(vk - seen)[:3]
            raise TVToolError(f"{v.path} and {first.path} hold different tensor sets (e.g. {missing[0]}); pass "
                              "--union to treat missing tensors as zero")
        for k in v.keys():
            if k not in seen:
                keys.append(k)
                seen.add(k)
    for k in keys:
        shapes = {tuple(v.shape(k)) for v in vectors if k in v}
        if len(shapes) > 1:
            raise TVToolError(f"tensor {k} has different shapes across inputs: {sorted(shapes)}")
    return keys


# --------------------------------------------------------------------------------------------------- writing
class BufferPool:
    """Output buffers of one size (the largest output tensor), reused once written: fresh memory for every
    tensor would cost a page fault per 4 KiB. At most (writes in flight + 1) buffers exist."""

    def __init__(self, specs: Mapping[str, tuple[str, tuple]]):
        self.nbytes = max((ITEMSIZE[c] * math.prod(shape) for c, shape in specs.values()), default=0)
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self, code: str, shape: tuple) -> np.ndarray:
        with self._lock:
            buf = self._free.pop() if self._free else None
        if buf is None:
            buf = np.empty(self.nbytes, np.uint8)
        n = math.prod(shape)
        return buf[: n * ITEMSIZE[code]].view(NP_DTYPES[code]).reshape(shape)

    def put(self, array: np.ndarray) -> None:
        root = array
        while isinstance(root.base, np.ndarray):
            root = root.base
        if root.dtype == np.uint8 and root.size == self.nbytes and root.flags.owndata:
            with self._lock:
                self._free.append(root)


def write_vector(path: str | os.PathLike, tensors: Mapping[str, object] | Iterable[tuple[str, object]],
                 meta: dict, *, specs: Mapping[str, tuple] | None = None, dtype=None, force: bool = False,
                 explain_non_finite: Callable[[str], None] | None = None,
                 recycle: Callable[[np.ndarray], None] | None = None) -> str:
    """Write a task-vector file (streaming when ``tensors`` is an iterator and ``specs`` is given).

    Tensors are torch tensors or numpy arrays; dtypes are torch dtypes, --dtype names or safetensors codes.
    Returns the vector's content fingerprint, which is also stored in its metadata.
    """
    if isinstance(tensors, Mapping):
        specs = specs or {k: (code_of(v), tuple(v.shape)) for k, v in tensors.items()}
        items: Iterable = tensors.items()
    else:
        if specs is None:
            raise TVToolError("internal: streaming writes need specs")
        items = tensors
    specs = spec_codes(specs)
    code = dtype_code(dtype)
    if code is not None:
        specs = {k: (code if c in FLOAT_CODES else c, s) for k, (c, s) in specs.items()}
    return write_safetensors(path, items, specs, {META_KEY: json.dumps(meta)}, force=force,
                             fingerprint_key="fingerprint", explain_non_finite=explain_non_finite, recycle=recycle)


# --------------------------------------------------------------------------------------------------- operations
_COMPUTE_THREADS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
                            (os.cpu_count() or 1)))
_POOL: ThreadPoolExecutor | None = None


def _compute_pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(_COMPUTE_THREADS, thread_name_prefix="tvtool-sum")
    return _POOL


def blockwise_sum(terms: Sequence[tuple[np.ndarray, str, float]], out_code: str, *,
                  factor_common: bool = False, pool: BufferPool | None = None) -> np.ndarray:
    """sum_i weight_i * array_i, accumulated in fp32 block by block and stored as ``out_code``.

    Each input is read once; the accumulator stays in cache. Term by term, every product is rounded to fp32 and
    then added (``merge -m sum`` computes exactly this, so the two agree bit for bit). With ``factor_common``,
    terms of equal weight are summed first and scaled once (apply: base + alpha * (t1 + ... + tn) costs one
    multiply per block, not n). ``pool`` provides the output buffer.
    """
    shape = tuple(terms[0][0].shape)
    n = math.prod(shape)
    out = (pool.get(out_code, shape) if pool is not None else np.empty(shape, NP_DTYPES[out_code])).reshape(-1)
    if n == 0:
        return out.reshape(shape)
    groups: list[tuple[np.float32, list[tuple[np.ndarray, str]]]] = []
    for a, code, w in terms:
        w = np.float32(w)
        if factor_common and any(g[0] == w for g in groups):
            next(g for g in groups if g[0] == w)[1].append((a.reshape(-1), code))
        else:
            groups.append((w, [(a.reshape(-1), code)]))
    def sum_range(start: int, stop: int) -> None:
        m = min(stop - start, BLOCK)
        acc, part, conv = (np.empty(m, np.float32) for _ in range(3))  # scratch of this range's worker
        with np.errstate(over="ignore", invalid="ignore"):
            for s in range(start, stop, BLOCK):
                e = min(stop, s + BLOCK)
                # fp32 output: accumulate right in the output buffer (no final copy)
                a_ = out[s:e] if out_code == "F32" else acc[: e - s]
                p_, c_ = part[: e - s], conv[: e - s]
                for g, (w, arrays) in enumerate(groups):
                    target = a_ if g == 0 else p_  # the group's sum lands in acc (first group) or part (later)
                    for i, (x, code) in enumerate(arrays):
                        block = x[s:e]
                        if i == 0 and code == "F32" and w != 1.0 and len(arrays) == 1:
                            np.multiply(block, w, out=target)  # one pass instead of copy + scale
                            continue
                        if i == 0:
                            to_float32(block, code, out=target)
                        else:
                            target += block if code == "F32" else to_float32(block, code, out=c_)
                    if w != 1.0 and not (len(arrays) == 1 and arrays[0][1] == "F32"):
                        target *= w
                    if g:
                        a_ += p_
                if out_code != "F32":
                    from_float32(a_, out_code, out=out[s:e])

    # numpy releases the GIL in these loops: a large tensor is split, on block boundaries, between the cores
    # (each element sees the same operations in the same order, so the result does not depend on the split)
    workers = min(_COMPUTE_THREADS, max(1, n // (4 * BLOCK)))
    if workers == 1:
        sum_range(0, n)
    else:
        n_blocks = -(-n // BLOCK)
        per = -(-n_blocks // workers) * BLOCK  # whole blocks per worker
        bounds = [(a, min(n, a + per)) for a in range(0, n, per)]
        list(_compute_pool().map(lambda b: sum_range(*b), bounds))
    return out.reshape(shape)


def _find_non_finite(sources: Sequence[tuple[str, object]], key: str) -> None:
    """Raise naming the input (label, TaskVectorFile or WeightSource) whose tensor ``key`` holds NaN or inf."""
    for label, src in sources:
        if key in src:
            a = src.array(key, check=False) if isinstance(src, TaskVectorFile) else src.array(key)
            code = src.code(key)
            if not finite_array(a, code):
                raise TVToolError(f"{label}: tensor {key} holds NaN or inf values; refusing to compute with it")


def combine(paths: Sequence[str | os.PathLike], weights: Sequence[float], out: str | os.PathLike, *,
            op: str, op_fields: dict | None = None, dtype=None, force: bool = False,
            union: bool = False) -> str:
    """out = sum_i weights[i] * vector_i, streamed. The building block of add, negate and scale."""
    if len(paths) != len(weights):
        raise TVToolError(f"{len(weights)} coefficients for {len(paths)} vectors")
    dtype = dtype_code(dtype)
    check_output(out, force)
    vectors = [open_vector(p) for p in paths]
    keys = check_compatible(vectors, union=union)
    out_code = {k: (dtype or vectors[_first_holder(vectors, k)].code(k)) for k in keys}
    specs = {k: (out_code[k], tuple(vectors[_first_holder(vectors, k)].shape(k))) for k in keys}

    pool = BufferPool(spec_codes(specs))

    def sums():
        for k in keys:
            terms = [(v.array(k, check=False), v.code(k), w) for v, w in zip(vectors, weights) if k in v]
            yield k, blockwise_sum(terms, out_code[k], pool=pool)
            for v in vectors:
                if k in v:
                    v.release(k)

    first = vectors[0]
    tasks = _unique(t for v in vectors for t in v.tasks)
    modes = {v.meta.get("mode") for v in vectors}
    entry = history_entry(op, coefficients=list(map(float, weights)), **(op_fields or {}),
                          inputs=[v.describe_input() for v in vectors])
    meta = new_meta(first.meta["base"], tasks=tasks, mode=modes.pop() if len(modes) == 1 else "mixed",
                    orthoreg=first.meta.get("orthoreg") if len(vectors) == 1 else None, history=[entry])
    return write_vector(out, sums(), meta, specs=specs, force=force, recycle=pool.put,
                        explain_non_finite=lambda k: _find_non_finite([(v.path, v) for v in vectors], k))


def _first_holder(vectors, key) -> int:
    return next(i for i, v in enumerate(vectors) if key in v)


def _unique(items) -> list:
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def add(paths, out, *, alpha: float = 1.0, weights: Sequence[float] | None = None, **kw) -> str:
    """Task addition: out = alpha * sum(vectors), or sum_i weights[i] * vector_i."""
    alpha = check_alpha(spell("--alpha", "alpha"), alpha)
    if weights is not None:
        weights = [check_alpha(spell("--weights", "weights"), w) for w in weights]
    coeffs = list(weights) if weights is not None else [alpha] * len(paths)
    return combine(paths, coeffs, out, op="add", op_fields={"alpha": None if weights is not None else alpha}, **kw)


def negate(path, out, *, alpha: float = 1.0, **kw) -> str:
    """Task negation: out = -alpha * vector."""
    alpha = check_alpha(spell("--alpha", "alpha"), alpha)
    return combine([path], [-alpha], out, op="negate", op_fields={"alpha": alpha}, **kw)


def scale(path, out, *, alpha: float, **kw) -> str:
    alpha = check_alpha(spell("--alpha", "alpha"), alpha)
    return combine([path], [alpha], out, op="scale", op_fields={"alpha": alpha}, **kw)


def base_meta(source: WeightSource, model: str | None = None) -> dict:
    """The base as recorded in metadata: its open_clip architecture (``model`` overrides; else what the source says,
    else inferred from shapes when unambiguous), an absolute weights path, and its fingerprint."""
    describe = dict(source.describe)
    if model:
        describe["model"] = model
    elif not describe.get("model"):
        describe["model"] = infer(source.keys(), source.shape)[0]
    pre = describe.get("pretrained")
    if isinstance(pre, str) and pre and not os.path.isabs(pre) and os.path.exists(pre):
        describe["pretrained"] = os.path.abspath(pre)
    return {**describe, "fingerprint": fingerprint(source)}


def _source_label(spec, source: WeightSource) -> str:
    return str(spec) if not isinstance(spec, WeightSource) else str(source.describe.get("pretrained") or "weights")


def extract(base: str | WeightSource, finetuned: str | WeightSource, out: str | os.PathLike, *,
            keep_all: bool = False, trust_pickle: bool = False, dtype=None,
            tasks: Sequence[str] = (), mode: str | None = None, force: bool = False, model: str | None = None,
            **extra) -> str:
    """tau = finetuned - base over the floating tensors both hold; only tensors that differ unless ``keep_all``.

    ``model`` records the base's open_clip architecture when it cannot be read from the base (see base_meta)."""
    dtype = dtype_code(dtype)
    check_output(out, force)
    if model:
        from .models import list_models

        if model not in list_models():
            raise TVToolError(f"--model {model}: not an open_clip architecture; see `tvtool models` for names")
    base_src = base if isinstance(base, WeightSource) else open_weights(base, trust_pickle=trust_pickle)
    ft_src = finetuned if isinstance(finetuned, WeightSource) else open_weights(finetuned, trust_pickle=trust_pickle,
                                                                                    base=base_src)
    keys = [k for k in ft_src.keys() if k in base_src and ft_src.code(k) in FLOAT_CODES]
    if not keys:
        raise TVToolError("the fine-tuned and base weights share no tensor names; are they the same architecture?")
    for k in keys:
        if tuple(ft_src.shape(k)) != tuple(base_src.shape(k)):
            raise TVToolError(f"tensor {k}: fine-tuned shape {tuple(ft_src.shape(k))} != base "
                              f"{tuple(base_src.shape(k))}; the two models are different architectures")
    # Which tensors differ is known only after reading them: a first pass decides, so that the header can be
    # written before the data. Inputs are read twice; memory stays at one tensor per input either way.
    if not keep_all:
        differ = []
        for k in keys:
            if not _same_values(ft_src.array(k), ft_src.code(k), base_src.array(k), base_src.code(k)):
                differ.append(k)
            ft_src.release(k)
            base_src.release(k)
        keys = differ
        if not keys:
            raise TVToolError("the fine-tuned weights equal the base weights: the task vector would be empty")
    out_code = {k: dtype or _float_or(ft_src.code(k)) for k in keys}

    def diffs():
        for k in keys:
            terms = [(ft_src.array(k), ft_src.code(k), 1.0), (base_src.array(k), base_src.code(k), -1.0)]
            yield k, blockwise_sum(terms, out_code[k], pool=pool)
            base_src.release(k)
            ft_src.release(k)

    specs = {k: (out_code[k], tuple(ft_src.shape(k))) for k in keys}
    pool = BufferPool(specs)
    meta = new_meta(base_meta(base_src, model), tasks=tasks, mode=mode,
                    history=[history_entry("extract", finetuned=ft_src.describe, keep_all=keep_all)], **extra)
    labels = [(_source_label(finetuned, ft_src), ft_src), (_source_label(base, base_src), base_src)]
    return write_vector(out, diffs(), meta, specs=specs, force=force, recycle=pool.put,
                        explain_non_finite=lambda k: _find_non_finite(labels, k))


def _same_values(a: np.ndarray, a_code: str, b: np.ndarray, b_code: str) -> bool:
    if a_code == b_code:
        return bool(np.array_equal(a, b))
    return bool(np.array_equal(to_float32(a, a_code), to_float32(b, b_code)))


def _float_or(code: str) -> str:
    return code if code in FLOAT_CODES else "F32"


def apply(base: str | WeightSource, vectors: Sequence[str | os.PathLike], out: str | os.PathLike, *,
          alpha: float = 1.0, trust_pickle: bool = False, check_base: bool = True, force: bool = False,
          dtype=None, nonlinear: bool = False) -> None:
    """Write theta_0 + alpha * sum(vectors) as a plain model state dict (safetensors) that open_clip can load.

    Onto a transformers CLIP folder the result is a transformers folder of the same kind (its config copied) with a
    model card (README.md: the hub's front matter, the vectors, alphas and their histories).

    Vectors from linear-mode (tangent) fine-tuning are refused unless ``nonlinear``: their model is the tangent
    model f(theta_0) + J (theta - theta_0) that `eval` measures, which no plain weights express; theta_0 + tau is
    another, usually much worse, model."""
    alpha = check_alpha(spell("--alpha", "alpha"), alpha)
    dtype = dtype_code(dtype)
    vecs = [open_vector(p) for p in vectors]
    linear = [v for v in vecs if v.meta.get("mode") == "linear"]
    if linear and not nonlinear:
        raise TVToolError(f"{linear[0].path} comes from linear-mode (tangent) fine-tuning: its model is the tangent "
                          "model `eval` measures, which plain weights cannot hold, and theta_0 + alpha * tau is a "
                          f"different, usually much worse, model; pass {spell('--nonlinear', 'nonlinear=True')} to "
                          "write that non-linear model anyway")
    base_src = base if isinstance(base, WeightSource) else open_weights(base, trust_pickle=trust_pickle)
    to_transformers = base_src.config.transformers is not None
    if not to_transformers:
        check_output(out, force)
    else:  # a folder output: never the base folder it reads (nor one holding an input)
        check_not_input(out, [base_src.describe.get("pretrained"), *vectors])
    check_compatible(vecs, union=True, unknown_base_ok=True)  # the base itself is checked below
    described = base_meta(base_src)  # the fingerprint is cheap: a strided sample per tensor
    if check_base:
        base_fp = described["fingerprint"]
        for v in vecs:
            if not v.base_fingerprint:
                raise TVToolError(f"{v.path} records no base fingerprint, so it cannot be checked against the "
                                  f"given base; pass {spell('--no-check-base', 'check_base=False')} if you are sure it "
                                  "belongs to this base")
            if v.base_fingerprint != base_fp:
                raise TVToolError(f"{v.path} was taken against base {v.base_fingerprint}, but the given base is "
                                  f"{base_fp}; pass the matching base (or {spell('--no-check-base', 'check_base=False')}"
                                  " if you are sure)")
    base_keys = set(base_src.keys())
    for v in vecs:
        for k in v.keys():
            if k not in base_keys:
                raise TVToolError(f"{v.path}: tensor {k} is not in the base model; wrong base?")
            if tuple(v.shape(k)) != tuple(base_src.shape(k)):
                raise TVToolError(f"{v.path}: tensor {k} has shape {tuple(v.shape(k))}, base has "
                                  f"{tuple(base_src.shape(k))}")
    specs = {}
    for k in base_src.keys():
        c = base_src.code(k)
        specs[k] = ((dtype or c) if c in FLOAT_CODES else c, tuple(base_src.shape(k)))

    pool = BufferPool(specs)

    def patched():
        for k in base_src.keys():
            t = base_src.array(k)
            code = base_src.code(k)
            held = [v for v in vecs if k in v]
            if held and code in FLOAT_CODES:
                terms = [(t, code, 1.0)] + [(v.array(k, check=False), v.code(k), alpha) for v in held]
                t = blockwise_sum(terms, specs[k][0], factor_common=True, pool=pool)
            yield k, t
            for v in held:
                v.release(k)
            base_src.release(k)

    if to_transformers:
        from .formats import transformers_clip

        # the q/k/v split and transposes are torch ops: hand the converter tensors
        tensors = ((k, array_to_tensor(a, specs[k][0])) for k, a in patched())
        from .modelcard import model_card

        folder = base_src.config.transformers_folder
        card = model_card(Path(out).name, folder, vecs, alpha)
        transformers_clip.write_folder(out, tensors, specs, copy_from=folder, force=force,
                                       extra_files={"README.md": card})
        return
    doc = {"format": "tvtool.model", "base": described,
           "history": [history_entry("apply", alpha=alpha, inputs=[v.describe_input() for v in vecs],
                                     **({"nonlinear": True} if linear else {}))]}
    labels = [(v.path, v) for v in vecs] + [(_source_label(base, base_src), base_src)]
    write_safetensors(out, patched(), specs, {META_KEY: json.dumps(doc)}, force=force, recycle=pool.put,
                      explain_non_finite=lambda k: _find_non_finite(labels, k))
