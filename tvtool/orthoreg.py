"""OrthoReg: the orthogonality regularizer of "Understanding and Enforcing Weight Disentanglement in Task Arithmetic".

The training loss is ``L_task(theta_0 + dtheta) + lam * P`` with, per tuned layer ``l`` and ``dW_l = W_l - W_l^0``
(a torch weight of shape ``m x n``: ``m`` rows = outputs, ``n`` columns = inputs, ``k = min(m, n)``):

* ``form="squared"`` (the paper, default): ``P = sum_l ||dW_l^T dW_l - I_n||_F^2``.
* ``form="plain"`` (the reference code): ``P = sum_l ||G_l - I_k||_F`` with ``G_l`` the *smaller* Gram matrix
  (``dW dW^T`` when ``m < n``, else ``dW^T dW``), i.e. not squared and with the smaller identity, as that code does.

Both are computed from the smaller Gram only. With ``s_l = ||G_l - I_k||_F^2`` the expansions
``||dW^T dW - I_n||^2 = ||dW^T dW||^2 - 2||dW||^2 + n`` and ``||G - I_k||^2 = ||G||^2 - 2||dW||^2 + k`` and
``||dW^T dW||_F = ||dW dW^T||_F`` give exactly ``||dW^T dW - I_n||_F^2 = s_l + (n - k)``: the paper's term is the
small-Gram term plus a constant, so wide layers (``mlp.c_proj``: 768 x 3072) cost a 768 x 768 Gram, not 3072 x 3072,
with no cancellation error. At ``dW = 0`` the penalty is ``sum_l n_l`` (squared) or ``sum_l sqrt(k_l)`` (plain) and
its gradient is exactly zero; afterwards it pushes the singular values of ``dW`` toward 1.

Which layers (``scope``):

* ``"visual-linear"`` (default): the tuned visual linear layers of every ViT block: ``attn.in_proj_weight`` (fused
  QKV, one matrix), ``attn.out_proj.weight``, ``mlp.c_fc.weight``, ``mlp.c_proj.weight``.
* ``"reference"``: what the reference code sums over: every trainable 2-D tensor outside the text transformer, i.e.
  the above plus ``visual.proj``, ``visual.positional_embedding`` and, only when trainable in the model given, the
  text leftovers ``token_embedding.weight``, ``positional_embedding``, ``text_projection``.

Speed: theta_0 of the selected layers is copied onto the parameters' device once, stacked per (shape) group; every
call does one stack + subtraction and one ``baddbmm`` (``G - I`` in one kernel) per group instead of a Python loop
over layers, and the backward is one more batched product (``4 dW M``, hand-derived) where autograd would run two.
Everything runs in fp32 with autocast disabled (opt-in ``precision="tf32"``: the exact penalty's two products in
TF32). ``estimator="hutchinson"`` replaces ``||M||_F^2`` by the unbiased ``mean_p ||M z_p||^2`` over Rademacher
probes ``z`` with ``M z = dW^T (dW z) - z``: O(probes * m * n) instead of O(m * n * k). Unbiased for the squared form only (the square root of an unbiased estimate is biased, so
``form="plain"`` refuses it). Near dW = 0 its value is almost exact (a Rademacher probe has ||z||^2 = k exactly) but
its gradient is noisy: relative error about sqrt(k / probes), 28 for ViT-B-32 with one probe (bench_orthoreg.py).

LoRA: for ``dW = s * B @ A`` (rank r) the exact term needs no dense Gram at all: with ``R = (B^T B)(A A^T)`` (r x r),
``||dW^T dW - I_n||^2 = s^4 tr(R R) - 2 s^2 tr(R) + n`` (see :meth:`OrthoReg.from_tuned`).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .errors import TVToolError
from . import parallel
from .parallel import full

# the options' choices are declared with TrainConfig (torch-free: the CLI checks them before importing torch)
from .trainconfig import ESTIMATORS, FORMS, PRECISIONS, SCOPES  # noqa: E402,F401

_VISUAL_LINEAR = re.compile(
    r"^visual\.transformer\.resblocks\.\d+\.(attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc\.weight"
    r"|mlp\.c_proj\.weight)$"
)
_TEXT_LEFTOVERS = ("token_embedding.weight", "positional_embedding", "text_projection")


def select_names(shapes: Mapping[str, Sequence[int]], trainable: Callable[[str], bool], scope: str) -> list[str]:
    """The state-dict keys a scope regularizes, among ``shapes`` (key -> shape) whose tensor is trainable."""
    if scope not in SCOPES:
        raise TVToolError(f"unknown OrthoReg scope {scope!r}; use one of {', '.join(SCOPES)}")
    out = []
    for key, shape in shapes.items():
        if len(shape) != 2 or not trainable(key):
            continue
        if _VISUAL_LINEAR.match(key):
            out.append(key)
        elif scope == "reference" and (key.startswith("visual.") or key in _TEXT_LEFTOVERS):
            out.append(key)
    return out


class _Group:
    """Layers of one shape, penalised with one batched kernel. ``wide``: rows < cols, so the row Gram is smaller."""

    def __init__(self, names: list[str], shape: tuple[int, int]):
        self.names = names
        self.m, self.n = shape
        self.k = min(self.m, self.n)
        self.wide = self.m < self.n


def _group_by_shape(names: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> list[_Group]:
    groups: dict[tuple[int, int], list[str]] = {}
    for name in names:
        groups.setdefault(tuple(shapes[name]), []).append(name)
    return [_Group(ns, shape) for shape, ns in groups.items()]


# The exact penalty's kernel as two torch.library custom ops, so torch.compile captures it inside the compiled
# training step (and CUDA graphs record it with the model) while keeping the hand-derived backward: autograd through
# ``a^T a`` would run two batched products in the backward (one per operand); the symmetric M = a^T a - I needs one,
# so the exact penalty costs 2 instead of 3 (L x rows x k x k) products. The ops are opaque to the compiler, so the
# TF32 switch inside them holds in compiled and eager runs alike.
@torch.library.custom_op("tvtool::gram_defect", mutates_args=())
def _gram_defect(a: torch.Tensor, tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, M) with M_l = a_l^T a_l - I_k and s_l = ||M_l||_F^2, for a of shape (L, rows, k)."""
    with matmul_tf32(tf32):
        eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        m = torch.baddbmm(-eye, a.transpose(1, 2), a)  # G - I in one kernel
    return m.square().sum(dim=(1, 2)), m


