"""Breadcrumbs' sparsifier with TIES' sign election (mergekit's breadcrumbs_ties), from the parts."""
from __future__ import annotations

from ..gta import BETA, DISJOINT, GAMMA, SIGN, combine, outliers
from ..registry import register
from .breadcrumbs import BREADCRUMBS_PAPER
from .ties import TIES_GRID, TIES_GRID_SOURCE


@register("breadcrumbs-ties", kind="sparse",
          options={"beta": BETA, "gamma": GAMMA, "sign": SIGN, "disjoint": DISJOINT},
          paper=BREADCRUMBS_PAPER + " with Yadav et al., NeurIPS 2023 (TIES)",
          url="https://arxiv.org/abs/2312.06795", code="mergekit breadcrumbs_ties",
          alpha_grid=TIES_GRID, alpha_source="TIES' grid (a disjoint mean): " + TIES_GRID_SOURCE)
def breadcrumbs_ties(tensors, key, *, beta, gamma, sign, disjoint):
    """Breadcrumbs' outlier-and-small-entry drop, then TIES' sign election and disjoint mean (Davari & Belilovsky,
    ECCV 2024; Yadav et al., NeurIPS 2023; composed as mergekit's breadcrumbs_ties, which sums: disjoint=sum)."""
    return combine(tensors, sparsify=outliers(beta, gamma), elect=sign, how=disjoint)
