"""DELLA-merging: magnitude-ranked random drop (MagPrune), TIES' sign election, disjoint mean."""
from __future__ import annotations

from ...errors import TVToolError
from ..gta import DISJOINT, SIGN, combine, magprune
from ..registry import Option, register
from .ties import TIES_GRID, TIES_GRID_SOURCE

DROP = Option(float, 0.3, "mean drop probability p (1 - density; the authors' README example: 0.3)", lo=0.0,
              hi=1.0, lo_open=True, hi_open=True)
EPS = Option(float, 0.07, "half the window of keep probabilities, 1-p-eps .. 1-p+eps across magnitude ranks (the "
             "authors' README example window 0.14)", lo=0.0, hi=0.5)


def _check(opts, n_inputs) -> None:
    p, eps = opts["p"], opts["eps"]
    if not (0 < 1 - p - eps and 1 - p + eps <= 1):
        raise TVToolError(f"della: keep probabilities 1-p-eps={1 - p - eps:g} .. 1-p+eps={1 - p + eps:g} must lie in "
                          "(0, 1]; lower eps or move p")


@register("della", kind="sparse", options={"p": DROP, "eps": EPS, "sign": SIGN, "disjoint": DISJOINT},
          random=True, check=_check,
          paper='Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based '
                'Sampling", arXiv 2024',
          url="https://arxiv.org/abs/2406.11617", code="declare-lab/della (mergekit/sparsify.py rank_magnitude)",
          alpha_grid=TIES_GRID, alpha_source="TIES' grid (a disjoint mean; the authors' example lambda is 1.1): "
                                             + TIES_GRID_SOURCE)
def della(tensors, key, *, p, eps, sign, disjoint, generator):
    """DELLA-merging: MagPrune, elect, disjoint mean (Deep et al., "DELLA-Merging: Reducing Interference in Model
    Merging through Magnitude-Based Sampling", arXiv 2024).

    Within each row of each vector's tensor, entries are ranked by magnitude and kept with probability rising
    linearly from 1-p-eps (smallest) to 1-p+eps (largest); each survivor is divided by its own keep probability.
    Then TIES' sign election and the disjoint mean, as the authors' merge method "della". With eps=0 it is
    dare-ties (the same draws for the same seed).
    """
    return combine(tensors, sparsify=magprune(p, eps, tensors[0].shape, generator), elect=sign, how=disjoint)
