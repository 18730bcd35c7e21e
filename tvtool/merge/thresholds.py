"""Exact global top-k magnitude thresholds of whole task vectors, streamed (TIES' trim over each flattened vector)."""
from __future__ import annotations

import math
from typing import Sequence

from .parts import get, n_keep, release, torch

Tensor = "torch.Tensor"

_HI_BINS = 1 << 15  # |x| as float32 bits: sign bit 0, so the top 16 bits take 2^15 values
_LO_BINS = 1 << 16


def _abs_bits(t: Tensor) -> Tensor:
    """|t| as int32 bit patterns: for non-negative floats the bit order is the value order."""
    return t.reshape(-1).to(torch.float32).abs().view(torch.int32)


def global_magnitude_thresholds(sources: Sequence, keys: Sequence[str], percent: float) -> list[float]:
    """For each vector, the exact n-th largest |value| over all its tensors, n = floor(N percent / 100).

    Streaming radix select in two passes over the inputs, nothing bigger than one tensor held at a time: pass 1
    histograms the top 16 bits of each |value|'s float32 pattern (monotone in the value), which locates the bin
    holding the n-th largest; pass 2 histograms the low 16 bits of that bin's members, which pins the value.
    Memory: two small histograms per vector. Returns +inf (keep nothing) for n = 0 and 0.0 (keep all) for n = N.
    """
    t_count = len(sources)
    hist = torch.zeros(t_count, _HI_BINS, dtype=torch.int64)
    total = [0] * t_count
    for key in keys:
        for i, src in enumerate(sources):
            x = get(src, key)
            if x is None:
                continue
            bits = _abs_bits(x)
            total[i] += bits.numel()
            hist[i] += torch.bincount(bits >> 16, minlength=_HI_BINS)[:_HI_BINS]
            release(src, key)
    want = [n_keep(total[i], percent) for i in range(t_count)]
    # For each vector: the bin holding the n-th largest, and the rank of that value inside the bin (from the top).
    hi_bin, rank = [None] * t_count, [0] * t_count
    for i in range(t_count):
        if 0 < want[i] < total[i]:
            from_top = hist[i].flip(0).cumsum(0)
            j = int(torch.searchsorted(from_top, torch.tensor([want[i]])).item())
            hi_bin[i] = _HI_BINS - 1 - j
            rank[i] = want[i] - (int(from_top[j - 1]) if j > 0 else 0)
    lo_hist = torch.zeros(t_count, _LO_BINS, dtype=torch.int64)
    if any(b is not None for b in hi_bin):
        for key in keys:
            for i, src in enumerate(sources):
                if hi_bin[i] is None:
                    continue
                x = get(src, key)
                if x is None:
                    continue
                bits = _abs_bits(x)
                members = bits[(bits >> 16) == hi_bin[i]]
                if members.numel():
                    lo_hist[i] += torch.bincount(members & 0xFFFF, minlength=_LO_BINS)
                release(src, key)
    out = []
    for i in range(t_count):
        if want[i] == 0:
            out.append(math.inf)
        elif want[i] >= total[i]:
            out.append(0.0)
        else:
            from_top = lo_hist[i].flip(0).cumsum(0)
            j = int(torch.searchsorted(from_top, torch.tensor([rank[i]])).item())
            bits = (hi_bin[i] << 16) | (_LO_BINS - 1 - j)
            out.append(float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()))
    return out
