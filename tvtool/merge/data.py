"""The data path of the data-aware merge methods (``regmean``, ``fisher``): statistics of each fine-tuned model
theta_0 + tau_t on a seeded subset of its task's training images, then the per-key merge, written like any
`tvtool merge` output.

The file-only driver (``merge_files``) refuses these methods; :func:`merge_with_data` runs them. A method declares a
``collect(ctx, *, <options>)`` at registration: it reads what it needs from the :class:`StatsContext` (the image
tower set to each task's weights in turn, the task's head and image batches) and returns ``key -> keyword arguments``
of its per-key function. What is collected here:

- :func:`linear_inputs`: the inputs of every linear map of the image tower, through forward hooks. ``nn.Linear``
  modules are hooked directly. open_clip's attention is an ``nn.MultiheadAttention`` whose projections are not
  called as modules: its ``in_proj_weight`` (q, k and v stacked) sees the attention's input, and ``out_proj`` the
  attention context, which the hook recomputes from that input (heads, scaled dot-product, the module's own mask).
  FusionBench's HF CLIP has separate q/k/v ``nn.Linear`` layers with that one input, so each of their rows gets the
  same statistic as here.
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable, Iterator, Mapping, Sequence

from ..errors import TVToolError
from .parts import torch
from .registry import Method, get_method, resolve_options

VISUAL = "visual."
Progress = Callable[[str], None]


def needs_data(method: Method | str) -> bool:
    """Whether a method needs the model and the tasks' images (and so `merge_with_data`, not `merge_files`)."""
    m = get_method(method) if isinstance(method, str) else method
    return m.collect is not None


def data_refusal(m: Method) -> TVToolError:
    """The one line the file-only driver answers a data-aware method with."""
    return TVToolError(f"{m.name} needs the model and each task's training images, not only the vectors: run "
                       f"`tvtool merge -m {m.name} A.st B.st ...` (with --data-root for real datasets), or "
                       "tvtool.merge.data.merge_with_data in Python")