@_gram_defect.register_fake
def _(a, tf32):
    return a.new_empty(a.shape[0]), a.new_empty(a.shape[0], a.shape[2], a.shape[2])


@torch.library.custom_op("tvtool::gram_defect_grad", mutates_args=())
def _gram_defect_grad(a: torch.Tensor, m: torch.Tensor, grad_s: torch.Tensor, tf32: bool) -> torch.Tensor:
    """d(sum_l g_l s_l) / d a = 4 g_l a_l M_l (M symmetric)."""
    with matmul_tf32(tf32):
        return torch.bmm(a, m).mul_(4 * grad_s.view(-1, 1, 1))


@_gram_defect_grad.register_fake
def _(a, m, grad_s, tf32):
    return a.new_empty(a.shape)  # contiguous, as bmm's result is, whatever a's strides (a transposed view: wide)


def _gram_defect_setup(ctx, inputs, output):
    a, tf32 = inputs
    ctx.tf32 = tf32  # the backward runs later, inside loss.backward(): it sets the precision again itself
    ctx.save_for_backward(a, output[1])


def _gram_defect_backward(ctx, grad_s, grad_m):
    # M is returned only to be saved for this backward (a custom op cannot save intermediates); it is never used
    # downstream (gram_defect() below drops it), so its incoming gradient is zero and ignored
    a, m = ctx.saved_tensors
    return _gram_defect_grad(a, m, grad_s, ctx.tf32), None


