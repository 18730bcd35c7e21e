"""Tensor building blocks shared by the merge methods (flattening, top-k cuts, SVDs, polar factors) and the
options several methods share, declared once."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

from .._lazy import lazy_module
from ..defaults import default_device
from .registry import Option

# torch is imported when a method first runs, never by `merge --list`; `Tensor` appears only in annotations.
torch = lazy_module("torch")
Tensor = "torch.Tensor"

FALLBACK = Option(str, "mean", "what tensors that are not 2-D (biases, norms, class token, conv) get: mean (the "
                  "authors' code) | sum (plain addition)", choices=("mean", "sum"))
RTOL = Option(float, None, "singular values <= rtol x the largest count as zero and are left out (auto: "
              "max(m, n) x float32 eps, numpy's matrix_rank rule; raise it, e.g. to 1e-3, for low-rank updates "
              "stored in bf16)", lo=0.0, hi=1.0)


_PINNED: list = []  # devices pinned by `on_device`, innermost last


def compute_device() -> torch.device:
    """Where the per-layer methods compute: the default device (the GPU when there is one), unless `on_device` pins
    another."""
    if _PINNED:
        return torch.device(_PINNED[-1])
    return torch.device(default_device())


@contextmanager
def on_device(device):
    """Run the methods' heavy steps (SVDs, WUDI's optimization) on ``device`` inside the block (benchmarks compare
    GPU and CPU this way)."""
    _PINNED.append(device)
    try:
        yield
    finally:
        _PINNED.pop()


def zero(x: Tensor) -> Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def flat(tensors: Sequence[Tensor]) -> Tensor:
    """The T inputs as the rows of one T x N matrix."""
    return torch.stack([t.reshape(-1) for t in tensors])


def fallback(tensors: Sequence[Tensor], how: str) -> Tensor:
    """Plain sum or mean, for the tensors a per-layer method does not handle."""
    out = flat(tensors).sum(0)
    if how == "mean":
        out = out / len(tensors)
    return out.reshape(tensors[0].shape)


def n_keep(numel: int, percent: float) -> int:
    """How many entries "the top percent%" of numel means (floor, as the TIES reference)."""
    return min(numel, int(numel * percent / 100.0 + 1e-9))


def kth_largest_abs(x: Tensor, n: int) -> Tensor:
    """Per row of x (T x N): the n-th largest |value| (1 <= n <= N), as a T x 1 tensor."""
    return x.abs().kthvalue(x.shape[1] - n + 1, dim=1, keepdim=True).values


def work_dtype(x: Tensor) -> torch.dtype:
    """float32 for every input the driver gives (fp32, bf16, fp16); float64 kept when a caller asks for it."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def svd(x: Tensor):
    """Thin SVD on the GPU when there is one (the expensive step of the per-layer methods)."""
    return torch.linalg.svd(x.to(compute_device(), work_dtype(x)), full_matrices=False)


def rank_mask(s: Tensor, shape: Sequence[int], rtol: float | None) -> Tensor:
    """Which singular values (s: [..., q], descending) are numerically non-zero: s > tol * s_max.

    The singular vectors of zero singular values are arbitrary (any basis of the null space), so a method that
    gives them weight is neither deterministic nor confined to the span of its inputs. tol defaults to
    max(m, n) * float32 eps (numpy's matrix_rank rule); an all-zero matrix has no non-zero singular value.
    """
    tol = max(shape) * torch.finfo(torch.float32).eps if rtol is None else rtol
    return s > tol * s[..., :1]


def polar(a: Tensor, rtol: float | None = None) -> Tensor:
    """The orthogonal polar factor P Q^T of a = P S Q^T: the closest matrix with orthonormal columns (or rows).

    Only the numerically non-zero part of the spectrum is kept: for a rank-deficient a the result is the partial
    isometry P_k Q_k^T, unique and inside a's column and row spaces (the full polar factor is not unique there).
    """
    p, s, qh = svd(a)
    return (p * rank_mask(s, a.shape, rtol)) @ qh


# --------------------------------------------------------------------------------------------------- sources
def get(src, key):
    """A source's tensor for key, or None when it lacks the key (``--union``: it then counts as zeros)."""
    return src.get(key) if key in src else None


def release(src, key) -> None:
    """Let a memory-mapped source drop its page references for key (task-vector files implement it)."""
    rel = getattr(src, "release", None)
    if rel is not None and key in src:
        rel(key)
