"""TIES-merging: top-k trim, sign election, disjoint mean (generalized task arithmetic's parts)."""
from __future__ import annotations

from ..gta import DISJOINT, K, SIGN, combine, top_k
from ..registry import Option, register
from ..thresholds import global_magnitude_thresholds

TIES_GRID = "0.1:1.5:0.1"
TIES_GRID_SOURCE = ("LiNeS' code (wang-kee/LiNeS src/eval/eval.py) searches TIES' disjoint mean over 0.1..1.5; "
                    "the TALL-masks code it derives from uses 0.1..1.0")
SCOPE = Option(str, "global", "where the top-k% is taken: global (over each whole vector, as the paper and its "
               "code; one extra streaming pass) | tensor (per tensor)", choices=("global", "tensor"))


def global_prepass(sources, keys, options, seed) -> dict:
    """The exact global top-k cut of each vector, when the trim is global."""
    if options["scope"] != "global":
        return {}
    return {"thresholds": global_magnitude_thresholds(sources, keys, options["k"])}


@register("ties", kind="sparse", options={"k": K, "sign": SIGN, "scope": SCOPE, "disjoint": DISJOINT},
          prepass=global_prepass,
          paper='Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023',
          url="https://arxiv.org/abs/2306.01708", code="prateeksha10/ties-merging; FusionBench ties_merging_utils",
          alpha_grid=TIES_GRID, alpha_source=TIES_GRID_SOURCE)
def ties(tensors, key, *, k, sign, scope, disjoint, thresholds=None):
    """TIES-merging: trim, elect sign, disjoint mean (Yadav et al., "TIES-Merging: Resolving Interference When
    Merging Models", NeurIPS 2023).

    Each vector keeps its top k% magnitudes (entries tied with the cut are kept; the cut is exact, the top
    floor(N k/100) entries, where the reference code keeps one more); the sign of each entry is elected by total
    mass (or count); the result is the mean of the kept entries that agree with it. A tie in the election is
    broken by the other rule; a tie under both gives 0. With scope=global the cut is taken over the whole
    flattened vector (``thresholds``, from a streaming first pass).
    """
    return combine(tensors, sparsify=top_k(k, thresholds if scope == "global" else None), elect=sign, how=disjoint)
