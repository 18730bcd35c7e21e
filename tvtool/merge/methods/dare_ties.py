"""DARE's random drop in place of TIES' trim, then TIES' sign election and disjoint mean."""
from __future__ import annotations

from ..gta import DISJOINT, P, SIGN, combine, random_drop
from ..registry import register
from .ties import TIES_GRID, TIES_GRID_SOURCE


@register("dare-ties", kind="sparse", options={"p": P, "sign": SIGN, "disjoint": DISJOINT}, random=True,
          paper='Yu et al., ICML 2024 (DARE) with Yadav et al., NeurIPS 2023 (TIES)',
          url="https://arxiv.org/abs/2311.03099", code="yule-BUAA/MergeLM; mergekit dare_ties",
          alpha_grid=TIES_GRID, alpha_source="TIES' grid (a disjoint mean): " + TIES_GRID_SOURCE)
def dare_ties(tensors, key, *, p, sign, disjoint, generator):
    """DARE then TIES' sign election and disjoint mean (Yu et al., ICML 2024; Yadav et al., NeurIPS 2023).

    DARE's random drop-and-rescale takes the place of TIES' magnitude trim (mergekit's dare_ties; mergekit sums the
    agreeing entries: disjoint=sum).
    """
    return combine(tensors, sparsify=random_drop(p, generator), elect=sign, how=disjoint)
