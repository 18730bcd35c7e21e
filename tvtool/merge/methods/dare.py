"""DARE + task arithmetic: random drop and rescale, then sum."""
from __future__ import annotations

from ..gta import P, combine, random_drop
from ..registry import register


@register("dare", kind="sparse", options={"p": P}, random=True,
          paper='Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free '
                'Lunch", ICML 2024',
          url="https://arxiv.org/abs/2311.03099", code="yule-BUAA/MergeLM",
          alpha_grid="0:1:0.05", alpha_source="DARE is applied before task arithmetic, whose alpha search it keeps")
def dare(tensors, key, *, p, generator):
    """DARE + task arithmetic: drop each entry with probability p, rescale by 1/(1-p), then sum (Yu et al.,
    "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch", ICML 2024).
    """
    return combine(tensors, sparsify=random_drop(p, generator))
