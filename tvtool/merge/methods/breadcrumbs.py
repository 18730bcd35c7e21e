"""Model Breadcrumbs: drop each vector's outliers and its negligible entries, then sum."""
from __future__ import annotations

from ..gta import BETA, GAMMA, combine, outliers
from ..registry import register

BREADCRUMBS_PAPER = ('Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", '
                     'ECCV 2024')


@register("breadcrumbs", kind="sparse", options={"beta": BETA, "gamma": GAMMA},
          paper=BREADCRUMBS_PAPER, url="https://arxiv.org/abs/2312.06795", code="rezazzr/breadcrumbs",
          alpha_grid="0:1:0.05",
          alpha_source="task arithmetic's grid; the authors search alpha in [0.01, 1] with beta and gamma")
def breadcrumbs(tensors, key, *, beta, gamma):
    """Model Breadcrumbs: drop the largest beta% and the smallest gamma% magnitudes of each vector per layer, then
    sum (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", ECCV 2024).

    Entries tied with a cut are dropped with it. The paper tunes beta and gamma on validation data; the defaults
    keep the middle 89%, a common mergekit setting (the authors' code cuts per row and keeps far less: see
    docs/PROTOCOL.md).
    """
    return combine(tensors, sparsify=outliers(beta, gamma))
