"""Generalized task arithmetic: the one driver behind task arithmetic, TIES, DARE, dare-ties, breadcrumbs,
breadcrumbs-ties and DELLA (mergekit builds them the same way).

    merged = aggregate( sparsify(tau_1), ..., sparsify(tau_T) )

- sparsify (per vector, pluggable): ``top_k`` magnitude (TIES), ``random_drop`` (DARE), ``outliers`` (breadcrumbs),
  ``magprune`` (DELLA's magnitude-ranked random drop); or none.
- aggregate: a plain ``sum``, or TIES' sign consensus (``elect``: mass or count) followed by the disjoint mean
  (or disjoint sum) of the entries that agree with the elected sign.

Each method file is then a few lines that pick the parts; the options they share are declared here once.
"""
from __future__ import annotations

from typing import Callable, Sequence

from .parts import flat, kth_largest_abs, n_keep, torch, zero
from .registry import Option

Tensor = "torch.Tensor"
Sparsifier = Callable[[Tensor], Tensor]  # T x N -> T x N, each row one vector's entries of this tensor

# ------------------------------------------------------------------------------------------- shared options
K = Option(float, 20.0, "percent of largest-magnitude entries kept per vector (0-100)", lo=0, hi=100)
SIGN = Option(str, "mass", "sign election: mass (sign of the sum, the paper) | count (majority of signs)",
              choices=("mass", "count"))
DISJOINT = Option(str, "mean", "how the entries that agree with the elected sign are combined: mean (the TIES "
                  "paper's disjoint mean) | sum (FusionBench's default merge_func, mergekit's normalize=false)",
                  choices=("mean", "sum"))
P = Option(float, 0.9, "drop probability p in [0, 1); survivors are rescaled by 1/(1-p)", lo=0.0, hi=1.0,
           hi_open=True)
BETA = Option(float, 1.0, "percent of largest magnitudes dropped per tensor of each vector", lo=0, hi=100)
GAMMA = Option(float, 10.0, "percent of smallest magnitudes dropped per tensor of each vector", lo=0, hi=100)


# ------------------------------------------------------------------------------------------- sparsifiers
def top_k(percent: float, thresholds: Sequence[float] | None = None) -> Sparsifier:
    """Keep each row's top percent% magnitudes; entries tied with the cut are kept.

    With ``thresholds`` (one per row, from the global prepass) the cut is given instead of computed per tensor.
    """
    def apply(x: Tensor) -> Tensor:
        if thresholds is not None:
            thr = torch.tensor([float(t) for t in thresholds], dtype=x.dtype, device=x.device).unsqueeze(1)
            keep = x.abs() >= thr
        else:
            n = n_keep(x.shape[1], percent)
            if n == 0:
                keep = torch.zeros_like(x, dtype=torch.bool)
            elif n == x.shape[1]:
                return x
            else:
                keep = x.abs() >= kth_largest_abs(x, n)
        return torch.where(keep, x, zero(x))

    return apply


def random_drop(p: float, generator: torch.Generator) -> Sparsifier:
    """DARE: drop each entry with probability p, rescale survivors by 1/(1-p); draws on the CPU."""
    def apply(x: Tensor) -> Tensor:
        if p == 0:
            return x
        keep = torch.rand(x.shape, generator=generator, dtype=torch.float32) >= p
        return torch.where(keep.to(x.device), x / (1.0 - p), zero(x))

    return apply


def outliers(beta: float, gamma: float) -> Sparsifier:
    """Breadcrumbs: drop each row's largest beta% and smallest gamma% magnitudes; entries tied with a cut go."""
    def apply(x: Tensor) -> Tensor:
        n = x.shape[1]
        n_top, n_bot = n_keep(n, beta), n_keep(n, gamma)
        if n_top + n_bot >= n:
            return torch.zeros_like(x)
        a = x.abs()
        keep = torch.ones_like(x, dtype=torch.bool)
        if n_top:
            keep &= a < kth_largest_abs(x, n_top)
        if n_bot:
            keep &= a > a.kthvalue(n_bot, dim=1, keepdim=True).values
        return torch.where(keep, x, zero(x))

    return apply


def magprune(p: float, eps: float, shape: Sequence[int], generator: torch.Generator) -> Sparsifier:
    """DELLA's MagPrune: per row of each vector's tensor (the last dimensions flattened; a 1-D tensor is one row),
    rank the entries by magnitude and drop entry i with probability p_i = p + eps - 2 eps (rank_i-1)/(n-1), the
    largest least likely; survivors are divided by their keep probability 1 - p_i. Draws on the CPU, exactly as
    ``random_drop`` does, so eps = 0 is DARE."""
    rows = int(shape[0]) if len(shape) >= 2 else 1

    def apply(x: Tensor) -> Tensor:
        t_count, numel = x.shape
        v = x.reshape(t_count, rows, numel // rows if rows else 0)
        n = v.shape[-1]
        order = torch.argsort(v.abs(), dim=-1, stable=True)  # stable: the same ranks on every device
        ranks = torch.argsort(order, dim=-1, stable=True).to(x.dtype)  # 0 = smallest
        rel = ranks / (n - 1) if n > 1 else torch.full_like(v, 0.5)
        drop = ((p + eps) - rel * (2.0 * eps)).reshape(t_count, numel)
        keep = torch.rand(x.shape, generator=generator, dtype=torch.float32).to(x.device) >= drop
        return torch.where(keep, x / (1.0 - drop), zero(x))

    return apply


# ------------------------------------------------------------------------------------------- aggregation
def elect_sign(x: Tensor, rule: str) -> Tensor:
    """TIES sign election over the rows of x: sign of the total mass (or of the count of signs).

    An exact tie under one rule is broken by the other; a tie under both gives 0 (the two sides cancel, and the
    disjoint mean below is then 0, as plain addition would give).
    """
    mass = torch.sign(x.sum(0))
    count = torch.sign(torch.sign(x).sum(0))
    first, second = (mass, count) if rule == "mass" else (count, mass)
    return torch.where(first != 0, first, second)


def disjoint(x: Tensor, elected: Tensor, how: str) -> Tensor:
    """Mean (or sum) over the rows whose entry is non-zero and agrees with the elected sign; 0 where none does."""
    # where the election tied (elected 0) only zeros "agree", so the result is 0 there, as documented
    agree = torch.sign(x) == elected
    total = torch.where(agree, x, zero(x)).sum(0)
    if how == "sum":
        return total
    return total / agree.sum(0).clamp(min=1).to(x.dtype)


def row_sum(x: Tensor) -> Tensor:
    """Rows added one after another: `tvtool add` adds vectors this way, so `sum` equals it bit for bit."""
    acc = x[0].clone()
    for row in x[1:]:
        acc.add_(row)
    return acc


def combine(tensors: Sequence[Tensor], *, sparsify: Sparsifier | None = None, elect: str | None = None,
            how: str = "mean", scale: float | None = None) -> Tensor:
    """The generalized task arithmetic of one tensor: sparsify each vector, then sum, or elect signs and take the
    disjoint mean / sum. ``scale`` multiplies each vector first (task arithmetic folds its alpha in there)."""
    x = flat(tensors)
    if scale is not None:
        x = x * scale  # each product rounded to fp32 before the sum, as `tvtool add` computes it
    if sparsify is not None:
        x = sparsify(x)
    out = row_sum(x) if elect is None else disjoint(x, elect_sign(x, elect), how)
    return out.reshape(tensors[0].shape)
