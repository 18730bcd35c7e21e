"""Task arithmetic: alpha * the sum of the vectors."""
from __future__ import annotations

from ..gta import combine
from ..registry import register


@register("sum", kind="arithmetic",
          paper='Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023',
          url="https://arxiv.org/abs/2212.04089", code="mlfoundations/task_vectors",
          alpha_grid="0:1:0.05", alpha_source="the protocol: alpha chosen on Val over 0..1 step 0.05")
def sum_(tensors, key, *, alpha):
    """Task arithmetic: alpha * sum of the vectors (Ilharco et al., "Editing models with task arithmetic", ICLR 2023).

    Identical, bit for bit, to `tvtool add --alpha A`.
    """
    return combine(tensors, scale=alpha)
