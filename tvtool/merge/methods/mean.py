"""A uniform model soup: the mean of the vectors."""
from __future__ import annotations

from ..parts import flat
from ..registry import register


@register("mean", kind="arithmetic",
          paper='Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy '
                'without increasing inference time", ICML 2022',
          url="https://arxiv.org/abs/2203.05482", code="mlfoundations/model-soups",
          alpha_grid="1", alpha_source="a uniform soup is used as it is (alpha 1)")
def mean(tensors, key):
    """Plain average of the vectors: a uniform model soup (Wortsman et al., "Model soups", ICML 2022), i.e. task
    arithmetic with alpha = 1/T."""
    return flat(tensors).mean(0).reshape(tensors[0].shape)
