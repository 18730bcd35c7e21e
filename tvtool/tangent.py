"""The tangent model's maths (Ortiz-Jimenez et al.): f(x; theta_0) + J(x) (theta - theta_0), evaluated for many
points at once.

Its features are affine in the weights' offset, so for offsets sum_k c_k v_k every point's features are
f(x; theta_0) + sum_k c_k J(x) v_k: one jvp per batch and direction v_k serves a whole grid of coefficients.
The tower itself is :class:`tvtool.variants.LinearizedVisual` (what linearized fine-tuning trains).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .variants import LinearizedVisual


def linearize(visual: torch.nn.Module) -> LinearizedVisual:
    """The tangent model of ``visual`` around its current weights (theta_0: the tower's own tensors, never
    modified; theta: trainable copies, initially equal)."""
    return LinearizedVisual(visual).eval()


def tangent_vector(lin: LinearizedVisual, direction: Mapping[str, torch.Tensor], prefix: str = ""
                   ) -> tuple[torch.Tensor, ...]:
    """``direction`` (keys ``prefix + name``) as a jvp tangent of ``lin``: one tensor per parameter, in
    ``lin.names`` order, zeros where ``direction`` has none."""
    out = []
    for name, p0 in zip(lin.names, lin.theta0()):
        p0, d = p0.detach(), direction.get(prefix + name)
        out.append(torch.zeros_like(p0) if d is None else d.to(p0.device, p0.dtype))
    return tuple(out)


def predictions(lin: LinearizedVisual, batches: Iterable[torch.Tensor], head: torch.Tensor,
                tangents: Sequence[tuple[torch.Tensor, ...]], coefs: Sequence[Sequence[float]], *,
                autocast: bool, chunk: int, n: int) -> torch.Tensor:
    """Predicted classes [P, N] of the tangent model at theta_0 + sum_k coefs[p][k] * tangents[k] for every point p,
    over the normalized image ``batches`` (``n`` images in all) and the zero-shot ``head`` [C, D].

    Per batch: one jvp per tangent, then the points ``chunk`` at a time ([chunk, B, D] features: a fine grid stays
    small). Under ``autocast`` (bf16) the jvp runs in bf16 and the sum of its terms in fp32. The result is written in
    place (per-batch tensors kept to the end fragment the host heap: see ``Evaluator.predict``)."""
    device = head.device
    coef = torch.tensor(coefs, dtype=torch.float32, device=device).view(len(coefs), len(tangents), 1, 1)
    preds = torch.empty((len(coefs), n), dtype=torch.int64, device=device)
    done = 0
    for xb in batches:
        jouts = []
        for tangent in tangents:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                out, jout = lin.pair(xb, tangent)
            if isinstance(out, tuple):
                out, jout = out[0], jout[0]
            jouts.append(jout.float())
        out, jouts = out.float(), torch.stack(jouts)  # [B, D], [K, B, D]
        for j in range(0, coef.shape[0], chunk):
            feats = out + (coef[j:j + chunk] * jouts).sum(1)
            torch.argmax(F.normalize(feats, dim=-1) @ head.T, -1, out=preds[j:j + chunk, done:done + len(xb)])
        done += len(xb)
    if done != n:
        raise ValueError(f"{done} images in the batches, {n} expected")
    return preds