_gram_defect.register_autograd(_gram_defect_backward, setup_context=_gram_defect_setup)


def gram_defect(a: torch.Tensor, tf32: bool = False) -> torch.Tensor:
    """s_l = ||a_l^T a_l - I_k||_F^2 for a (L, rows, k), differentiable with the hand-derived gradient 4 a_l M_l;
    eager and under torch.compile alike."""
    return _gram_defect(a, tf32)[0]


@contextmanager
def matmul_tf32(enabled: bool):
    """TF32 matrix products inside the block when ``enabled`` (CUDA only; a no-op elsewhere). ``precision="tf32"``
    uses it for the exact penalty's two products, forward and backward: 2x faster on an H100
    (benchmarks/gpu_profile.py), with TF32's 10-bit mantissa in the products."""
    if not enabled:
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


# FSDP2 (tvtool.parallel.shard_tower): row shards a_r of each layer's a; the Gram is the sum of the local Grams
class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; the backward is the identity: every rank computes the same function of the sum, so the
    gradient with respect to the sum is already the same on every rank (an all-reduce there would multiply it by
    the number of ranks)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    return _AllReduceSum.apply(x, group)


class ShardedGramDefect(torch.autograd.Function):
    """s_l = ||sum_r a_{l,r}^T a_{l,r} - I||_F^2 for row shards a_r (L, rows_r, k) of a; gradient 4 a_r M (local,
    as in gram_defect). Eager only (--fsdp does not compile)."""

    @staticmethod
    def forward(ctx, a, tf32: bool = False):
        ctx.tf32 = tf32
        with matmul_tf32(tf32):
            g = torch.bmm(a.transpose(1, 2), a)
        torch.distributed.all_reduce(g)
        m = g - torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        ctx.save_for_backward(a, m)
        return m.square().sum(dim=(1, 2))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_s):
        a, m = ctx.saved_tensors
        with matmul_tf32(ctx.tf32):
            return torch.bmm(a, m).mul_(4 * grad_s.view(-1, 1, 1)), None


