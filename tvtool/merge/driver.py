"""The merge driver: streams key by key through a registered method, in memory or from task-vector files.

``merge_stream`` reads one key at a time from memory-mapped sources, so resident memory stays near T x the largest
tensor (``lines`` also holds its inner method's output, one vector); then it multiplies by ``alpha`` (methods that
take an ``alpha`` parameter fold it in themselves, so ``sum`` is bit-identical to ``tvtool add``).

Extras the driver supplies when a method asks for them by parameter name:
- ``generator``: a ``torch.Generator`` derived from (seed, key) -- random methods are reproducible per tensor,
  whatever the order or subset of keys, and draw on the CPU so the result does not depend on the device.
- whatever the method's ``prepass`` returns: methods that need whole-vector statistics (TIES' global top-k,
  LiNeS' norms) get them from a streaming first pass over the inputs.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Iterator, Mapping, Sequence

from ..errors import TVToolError
from ..checks import parse_grid
from .parts import get, release, torch
from .registry import REGISTRY, Method, get_method, resolve_options

Tensor = "torch.Tensor"


def key_generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator seeded from (seed, key): each tensor's draw is independent of which other keys exist."""
    digest = hashlib.sha256(f"{int(seed)}\0{key}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def alpha_grid(method: Method | str) -> list[float]:
    """The method's default alpha search grid (from its paper; `merge --list` states the source)."""
    m = get_method(method) if isinstance(method, str) else method
    return parse_grid(m.alpha_grid)


def merged_method(meta: Mapping) -> str | None:
    """The registered method a vector was made with, when its last history entry is a `tvtool merge`."""
    history = meta.get("history") or []
    last = history[-1] if history else None
    if isinstance(last, dict) and last.get("op") == "merge" and last.get("method") in REGISTRY:
        return last["method"]
    return None


def _call(m: Method, tensors: list[Tensor], key: str, opts: Mapping[str, Any], alpha: float, seed: int,
          extra: Mapping) -> Tensor:
    kwargs = {k: v for k, v in opts.items() if k in m.options}
    kwargs.update(extra)
    if m.random:
        kwargs["generator"] = key_generator(seed, key)
    if "alpha" in m.params:
        return m.fn(tensors, key, alpha=alpha, **kwargs)
    out = m.fn(tensors, key, **kwargs)
    if alpha != 1.0:
        out = out * alpha
    return out


def check_inputs(m: Method, opts: Mapping[str, Any], n_inputs: int) -> None:
    """Refuse, before any work, what cannot give a meaningful result."""
    if m.command:
        raise TVToolError(f"{m.name} needs the model and the tasks' data, which `tvtool merge` does not load; run "
                          f"`{m.command}`")
    if n_inputs == 0:
        raise TVToolError("no task vectors given")
    if m.check is not None:
        m.check(opts, n_inputs)


def merge_stream(method: Method | str, sources: Sequence, keys: Sequence[str], options: Mapping | None = None, *,
                 alpha: float = 1.0, seed: int = 0) -> Iterator[tuple[str, Tensor]]:
    """Yield (key, merged fp32 tensor) for each key, reading the sources (mappings with ``get``; task-vector files)
    one key at a time. A source lacking a key contributes zeros."""
    m = get_method(method) if isinstance(method, str) else method
    if m.collect is not None:
        from .data import data_refusal

        raise data_refusal(m)
    opts = resolve_options(m, options)
    check_inputs(m, opts, len(sources))
    extra = m.prepass(sources, keys, opts, seed) if m.prepass else {}
    for key in keys:
        present = [get(s, key) for s in sources]
        like = next(t for t in present if t is not None)
        inputs = [(t if t is not None else torch.zeros(like.shape)).to(torch.float32) for t in present]
        out = _call(m, inputs, key, opts, alpha, seed, extra)
        del inputs, present
        yield key, out
        for s in sources:
            release(s, key)


def merge_tensor(method: Method | str, tensors: Sequence[Tensor], key: str = "", options: Mapping | None = None, *,
                 alpha: float = 1.0, seed: int = 0) -> Tensor:
    """Merge one key's tensors (any float dtype) with a registered method; returns fp32.

    The tensors are treated as whole vectors of one tensor each, so whole-vector methods (TIES' global trim,
    LiNeS' norms) see exactly these entries.
    """
    sources = [{key: t.to(torch.float32)} for t in tensors]
    return next(merge_stream(method, sources, [key], options, alpha=alpha, seed=seed))[1]


def merge_tensors(method: Method | str, vectors: Sequence[Mapping[str, Tensor]], options: Mapping | None = None, *,
                  alpha: float = 1.0, seed: int = 0) -> dict[str, Tensor]:
    """In-memory merge of state-dict-like mappings (the same keys and shapes); returns fp32 tensors."""
    if not vectors:
        raise TVToolError("no task vectors given")
    keys = list(vectors[0].keys())
    for v in vectors[1:]:
        if set(v.keys()) != set(keys):
            raise TVToolError("the vectors hold different tensor sets")
        for k in keys:
            if tuple(v[k].shape) != tuple(vectors[0][k].shape):
                raise TVToolError(f"tensor {k} has different shapes across inputs")
    return dict(merge_stream(method, vectors, keys, options, alpha=alpha, seed=seed))


def merge_files(method: str, paths: Sequence[str | os.PathLike], out: str | os.PathLike,
                options: Mapping | None = None, *, alpha: float = 1.0, seed: int = 0,
                dtype: torch.dtype | str | None = None, force: bool = False, union: bool = False) -> str:
    """Merge task-vector files into ``out`` (streamed, atomic, with a history entry); returns its fingerprint.

    ``options`` may hold strings (from the CLI) or Python values; ``dtype`` is torch's or "fp32" | "bf16" | "fp16"
    (default: each tensor keeps the first input's dtype). ``union`` treats tensors missing from some inputs as 0.
    """
    from .. import taskvector as tv  # imported here so the pure-tensor methods work without the file layer

    m = get_method(method)
    if m.collect is not None:  # refused before any file is opened
        from .data import data_refusal

        raise data_refusal(m)
    opts = resolve_options(m, options)
    if isinstance(dtype, str):
        dtype = tv.parse_dtype(dtype)
    if not paths:
        raise TVToolError("no task vectors given; pass two or more .st files")
    check_inputs(m, opts, len(paths))
    tv.check_output(out, force)
    vectors = [tv.open_vector(p) for p in paths]
    keys = tv.check_compatible(vectors, union=union)
    holder = {k: next(v for v in vectors if k in v) for k in keys}
    specs = {k: (dtype or (holder[k].dtype(k) if holder[k].dtype(k).is_floating_point else torch.float32),
                 tuple(holder[k].shape(k))) for k in keys}
    entry = tv.history_entry("merge", method=m.name, options=opts, alpha=float(alpha),
                             seed=int(seed) if m.is_random(opts) else None,
                             inputs=[v.describe_input() for v in vectors])
    tasks = list(dict.fromkeys(t for v in vectors for t in v.tasks))
    modes = {v.meta.get("mode") for v in vectors}
    meta = tv.new_meta(vectors[0].meta["base"], tasks=tasks, mode=modes.pop() if len(modes) == 1 else "mixed",
                       orthoreg=vectors[0].meta.get("orthoreg") if len(vectors) == 1 else None, history=[entry])
    try:
        return tv.write_vector(out, merge_stream(m, vectors, keys, opts, alpha=alpha, seed=seed), meta, specs=specs,
                               force=force)
    finally:
        for v in vectors:
            v.close()
