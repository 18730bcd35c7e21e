"""Consensus task arithmetic: keep the entries that at least k TALL masks mark as important."""
from __future__ import annotations

from ...errors import TVToolError
from ..parts import flat, torch, zero
from ..registry import Option, register


def _check(opts, n_inputs) -> None:
    if opts["k"] > n_inputs:
        raise TVToolError(f"consensus: k={opts['k']} but only {n_inputs} vector(s) given, so every entry would be "
                          "dropped; pass --option k=1 or more vectors")


@register("consensus", kind="mask", check=_check, options={
    "k": Option(int, 2, "keep entries that at least k task masks mark as important", lo=0),
    "lam": Option(float, 0.4, "TALL-mask threshold: task t marks entries where |tau_t| >= lam |tau_sum - tau_t| "
                  "(the authors choose it per task on Val from 0.2..0.6)", lo=0.0),
}, paper='Wang et al., "Localizing Task Information for Improved Model Merging and Compression", ICML 2024',
    url="https://arxiv.org/abs/2405.07813", code="nik-dim/tall_masks",
    alpha_grid="0:1:0.05", alpha_source="task arithmetic's grid (the authors' code: 0.1..1.0 step 0.1)")
def consensus(tensors, key, *, k, lam):
    """Consensus task arithmetic with TALL masks (Wang et al., "Localizing Task Information for Improved Model
    Merging and Compression", ICML 2024).

    mask_t = |tau_t| >= lam * |tau_MTL - tau_t| with tau_MTL = sum_t tau_t; entries marked by at least k masks
    are kept, the rest of tau_MTL is zeroed (k=2 removes "selfish" and "catastrophic" weights).
    """
    x = flat(tensors)
    mtl = x.sum(0)
    votes = (x.abs() >= lam * (mtl - x).abs()).sum(0)
    return torch.where(votes >= k, mtl, zero(x)).reshape(tensors[0].shape)
