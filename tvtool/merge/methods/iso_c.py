"""Iso-C: the summed update with a flat (isotropic) spectrum, per 2-D layer."""
from __future__ import annotations

from ..parts import FALLBACK, RTOL, fallback as fall_back, flat, rank_mask, svd
from ..registry import register

ISO_PAPER = ('Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific '
             'Subspaces", ICML 2025')
ISO_CODE = "danielm1405/iso-merging; FusionBench isotropic_merging/iso_utils.py"
ISO_GRID = "0.1:3:0.1"
ISO_GRID_SOURCE = ("the Iso paper tunes alpha on Val above 1; its code searches 0.1..3.0 step 0.1 "
                   "(FusionBench's example uses 1.5)")


@register("iso-c", kind="spectral", per_layer=True, options={"fallback": FALLBACK, "rtol": RTOL},
          paper=ISO_PAPER, url="https://arxiv.org/abs/2502.04959", code=ISO_CODE,
          alpha_grid=ISO_GRID, alpha_source=ISO_GRID_SOURCE)
def iso_c(tensors, key, *, fallback, rtol):
    """Iso-C, per 2-D layer (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces", ICML 2025).

    The summed update U S V^T gets a flat spectrum: mean(S) U V^T (alpha then rescales it, tuned above 1 as the
    paper does). Tensors that are not 2-D are averaged, as the authors' code does (fallback=sum adds them). SVDs
    run on the GPU when there is one.

    Only the non-zero part of the spectrum is flattened (see rtol): for a rank-k sum (LoRA updates) the result is
    mean(S_k) U_k V_k^T, deterministic, inside the span of the inputs and with the sum's nuclear norm; full-rank
    sums get the paper's formula unchanged.
    """
    if tensors[0].ndim != 2:
        return fall_back(tensors, fallback)
    total = flat(tensors).sum(0).reshape(tensors[0].shape)
    u, s, vh = svd(total)
    keep = rank_mask(s, total.shape, rtol)
    level = (s * keep).sum() / keep.sum().clamp(min=1)  # mean of the non-zero singular values (0 for a zero sum)
    return ((u * (keep * level)) @ vh).to(tensors[0].device)
