"""Iso-CTS: Iso-C's common subspace, with its weakest directions replaced by task-specific ones."""
from __future__ import annotations

from ..parts import FALLBACK, RTOL, compute_device, fallback as fall_back, polar, rank_mask, svd, torch, work_dtype
from ..registry import Option, register
from .iso_c import ISO_CODE, ISO_GRID, ISO_GRID_SOURCE, ISO_PAPER


def subspace_sizes(q: int, t_count: int, fraction: float) -> tuple[int, int]:
    """(common size, directions per task), as the authors' code rounds them: the task-specific part is made a
    multiple of T (Python's round, half to even) and the common part takes the rest."""
    common = int(q * fraction)
    specific_total = round((q - common) / t_count) * t_count
    common = q - specific_total
    return common, int((q - common) / t_count)


@register("iso-cts", kind="spectral", per_layer=True, options={
    "fraction": Option(float, 0.8, "share of the min(m, n) directions given to the common subspace (the paper's "
                       "ViT setting 0.8); the rest is split equally among the tasks", lo=0.0, hi=1.0),
    "fallback": FALLBACK,
    "rtol": RTOL,
}, paper=ISO_PAPER, url="https://arxiv.org/abs/2502.04959", code=ISO_CODE,
    alpha_grid=ISO_GRID, alpha_source=ISO_GRID_SOURCE)
def iso_cts(tensors, key, *, fraction, fallback, rtol):
    """Iso-CTS, per 2-D layer (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces", ICML 2025).

    The sum's top c singular directions (c ~ fraction * min(m, n)) form the common subspace; each task's update,
    projected off the common column space, contributes its top s = (min(m, n) - c) / T directions. The U's and V's
    are concatenated, replaced by their orthogonal polar factors, and given a flat spectrum: the mean of all the
    kept singular values. Tensors that are not 2-D are averaged, as the authors' code does (fallback=sum adds
    them). SVDs run on the GPU when there is one.

    As in iso-c and tsv, directions with zero singular value (see rtol) are left out, so rank-deficient updates
    merge deterministically inside their span; full-rank inputs merge exactly as the authors' code.
    """
    if tensors[0].ndim != 2:
        return fall_back(tensors, fallback)
    t_count = len(tensors)
    m, n = tensors[0].shape
    q = min(m, n)
    common, per_task = subspace_sizes(q, t_count, fraction)
    x = torch.stack(tensors).to(compute_device(), work_dtype(tensors[0]))
    u, s, vh = svd(x.sum(0))
    uc = u[:, :common]
    u_ts, s_ts, vh_ts = svd(x - uc @ (uc.T @ x))  # each task without the common column space, batched
    u_cat = torch.cat([u_ts[:, :, :per_task].permute(1, 0, 2).reshape(m, t_count * per_task), uc], 1)
    s_cat = torch.cat([s_ts[:, :per_task].reshape(-1), s[:common]])
    vh_cat = torch.cat([vh_ts[:, :per_task, :].reshape(t_count * per_task, n), vh[:common]], 0)
    keep = int(rank_mask(s_cat.sort(descending=True).values, (m, n), rtol).sum())  # how many are non-zero
    if keep == 0:
        return torch.zeros_like(tensors[0])
    order = s_cat.argsort(descending=True, stable=True)[:keep]  # drop the zero ones (rank-deficient inputs)
    level = s_cat[order].sum() / keep
    out = (polar(u_cat[:, order], rtol) * level) @ polar(vh_cat[order], rtol)
    return out.to(tensors[0].device)
