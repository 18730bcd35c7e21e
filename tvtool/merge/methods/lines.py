"""LiNeS: another method's merged update, scaled up linearly with the depth of the block each tensor belongs to."""
from __future__ import annotations

import re

from ..driver import merge_stream
from ..parts import get, torch
from ..registry import REGISTRY, Option, get_method, nested_options, register

_BLOCK = re.compile(r"\.(\d+)\.")  # the authors match ".<i>." in the key: ...resblocks.<i>....


def block_index(key: str) -> int | None:
    """The residual block a key belongs to (the first ".<i>." in it), None outside the blocks."""
    hit = _BLOCK.search(key)
    return int(hit.group(1)) if hit else None


def _prepass(sources, keys, options, seed) -> dict:
    """Merge with the inner method once (kept in memory, one vector) and measure the l1 norms LiNeS' floor needs."""
    inner_opts = nested_options(options, "base")
    merged, sum_l1, merged_l1 = {}, 0.0, 0.0
    for key, out in merge_stream(options["base"], sources, keys, inner_opts, seed=seed):
        merged[key] = out
        merged_l1 += float(out.abs().sum(dtype=torch.float64))
        total = None  # the sources still hold this key until the stream moves on
        for t in (get(s, key) for s in sources):
            if t is not None:
                total = t.to(torch.float32) if total is None else total + t.to(torch.float32)
        sum_l1 += float(total.abs().sum(dtype=torch.float64))
    blocks = [b for b in map(block_index, keys) if b is not None]
    return {"merged": merged, "sum_l1": sum_l1, "merged_l1": merged_l1, "n_vectors": len(sources),
            "n_blocks": max(blocks) + 1 if blocks else 0}


def _check(opts, n_inputs) -> None:
    inner = get_method(opts["base"])
    if inner.check is not None:
        inner.check(nested_options(opts, "base"), n_inputs)


@register("lines", kind="layer scaling", nested="base", prepass=_prepass, check=_check, options={
    "base": Option(str, "sum", "the method whose merged update is rescaled (its options: base.<name>=value)",
                   choices=tuple(REGISTRY)),
    "beta": Option(float, 0.5, "scale added from the first block to the last (the paper tunes it on Val, "
                   "0.1..1.0; `tvtool run` searches it); 0.5 is the middle of that range, not a published value",
                   lo=0.0),
    "floor": Option(float, None, "scale of the first block and of every tensor outside the blocks (auto: the "
                    "authors' ||sum_t tau_t||_1 / (T ||merged||_1))", lo=0.0),
    "blocks": Option(int, None, "number of residual blocks L (auto: 1 + the largest '.<i>.' index in the keys)",
                     lo=1),
}, paper='Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging", '
         'ICLR 2025',
    url="https://arxiv.org/abs/2410.17146", code="wang-kee/LiNeS (src/eval/eval.py LiNeS_scaling)",
    alpha_grid="1", alpha_source="the LiNeS-scaled update is applied as it is; beta is what the paper tunes",
    tune=("beta", "0.1:1:0.1", "the authors' code: 0.1..1.0 for task arithmetic and consensus (0.1..1.5 for TIES)"))
def lines(tensors, key, *, base, beta, floor, blocks, merged, sum_l1, merged_l1, n_vectors,
          n_blocks):
    """LiNeS on a merged update (Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances
    Model Merging", ICLR 2025).

    The base method's output for a tensor of block l (0-based, of L) is multiplied by floor + beta * l / (L - 1);
    tensors outside the blocks (embeddings, pre/post norms, projection) get floor. floor defaults to the authors'
    multi-task rule ||sum_t tau_t||_1 / (T ||merged||_1), so early layers keep roughly a 1/T share of the tasks'
    total update and the last ones gain beta more. The base output is computed once and held in memory (one
    vector).
    """
    out = merged.pop(key)
    level = floor if floor is not None else (sum_l1 / (n_vectors * merged_l1) if merged_l1 else 0.0)
    depth = blocks if blocks is not None else n_blocks
    b = block_index(key)
    if b is not None and depth > 1:
        level = level + beta * min(b, depth - 1) / (depth - 1)
    return out * level
