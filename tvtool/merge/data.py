"""The model-side parts of the data-aware merge methods (``regmean``, ``fisher``) that need no data layer: forward
hooks, the seeded choice of images, the per-key merge. tvtool/data_merge.py runs them (it loads the model and the
images: a layer above this package).

The file-only driver (``merge_files``) refuses these methods; ``tvtool.data_merge.merge_with_data`` runs them. A
method declares a
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
from typing import Callable, Iterator, Mapping

from ..errors import TVToolError
from .parts import torch
from .registry import Method, get_method

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
                       "tvtool.data_merge.merge_with_data in Python")


def task_rows(n_total: int, examples: int, seed: int, task: str) -> torch.Tensor:
    """A seeded random subset of a split's rows (FusionBench shuffles its training loader), the same for a given
    (seed, task) whatever the other tasks."""
    digest = hashlib.sha256(f"{int(seed)}\0{task}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randperm(n_total, generator=g)[:min(examples, n_total)]


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


def accumulate(sums: dict, key: str, terms: tuple) -> None:
    """Add one task's ``terms`` (tensors) to ``sums[key]`` = [*running sums, tasks added]: a data-aware method folds
    each task's statistics into its merge's sums as they are collected, instead of holding every task's."""
    if key not in sums:
        sums[key] = [*terms, 1]
        return
    for acc, term in zip(sums[key], terms):
        acc += term
    sums[key][-1] += 1


def complete(sums: dict, t_count: int) -> dict:
    """The sums of the keys every one of ``t_count`` tasks added to (a key some task lacks has no statistics)."""
    return {k: tuple(v[:-1]) for k, v in sums.items() if v[-1] == t_count}


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