class OrthoReg(nn.Module):
    """The penalty over a fixed set of 2-D tensors (state-dict keys), grouped by shape.

    ``reg()`` returns the **scaled** term ``lam * P`` to add to the task loss; ``reg.penalty()`` returns the
    **unscaled** ``P`` (log this one). Either takes ``deltas`` (key -> dense ``dW``) or, when built with
    :meth:`from_model` / :meth:`from_tuned`, reads the current weights itself. Typical loop::

        reg = OrthoReg.from_tuned(tuned, lam=10.0)
        pen = reg.penalty()
        loss = task_loss + reg.lam * pen
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], *, lam: float = 1.0, form: str = "squared",
                 estimator: str = "exact", probes: int = 1, batched: bool = True, precision: str = "fp32"):
        super().__init__()
        if form not in FORMS:
            raise TVToolError(f"unknown OrthoReg form {form!r}; use one of {', '.join(FORMS)}")
        if estimator not in ESTIMATORS:
            raise TVToolError(f"unknown OrthoReg estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
        if estimator == "hutchinson" and form == "plain":
            raise TVToolError("the Hutchinson estimator is unbiased only for the squared form; "
                              "use --form squared or --estimator exact")
        if precision not in PRECISIONS:
            raise TVToolError(f"unknown OrthoReg precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        if not isinstance(probes, int) or probes < 1:
            raise TVToolError(f"OrthoReg probes must be a positive integer, got {probes!r}")
        if not math.isfinite(lam) or lam < 0:
            raise TVToolError(f"OrthoReg lambda must be a finite number >= 0, got {lam!r}")
        bad = [k for k, s in shapes.items() if len(s) != 2]
        if bad:
            raise TVToolError(f"OrthoReg applies to 2-D tensors only; {bad[0]} has shape {tuple(shapes[bad[0]])}")
        if not shapes:
            raise TVToolError("OrthoReg found no layer to regularize; check the fine-tuning mode and --orthoreg-scope")
        self.lam = float(lam)
        self.form = form
        self.estimator = estimator
        self.probes = probes
        self.batched = batched
        self.precision = precision
        self.shapes = {k: tuple(int(d) for d in s) for k, s in shapes.items()}
        self.names = list(self.shapes)
        self.groups = _group_by_shape(self.names, self.shapes)
        self._current: dict[str, torch.Tensor] | None = None  # key -> live parameter (not registered: not ours)
        self._lowrank: Callable[[], Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]] | None = None
        self._sharded = False  # the bound weights are FSDP2 shards (see _bind)

    # ----------------------------------------------------------------------------------------------- constructors
    @classmethod
    def from_model(cls, model_or_params: nn.Module | Mapping[str, torch.Tensor], names: Sequence[str] | None = None,
                   *, scope: str = "visual-linear", theta0: Mapping[str, torch.Tensor] | None = None,
                   **options) -> OrthoReg:
        """Regularize ``model``'s current weights against theta_0 = their values now (or ``theta0`` when given).

        ``names``: explicit state-dict keys; otherwise the ``scope`` rule over the *trainable* 2-D tensors.
        theta_0 is copied once to the parameters' device, stacked per shape group, in fp32.
        """
        if isinstance(model_or_params, nn.Module):
            params = dict(model_or_params.named_parameters())
        else:
            params = dict(model_or_params)
        shapes = {k: tuple(v.shape) for k, v in params.items()}
        if names is None:
            names = select_names(shapes, lambda k: params[k].requires_grad, scope)
        else:
            missing = [n for n in names if n not in params]
            if missing:
                raise TVToolError(f"OrthoReg layer {missing[0]!r} is not a parameter of the model; "
                                  "pass state-dict keys such as visual.transformer.resblocks.0.attn.in_proj_weight")
        reg = cls({n: shapes[n] for n in names}, **options)
        reg._bind(params, params if theta0 is None else theta0)
        return reg

    @classmethod
    def from_tuned(cls, tuned, *, scope: str = "visual-linear", **options) -> OrthoReg:
        """The penalty for a :class:`tvtool.variants.Tuned` (any mode) over its tuned layers.

        full / attn / linear: dW = current weight - theta_0, and theta_0 is shared with ``tuned`` (one copy on the
        device). lora: dW = s * B @ A; the exact estimator uses the r x r identity from the module docstring, the
        Hutchinson one the dense product. In lora mode the tuned layers are in_proj and out_proj for both scopes.
        """
        shapes = tuned.delta_shapes()
        trainable = set(tuned.delta_keys())
        names = select_names(shapes, lambda k: k in trainable, scope)
        reg = cls({n: shapes[n] for n in names}, **options)
        if tuned.mode == "lora":
            factors = tuned.lora_factors
            reg._lowrank = lambda: {k: v for k, v in factors().items() if k in reg.shapes}
            reg._sharded = any(parallel.is_sharded(b) for b, _, _ in reg._lowrank().values())
        else:
            current = tuned.current()
            reg._bind(current, tuned.theta0)
            tuned.adopt_theta0({n: reg.theta0(n) for n in reg.names})
        return reg

    def _bind(self, current: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor]) -> None:
        self._current = {n: current[n] for n in self.names}
        # FSDP2 (tvtool.parallel.shard_tower): the layers are sharded along their longer side, so the smaller Gram
        # is the sum of the ranks' local Grams; theta_0 is kept as the same local shards
        self._sharded = any(parallel.is_sharded(current[n]) for n in self.names)
        for i, g in enumerate(self.groups):
            with torch.no_grad():
                ref = [theta0[n].detach().to(current[n].device, torch.float32) for n in g.names]
                if self._sharded:
                    for n in g.names:
                        p = current[n]
                        if not parallel.is_sharded(p) or p.placements[0].dim != parallel.shard_dim(p.shape):
                            raise TVToolError(f"OrthoReg under FSDP needs {n} sharded along its longer side "
                                              "(tvtool.parallel.shard_tower does this)")
                    ref = [parallel.local_shard(t, current[n]) for t, n in zip(ref, g.names)]
                stack = torch.stack(ref)
            # persistent=False: theta_0 comes from the base weights, not from a training checkpoint.
            self.register_buffer(f"theta0_{i}", stack, persistent=False)

    def theta0(self, name: str) -> torch.Tensor:
        """The stored theta_0 of one layer (a view into its group's stack)."""
        for i, g in enumerate(self.groups):
            if name in g.names:
                return getattr(self, f"theta0_{i}")[g.names.index(name)]
        raise KeyError(name)

    # -------------------------------------------------------------------------------------------------- the value
    def forward(self, deltas: Mapping[str, torch.Tensor] | None = None,
                generator: torch.Generator | None = None, probes: Sequence[torch.Tensor] | None = None
                ) -> torch.Tensor:
        """``lam * P`` (scaled: add it to the task loss)."""
        return self.lam * self.penalty(deltas, generator, probes)

    def penalty(self, deltas: Mapping[str, torch.Tensor] | None = None,
                generator: torch.Generator | None = None, probes: Sequence[torch.Tensor] | None = None
                ) -> torch.Tensor:
        """The unscaled penalty ``P`` (a 0-dim fp32 tensor on the weights' device, differentiable).

        Hutchinson: ``probes`` (from :meth:`draw_probes`) or else drawn here from ``generator``. A compiled training
        step takes them as an input: torch.compile cannot trace a draw from a ``torch.Generator``."""
        device = self._device(deltas)
        with torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else nullcontext():
            if deltas is None and self._lowrank is not None and self.estimator == "exact":
                return self._lowrank_penalty(self._lowrank())
            if deltas is None and self._lowrank is not None:
                gather = full if self._sharded else (lambda t: t)
                deltas = {k: (s * (gather(b) @ gather(a))) for k, (b, a, s) in self._lowrank().items()}
            if deltas is None and self._current is None:
                raise TVToolError("OrthoReg needs the current deltas: pass deltas= or build it with from_model()")
            if self.estimator == "hutchinson" and probes is None:
                probes = self.draw_probes(generator, device)
            total = torch.zeros((), device=device, dtype=torch.float32)
            for i, g in enumerate(self.groups):
                z = probes[i] if probes is not None else None
                if self.batched:
                    total = total + self._group_terms(self._stacked(i, g, deltas), g, z, deltas is None).sum()
                else:  # per-layer loop: the reference against which the batched path is tested and timed
                    for j, n in enumerate(g.names):
                        dw = self._stacked(i, g, deltas, only=j)
                        zj = None if z is None else z[j:j + 1]
                        total = total + self._group_terms(dw, g, zj, deltas is None).sum()
            return total

    def draw_probes(self, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> list[torch.Tensor] | None:
        """The Hutchinson estimator's Rademacher probes of one call, one (L, k, probes) fp32 tensor per shape group
        (None for the exact estimator)."""
        if self.estimator != "hutchinson":
            return None
        device = self._device(None) if device is None else torch.device(device)
        out = []
        for g in self.groups:
            z = torch.empty(len(g.names), g.k, self.probes, device=device, dtype=torch.float32)
            out.append(z.bernoulli_(0.5, generator=generator).mul_(2).sub_(1))  # Rademacher +-1
        return out

    def penalty_at_zero(self) -> float:
        """P at dW = 0: sum of n_l (squared, n = columns) or sum of sqrt(k_l) (plain, k = min(rows, cols))."""
        if self.form == "squared":
            return float(sum(n for _, n in self.shapes.values()))
        return float(sum(math.sqrt(min(s)) for s in self.shapes.values()))

    # ---------------------------------------------------------------------------------------------------- internals
    def _device(self, deltas) -> torch.device:
        if deltas is not None:
            return next(iter(deltas.values())).device
        if self._current is not None:
            return next(iter(self._current.values())).device
        if self._lowrank is not None:
            return next(iter(self._lowrank().values()))[0].device
        return torch.device("cpu")

    def _stacked(self, i: int, g: _Group, deltas, only: int | None = None) -> torch.Tensor:
        """dW of a group as one fp32 (L, m, n) tensor (L = 1 with ``only``)."""
        names = g.names if only is None else [g.names[only]]
        if deltas is not None:
            try:
                return torch.stack([deltas[n] for n in names]).float()
            except KeyError as e:
                raise TVToolError(f"OrthoReg deltas lack layer {e.args[0]!r}; pass one dW per regularized layer") \
                    from None
        theta0 = getattr(self, f"theta0_{i}")
        if only is not None:
            theta0 = theta0[only:only + 1]
        current = [self._current[n] for n in names]
        if self._sharded:  # this rank's shards (differentiable: the gradient lands on the sharded parameters)
            current = [t.to_local() for t in current]
        # in place on the fresh stack: one (L, m, n) buffer less; stack's backward does not need its output
        return torch.stack(current).float().sub_(theta0)

    def _group_terms(self, dw: torch.Tensor, g: _Group, z: torch.Tensor | None, bound: bool = False) -> torch.Tensor:
        """Per-layer terms of one group: ||dW^T dW - I_n||^2 (squared) or ||G_small - I_k||_F (plain); ``z``: the
        Hutchinson probes of the group's layers; ``bound``: ``dw`` comes from the bound weights (maybe shards)."""
        sharded = bound and self._sharded  # row shards of a: the Gram (and a^T a z) is a sum over the ranks
        a = dw.transpose(1, 2) if g.wide else dw  # (L, rows, k): its column Gram is the smaller Gram
        if self.estimator == "exact":
            tf32 = self.precision == "tf32"
            s = ShardedGramDefect.apply(a, tf32) if sharded else gram_defect(a, tf32)
        else:
            z = z.to(dw.dtype)
            ata_z = torch.bmm(a.transpose(1, 2), torch.bmm(a, z))
            mz = (all_reduce_sum(ata_z) if sharded else ata_z) - z
            s = mz.square().sum(dim=(1, 2)) / self.probes
        if self.form == "squared":
            return s + float(g.n - g.k)
        # clamp: at an exactly orthonormal dW the subgradient of the norm is 0, not NaN
        return s.clamp_min(1e-30).sqrt()

    def _lowrank_penalty(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
        """Exact penalty from LoRA factors, dW = s B A with B (m x r), A (r x n), batched per shape group."""
        total = None
        for g in self.groups:
            try:
                bs, as_, ss = zip(*(factors[n] for n in g.names))
            except KeyError as e:
                raise TVToolError(f"OrthoReg: no LoRA factors for layer {e.args[0]!r}") from None
            if self._sharded:  # FSDP2 shards gathered (B: m x r, A: r x n are small)
                bs, as_ = [full(t) for t in bs], [full(t) for t in as_]
            b = torch.stack(bs).float()
            a = torch.stack(as_).float()
            scale = torch.tensor(ss, device=b.device, dtype=torch.float32).view(-1, 1, 1) ** 2
            p = torch.bmm(b.transpose(1, 2), b) * scale          # s^2 B^T B   (r x r)
            r = torch.bmm(p, torch.bmm(a, a.transpose(1, 2)))      # s^2 B^T B A A^T
            tr_r = r.diagonal(dim1=1, dim2=2).sum(-1)              # = ||dW||_F^2
            tr_rr = (r * r.transpose(1, 2)).sum(dim=(1, 2))        # = ||dW^T dW||_F^2
            s = tr_rr - 2 * tr_r + float(g.k)                      # ||G_small - I_k||^2
            terms = s + float(g.n - g.k) if self.form == "squared" else s.clamp_min(1e-30).sqrt()
            total = terms.sum() if total is None else total + terms.sum()
        return total

    def extra_repr(self) -> str:
        return (f"layers={len(self.names)}, groups={len(self.groups)}, lam={self.lam}, form={self.form}, "
                f"estimator={self.estimator}, probes={self.probes}")