def task_rows(n_total: int, examples: int, seed: int, task: str) -> torch.Tensor:
    """A seeded random subset of a split's rows (FusionBench shuffles its training loader), the same for a given
    (seed, task) whatever the other tasks."""
    digest = hashlib.sha256(f"{int(seed)}\0{task}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randperm(n_total, generator=g)[:min(examples, n_total)]


class StatsContext:
    """The model side of a data-aware merge: an :class:`~tvtool.evaluate.Evaluator` (its image tower, heads and
    device), the vectors' tensors, and each task's training images.

    ``use(i)`` sets the tower to theta_0 + tau_i; ``batches(i, examples, batch)`` yields normalized fp32 image
    batches of task i (a ``seed``-chosen subset of ``split``) on the device.
    """

    def __init__(self, ev, tasks: Sequence[str], taus: Sequence[Mapping[str, torch.Tensor]], *, seed: int = 0,
                 split: str = "train", progress: Progress | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        self.ev = ev
        self.tasks = list(tasks)
        self.taus = list(taus)
        self.seed = int(seed)
        self.split = split
        self.progress = progress
        self.visual = ev.visual
        self.device = ev.device
        b = ev.bundle  # the model's normalization; an evaluator from parts takes it from the caller
        mean = torch.tensor(mean or (b.mean if b is not None else (0.0, 0.0, 0.0)), dtype=torch.float32,
                            device=self.device)
        std = torch.tensor(std or (b.std if b is not None else (1.0, 1.0, 1.0)), dtype=torch.float32,
                           device=self.device)
        self._mean, self._std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        self.used: dict[str, int] = {}  # examples each task contributed

    def say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)

    def use(self, i: int) -> None:
        self.ev.set_weights(self.taus[i], 1.0)

    def head(self, i: int) -> torch.Tensor:
        return self.ev.head(self.tasks[i])

    def _split(self, task: str):
        from ..datasets import ImageSplit, open_split

        ev = self.ev
        if ev.bundle is None:  # an evaluator from parts: its held inputs of the split
            x, y = ev.inputs(task, self.split)
            return ImageSplit.from_tensors(x.cpu(), y.cpu())
        return open_split(task, self.split, ev.data_root, ev.bundle.image_size)

    def batches(self, i: int, examples: int, batch: int) -> Iterator[torch.Tensor]:
        task = self.tasks[i]
        data = self._split(task)
        rows = task_rows(len(data), examples, self.seed, task)
        self.used[task] = int(rows.numel())
        for start in range(0, rows.numel(), batch):
            x = data.read(rows[start:start + batch]).to(self.device, non_blocking=True)
            yield (x.float() / 255.0 - self._mean) / self._std


def _features(visual, x):
    out = visual(x)
    return out[0] if isinstance(out, tuple) else out


# ------------------------------------------------------------------------------------------ linear-layer inputs
def _attention_context(mod, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, context) of a self-attention ``nn.MultiheadAttention`` call, both [rows, D]: what its in_proj and
    out_proj multiply. The context is recomputed from the input with the module's weights."""
    import torch.nn.functional as F

    names = ("query", "key", "value")
    q, k, v = (args[j] if len(args) > j else kwargs.get(n) for j, n in enumerate(names))
    if not (k is q and v is q):
        raise TVToolError("regmean: an attention layer of this image tower is not self-attention; its inputs "
                          "cannot be collected")
    if mod.in_proj_weight is None or mod.bias_k is not None or mod.add_zero_attn \
            or kwargs.get("key_padding_mask") is not None:
        raise TVToolError("regmean: this image tower's attention layers have separate q/k/v weights, key biases or "
                          "padding masks; only open_clip's plain self-attention is supported")
    x = q.detach() if mod.batch_first else q.detach().transpose(0, 1)  # [B, L, D]
    b, n, d = x.shape
    h = mod.num_heads
    qkv = F.linear(x, mod.in_proj_weight, mod.in_proj_bias).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.dtype == torch.bool:
        mask = ~mask  # MHA: True = masked out; SDPA: True = attend
    ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
    ctx = ctx.transpose(1, 2).reshape(b * n, d)
    return x.reshape(b * n, d), ctx


def linear_keys(visual) -> dict[str, str]:
    """Every weight of the image tower that multiplies its input as a linear map, by state-dict key -> what the
    hooks record for it (``input`` of an ``nn.Linear``; ``attn_in`` / ``attn_out`` of an attention layer)."""
    keys: dict[str, str] = {}
    attn = {name for name, m in visual.named_modules() if isinstance(m, torch.nn.MultiheadAttention)}
    for name, m in visual.named_modules():
        if isinstance(m, torch.nn.MultiheadAttention):
            keys[f"{VISUAL}{name}.in_proj_weight"] = "attn_in"
            keys[f"{VISUAL}{name}.out_proj.weight"] = "attn_out"
        elif isinstance(m, torch.nn.Linear) and name.rpartition(".")[0] not in attn:
            keys[f"{VISUAL}{name}.weight"] = "input"
    return keys


class linear_inputs:
    """Context manager: while open, every forward of ``visual`` adds X^T X of each linear map's inputs (all tokens
    as rows) to ``grams[key]`` and their row count to ``rows[key]`` (fp32 sums on the device)."""

    def __init__(self, visual, wanted: set[str] | None = None):
        self.visual = visual
        self.wanted = wanted
        self.grams: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._handles = []

    def _add(self, key: str, x: torch.Tensor) -> None:
        if self.wanted is not None and key not in self.wanted:
            return
        x = x.detach().reshape(-1, x.shape[-1]).float()
        xtx = x.T @ x
        if key in self.grams:
            self.grams[key] += xtx
            self.rows[key] += x.shape[0]
        else:
            self.grams[key], self.rows[key] = xtx, x.shape[0]

    def __enter__(self):
        kinds = linear_keys(self.visual)
        for name, m in self.visual.named_modules():
            if isinstance(m, torch.nn.MultiheadAttention):
                k_in, k_out = f"{VISUAL}{name}.in_proj_weight", f"{VISUAL}{name}.out_proj.weight"

                def attn_hook(mod, args, kwargs, output, k_in=k_in, k_out=k_out):
                    x, ctx = _attention_context(mod, args, kwargs)
                    self._add(k_in, x)
                    self._add(k_out, ctx)

                self._handles.append(m.register_forward_hook(attn_hook, with_kwargs=True))
            elif f"{VISUAL}{name}.weight" in kinds and kinds[f"{VISUAL}{name}.weight"] == "input":
                def linear_hook(mod, args, output, key=f"{VISUAL}{name}.weight"):
                    self._add(key, args[0])

                self._handles.append(m.register_forward_hook(linear_hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def means(self) -> dict[str, torch.Tensor]:
        """X^T X / rows per key, on the CPU (FusionBench's running average of the Gram matrix over the rows)."""
        return {k: (g / self.rows[k]).cpu() for k, g in self.grams.items()}


# ------------------------------------------------------------------------------------------ the merge
def _check_vectors(vectors) -> None:
    modes = {(v.meta.get("mode") or "full") for v in vectors}
    if "linear" in modes:
        raise TVToolError("data-aware merges act on the fine-tuned weights theta_0 + tau of the plain model; "
                          "linearized (--mode linear) vectors are not supported")


def _vector_tasks(vectors, tasks: Sequence[str] | None) -> list[str]:
    if tasks is not None:
        tasks = list(tasks)
        if len(tasks) != len(vectors):
            raise TVToolError(f"--tasks names {len(tasks)} tasks for {len(vectors)} vectors; name one task per "
                              "vector, in order")
        return tasks
    out = []
    for v in vectors:
        if len(v.tasks) != 1:
            raise TVToolError(f"{v.path}: a data-aware merge needs each vector's task, and this one records "
                              f"{v.tasks or 'none'}; pass --tasks t1,t2,... (one per vector, in order)")
        out.append(v.tasks[0])
    return out


def merge_stats(m: Method, tensors_by_key: Iterator[tuple[str, list]], lookup: Callable[[str], dict],
                opts: Mapping, alpha: float = 1.0) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, alpha * fn(tensors, key, **options, **lookup(key))) for each key: the per-key step of a data merge."""
    fn_opts = {k: v for k, v in opts.items() if k in m.params}
    for key, tensors in tensors_by_key:
        out = m.fn([t.to(torch.float32) for t in tensors], key, **fn_opts, **lookup(key))
        yield key, (out * alpha if alpha != 1.0 else out)


def collect(m: Method, ctx: StatsContext, opts: Mapping) -> Callable[[str], dict]:
    """Run the method's collector with its options (those among its parameters)."""
    import inspect

    params = inspect.signature(m.collect).parameters
    return m.collect(ctx, **{k: v for k, v in opts.items() if k in params})


def merge_with_data(method: str, paths: Sequence[str | os.PathLike], out: str | os.PathLike,
                    options: Mapping | None = None, *, tasks: Sequence[str] | None = None, data_root=None,
                    device: str | None = None, bundle=None, alpha: float = 1.0, seed: int = 0,
                    dtype=None, force: bool = False, progress: Progress | None = None) -> str:
    """A data-aware merge of task-vector files into ``out`` (atomic; history as `merge_files` writes it, plus what
    data was used); returns its fingerprint.

    The model is the base the vectors record (or ``bundle``, already loaded, its image tower at theta_0: recipes
    pass theirs, and get it back at theta_0); each vector's
    task is the one it records (or ``tasks``, in order). ``seed`` chooses the training images.
    """
    from .. import evaluate
    from .. import taskvector as tv

    m = get_method(method)
    if m.collect is None:
        raise TVToolError(f"{m.name} is not data-aware; use tvtool.merge.merge_files")
    opts = resolve_options(m, options)
    if isinstance(dtype, str):
        dtype = tv.parse_dtype(dtype)
    if not paths:
        raise TVToolError("no task vectors given; pass one .st file per task")
    if m.check is not None:
        m.check(opts, len(paths))
    tv.check_output(out, force)
    vectors = evaluate.open_vectors(paths)
    try:
        _check_vectors(vectors)
        task_names = _vector_tasks(vectors, tasks)
        keys = tv.check_compatible(vectors)
        if bundle is None:
            from ..datasets.sources import check_available
            from ..models import load_clip

            for t in dict.fromkeys(task_names):
                check_available(t, ["train"], data_root)
            model, pretrained = evaluate.recorded_base(vectors)
            if model is None:
                raise TVToolError("the vectors record no base model; a data-aware merge needs it (re-extract them "
                                  "with tvtool, or use the Python API with a loaded bundle)")
            bundle = load_clip(model, pretrained, device=device)
        evaluate.check_base(vectors, bundle)
        ev = evaluate.Evaluator(bundle, list(dict.fromkeys(task_names)), data_root=data_root, splits=("train",),
                                device=device)
        taus = [evaluate.load_deltas([v], ev.device) for v in vectors]
        ctx = StatsContext(ev, task_names, taus, seed=seed, progress=progress)
        try:
            lookup = collect(m, ctx, opts)
        finally:
            ev.reset()
        del taus
        specs = {k: (dtype or (vectors[0].dtype(k) if vectors[0].dtype(k).is_floating_point else torch.float32),
                     tuple(vectors[0].shape(k))) for k in keys}
        entry = tv.history_entry("merge", method=m.name, options=opts, alpha=float(alpha), seed=int(seed),
                                 data={"split": ctx.split, "tasks": task_names, "examples": ctx.used,
                                       "model": bundle.name, "pretrained": bundle.pretrained},
                                 inputs=[v.describe_input() for v in vectors])
        meta = tv.new_meta(vectors[0].meta["base"], tasks=list(dict.fromkeys(task_names)),
                           mode=(vectors[0].meta.get("mode") if len({v.meta.get("mode") for v in vectors}) == 1
                                 else "mixed"), history=[entry])
        by_key = ((k, [v.get(k) for v in vectors]) for k in keys)
        return tv.write_vector(out, merge_stats(m, by_key, lookup, opts, alpha), meta, specs=specs, force=force)
    finally:
        for v in vectors:
            v.close()
