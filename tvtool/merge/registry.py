"""The merge-method registry: one structured description per method (mergekit's merge-method registry is the model).

A method is one function ``fn(tensors, key, **options) -> Tensor`` that merges the T inputs' tensors of one
state-dict key (fp32, same shape, on the compute device) into one tensor. It is registered with everything a user
needs to know about it, each written once::

    @register("ties", kind=SPARSE, options={"k": K, "sign": SIGN, ...},
              paper="Yadav et al., TIES-Merging..., NeurIPS 2023", url="https://arxiv.org/abs/2306.01708",
              code="prateeksha10/ties-merging", alpha_grid="0.1:1.5:0.1", alpha_source="...")
    def ties(tensors, key, *, k, sign, ...): ...

Option defaults live in the ``Option`` only (the function's parameters have none), so the listing, the history and
the maths cannot disagree. Nothing here imports torch: `tvtool merge --list` starts at once.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..errors import TVToolError

# what each kind means, shown by `merge --list`
KINDS = {
    "arithmetic": "sums and means of the vectors",
    "sparse": "generalized task arithmetic: a sparsifier per vector, optional TIES sign consensus, then sum or "
              "disjoint mean (tvtool/merge/gta.py)",
    "mask": "masks built from all vectors at once",
    "spectral": "per 2-D layer, from singular value decompositions (GPU when there is one)",
    "optimization": "per 2-D layer, a small optimization problem (GPU when there is one)",
    "layer scaling": "rescales another method's output layer by layer",
    "data-aware": "needs the model and the tasks' data, so it runs behind the evaluator's data path, not from the "
                  "files alone: weighted by statistics of each fine-tuned model on a few hundred of its task's "
                  "training images (`tvtool merge` with the tasks' data, tvtool/data_merge.py), or learned by its own "
                  "command (shown as 'run with'); GPU when there is one",
}


@dataclass(frozen=True)
class Option:
    """One method option: its type, default (None = chosen automatically, see help), help, and allowed values."""
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    lo: float | None = None  # inclusive bounds
    hi: float | None = None
    hi_open: bool = False  # hi itself is not allowed (e.g. a drop probability of 1)
    lo_open: bool = False

    def parse(self, method: str, name: str, value: Any) -> Any:
        if value is None:
            return None
        try:
            if self.type is bool:
                if isinstance(value, str):
                    low = value.strip().lower()
                    if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError(value)
                    value = low in ("1", "true", "yes", "on")
                else:
                    value = bool(value)
            elif self.type is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                value = int(str(value).strip()) if isinstance(value, str) else int(value)
            else:
                value = self.type(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise TVToolError(f"{method}: option {name}={value!r} is not a valid {self.type.__name__}; "
                              f"{name}: {self.help}") from None
        if self.choices is not None and value not in self.choices:
            raise TVToolError(f"{method}: option {name}={value!r} must be one of {', '.join(map(str, self.choices))}")
        if isinstance(value, float) and not math.isfinite(value):
            raise TVToolError(f"{method}: option {name} must be finite")
        low_bad = self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo))
        high_bad = self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi))
        if low_bad or high_bad:
            lower = "(-inf" if self.lo is None else f"({self.lo}" if self.lo_open else f"[{self.lo}"
            upper = "inf)" if self.hi is None else f"{self.hi})" if self.hi_open else f"{self.hi}]"
            raise TVToolError(f"{method}: option {name}={value} is out of range {lower}, {upper}")
        return value

    def describe(self) -> str:
        default = "auto" if self.default is None else self.default
        allowed = f" ({' | '.join(map(str, self.choices))})" if self.choices else ""
        return f"{self.type.__name__}, default {default}{allowed}: {self.help}"


@dataclass(frozen=True)
class Method:
    """Everything about one merge method, declared once at registration."""
    name: str
    fn: Callable
    options: dict[str, Option]
    kind: str
    paper: str  # citation: authors, title, venue year
    url: str  # the paper
    code: str  # the authors' (or the reference) code this implementation was checked against
    alpha_grid: str  # default alpha search: "START:STOP:STEP" or "a,b,c" (evaluate.parse_grid)
    alpha_source: str  # where that grid comes from
    per_layer: bool = False  # acts on 2-D tensors only; other tensors fall back (see its `fallback` option)
    random: bool = False
    prepass: Callable | None = None  # (sources, keys, options, seed) -> extra keyword arguments for fn
    nested: str | None = None  # name of the option that selects another method (its options: "<nested>.<name>")
    check: Callable | None = None  # (options, n_inputs) -> None, raises TVToolError before any work
    tune: tuple[str, str, str] | None = None  # (option, grid, source) when the paper tunes an option, not alpha
    params: frozenset = field(default_factory=frozenset)
    command: str | None = None  # a data-aware method run by its own command (`tvtool merge` refuses it)
    # data-aware methods run by `tvtool merge`: (ctx, *, <its options>) -> (key -> extra keyword arguments of fn),
    # where ctx is a tvtool.data_merge.StatsContext (the model, each task's fine-tuned weights and training images);
    # the file-only driver refuses such a method, tvtool.data_merge.merge_with_data runs it
    collect: Callable | None = None

    @property
    def summary(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]

    @property
    def doc(self) -> str:
        return inspect.cleandoc(self.fn.__doc__ or "")

    def is_random(self, options: Mapping[str, Any]) -> bool:
        """Whether the result depends on the seed (a nested method may be random)."""
        if self.random:
            return True
        return self.nested is not None and get_method(options[self.nested]).is_random(
            nested_options(options, self.nested))

    def describe(self) -> dict:
        """The structured description (what `merge --list --json` prints)."""
        return {"name": self.name, "kind": self.kind, "summary": self.summary, "doc": self.doc,
                "paper": self.paper, "url": self.url, "code": self.code,
                "alpha_grid": self.alpha_grid, "alpha_source": self.alpha_source,
                "tune": dict(zip(("option", "grid", "source"), self.tune)) if self.tune else None,
                "per_layer": self.per_layer, "random": self.random, "nested": self.nested, "command": self.command,
                "data": self.collect is not None,
                "options": {k: {"type": o.type.__name__, "default": o.default, "help": o.help,
                                "choices": list(o.choices) if o.choices else None} for k, o in self.options.items()}}


REGISTRY: dict[str, Method] = {}


def register(name: str, *, kind: str, paper: str, url: str, code: str, alpha_grid: str, alpha_source: str,
             options: Mapping[str, Option] | None = None, per_layer: bool = False, random: bool = False,
             prepass: Callable | None = None, nested: str | None = None, check: Callable | None = None,
             tune: tuple[str, str, str] | None = None, command: str | None = None, collect: Callable | None = None):
    """Register a merge method with its structured description (see the module docstring). ``command``: the method
    needs the model and data and this command runs it (kind "data-aware"; ``fn`` is then never called);
    ``collect``: the method needs per-task statistics of the model on data, gathered by tvtool.data_merge."""
    opts = dict(options or {})
    if kind not in KINDS:
        raise ValueError(f"{name}: unknown kind {kind!r}")

    def deco(fn):
        if name in REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        sig = inspect.signature(fn).parameters
        # a data-aware method's collection options are parameters of its collector, not of the per-key function
        collect_sig = inspect.signature(collect).parameters if collect else {}
        missing = set(opts) - set(sig) - set(collect_sig)
        if missing:
            raise ValueError(f"{name}: options {sorted(missing)} are not parameters of {fn.__name__}")
        doubled = sorted(k for k in opts if (sig.get(k) or collect_sig.get(k)).default is not inspect.Parameter.empty)
        if doubled:  # the Option holds the default; a second one in the signature could disagree (issue 20)
            raise ValueError(f"{name}: parameters {doubled} of {fn.__name__} repeat their option's default")
        if random and "generator" not in sig:
            raise ValueError(f"{name}: a random method takes a 'generator' parameter")
        REGISTRY[name] = Method(name, fn, opts, kind, paper, url, code, alpha_grid, alpha_source, per_layer, random,
                                prepass, nested, check, tune, frozenset(sig), command, collect)
        return fn

    return deco


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise TVToolError(f"unknown merge method {name!r}; known: {', '.join(REGISTRY)} "
                          "(`tvtool merge --list` describes them)") from None


def list_methods() -> list[Method]:
    return list(REGISTRY.values())


def parse_option_strings(items: Sequence[str]) -> dict[str, str]:
    """``["k=20", "sign=count"]`` -> ``{"k": "20", "sign": "count"}`` (typed later by ``resolve_options``)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise TVToolError(f"option {item!r} is not KEY=VALUE; write e.g. --option k=20")
        if name in out:
            raise TVToolError(f"option {name} given twice")
        out[name] = value
    return out


