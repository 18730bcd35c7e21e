"""TSV-Merge: per 2-D layer, the tasks' top singular directions, decorrelated by orthogonal polar factors."""
from __future__ import annotations

from ..parts import FALLBACK, RTOL, fallback as fall_back, polar, rank_mask, svd, torch
from ..registry import Option, register


@register("tsv", kind="spectral", per_layer=True, options={
    "fraction": Option(float, None, "fraction of each task's singular directions kept per layer "
                       "(auto: 1/T, as the paper)", lo=0.0, hi=1.0),
    "fallback": FALLBACK,
    "rtol": RTOL,
}, paper='Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025',
    url="https://arxiv.org/abs/2412.00081",
    code="AntoAndGar/task_singular_vectors; FusionBench task_singular_vector/utils/TSVM_utils.py",
    alpha_grid="1", alpha_source="the paper merges at alpha 1 (FusionBench's config too); the authors' code can "
                                 "search 0.1:3:0.1 (pass it as the grid)")
def tsv(tensors, key, *, fraction, fallback, rtol):
    """TSV-Merge, per 2-D layer (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model
    Merging", CVPR 2025).

    Each task's update is truncated to its top r = max(1, floor(fraction * min(m, n))) singular triplets; the U's
    and V's are concatenated and replaced by their orthogonal polar factors (U_perp = P Q^T from the SVD
    U = P S Q^T: whitening that removes the tasks' overlap); the result is U_perp diag(S) V_perp^T. Tensors that
    are not 2-D are averaged, as the authors' code does (fallback=sum adds them). SVDs run on the GPU when there
    is one.

    Rank-deficient updates (LoRA: rank 8 < r): a task's triplets with zero singular value (see rtol) are dropped
    before the concatenation, and the polar factors orthogonalise only the non-zero part of the spectrum, so the
    result is deterministic and lies in the span of the inputs; full-rank inputs merge exactly as the paper's.
    """
    if tensors[0].ndim != 2:
        return fall_back(tensors, fallback)
    t_count = len(tensors)
    m, n = tensors[0].shape
    frac = 1.0 / t_count if fraction is None else fraction
    r = max(1, int(frac * min(m, n) + 1e-9))
    u, s, vh = svd(torch.stack(tensors))  # batched: T x m x q, T x q, T x q x n
    s = s[:, :r]
    keep = rank_mask(s, (m, n), rtol)  # T x r; zeroed triplets keep the shapes static (no host sync)
    u_cat = (u[:, :, :r] * keep[:, None, :]).permute(1, 0, 2).reshape(m, t_count * r)
    s_cat = (s * keep).reshape(-1)
    vh_cat = (vh[:, :r, :] * keep[:, :, None]).reshape(t_count * r, n)
    out = (polar(u_cat, rtol) * s_cat) @ polar(vh_cat, rtol)
    return out.to(tensors[0].device)