def nested_options(options: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``{"base.k": 20, "beta": 1}`` -> ``{"k": 20}`` for prefix "base"."""
    head = prefix + "."
    return {k[len(head):]: v for k, v in options.items() if k.startswith(head)}


def resolve_options(method: Method | str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults filled in, values typed and range-checked; unknown names are an error listing the valid ones.

    A nesting method (``lines``) also takes its inner method's options as ``<nested>.<name>`` (e.g. ``base.k=20``);
    they are resolved against the inner method and returned with the prefix.
    """
    m = get_method(method) if isinstance(method, str) else method
    options = dict(options or {})
    prefix = f"{m.nested}." if m.nested else None
    unknown = sorted(k for k in options if k not in m.options and not (prefix and k.startswith(prefix)))
    if unknown:
        valid = ", ".join(m.options) or "none"
        extra = f" and {prefix}<option of the {m.nested} method>" if prefix else ""
        raise TVToolError(f"{m.name}: unknown option {unknown[0]!r}; its options are: {valid}{extra}")
    out = {k: o.parse(m.name, k, options.get(k, o.default)) for k, o in m.options.items()}
    if m.nested:
        inner = get_method(out[m.nested])
        given = nested_options(options, m.nested)
        stray = sorted(set(given) - set(inner.options))
        if stray:
            raise TVToolError(f"{m.name}: unknown option '{prefix}{stray[0]}'; the {inner.name} method's options "
                              f"are: {', '.join(inner.options) or 'none'}")
        inner_opts = resolve_options(inner, given)
        out.update({prefix + k: v for k, v in inner_opts.items()})
    return out


def describe_method(method: Method | str) -> str:
    """The human-readable description `tvtool merge --list` prints."""
    m = get_method(method) if isinstance(method, str) else method
    lines = [f"{m.name}  [{m.kind}]: {m.doc}",
             f"    paper: {m.paper} <{m.url}>",
             f"    reference code: {m.code}",
             f"    default alpha search: {m.alpha_grid} -- {m.alpha_source}"]
    if m.command:
        lines.append(f"    run with: {m.command} (needs the model and the tasks' data; `tvtool merge` refuses it)")
    if m.tune:
        lines.append(f"    tuned option: {m.tune[0]} over {m.tune[1]} -- {m.tune[2]}")
    for k, o in m.options.items():
        lines.append(f"    {k}: {o.describe()}")
    if m.nested:
        lines.append(f"    {m.nested}.<name>: any option of the {m.nested} method, e.g. {m.nested}.k=20")
    if m.random:
        lines.append("    (random: reproducible from --seed, recorded in the output's history)")
    if m.collect is not None:
        lines.append("    (data-aware: runs each fine-tuned model on its task's training images, a --seed-chosen "
                     "subset; --data-root for real datasets, --device)")
    return "\n".join(lines)
