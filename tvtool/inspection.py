"""How big are my task vectors, and how orthogonal are they to each other and within themselves?

All statistics stream tensor by tensor and read each file once: for every tensor name the inputs' tensors are
stacked into one (n_vectors x numel) matrix and every pairwise statistic is taken from it together.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import TVToolError
from .fileio import atomic_path
from .safetensors_io import FLOAT_CODES, to_float32, torch  # torch: imported on first use (compare, plots)
from .taskvector import BLOCK, TaskVectorFile, check_compatible, open_vector

# safetensors codes -> the dtype names summary reports (torch's names, without importing torch)
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _squared_norm(a: np.ndarray, code: str) -> float:
    """sum(x^2) accumulated in float64, block by block (bounded memory)."""
    flat = a.reshape(-1)
    total = 0.0
    for s in range(0, flat.size, BLOCK):
        block = to_float32(flat[s:s + BLOCK], code).astype(np.float64)
        total += float(np.dot(block, block))
    return total


def summary(path: str | os.PathLike) -> dict:
    """Tensors, parameter count, L2 norm, base, tasks, mode and history of one vector (no torch needed)."""
    v = open_vector(path)
    sq = 0.0
    for k in v.keys():
        code = v.code(k)
        if code in FLOAT_CODES:
            sq += _squared_norm(v.array(k), code)  # array() refuses NaN / inf, naming the tensor
        v.release(k)
    dtypes = sorted({_DTYPE_NAMES[v.code(k)] for k in v.keys()})
    meta = v.meta
    return {
        "path": str(v.path), "fingerprint": v.fingerprint, "tensors": len(v), "parameters": v.numel(),
        "l2_norm": math.sqrt(sq), "dtypes": dtypes, "base": meta.get("base"), "tasks": v.tasks,
        "mode": meta.get("mode"), "orthoreg": meta.get("orthoreg"), "metrics": meta.get("metrics"),
        "history": meta.get("history") or [],
    }


def _column_angle_stats(dw: torch.Tensor) -> dict | None:
    """Angles between pairs of columns of a 2-D update (the paper's statistic): mean |angle - 90 deg|."""
    cols = dw.to(torch.float32)
    norms = torch.linalg.vector_norm(cols, dim=0)
    cols = cols[:, norms > 0] / norms[norms > 0]
    n = cols.shape[1]
    if n < 2:
        return None
    cos = (cols.T @ cols).clamp_(-1.0, 1.0)
    iu = torch.triu_indices(n, n, offset=1)
    angles = torch.rad2deg(torch.arccos(cos[iu[0], iu[1]]))
    dev = (angles - 90.0).abs()
    q = torch.quantile(angles[: min(angles.numel(), 1 << 24)], torch.tensor([0.05, 0.5, 0.95]))
    return {"pairs": int(angles.numel()), "mean_abs_dev_deg": float(dev.mean()),
            "angle_p05": float(q[0]), "angle_median": float(q[1]), "angle_p95": float(q[2])}


def compare(paths: Sequence[str | os.PathLike], *, per_layer: bool = False, ortho: bool = False) -> dict:
    """Pairwise cosine similarity of the flattened vectors (and per tensor, ortho stats, sign conflicts)."""
    if len(paths) < 1:
        raise TVToolError("give at least one task vector")
    vecs: list[TaskVectorFile] = [open_vector(p) for p in paths]
    keys = check_compatible(vecs, union=True, unknown_base_ok=True)  # comparing only: nothing is written
    n = len(vecs)
    gram = torch.zeros(n, n, dtype=torch.float64)
    conflicts = torch.zeros(n, n, dtype=torch.float64)
    both_nonzero = torch.zeros(n, n, dtype=torch.float64)
    layers = []
    ortho_rows = []
    for k in keys:
        shape = next(v.shape(k) for v in vecs if k in v)
        numel = math.prod(shape)
        if numel == 0:
            continue
        x = torch.zeros(n, numel, dtype=torch.float32)
        for i, v in enumerate(vecs):
            if k in v:
                x[i] = v.get(k).reshape(-1)  # copies into the stack; the file's pages are released next
                v.release(k)
        g = (x @ x.T).double()
        gram += g
        if ortho and n > 1:
            s = torch.sign(x)
            nz = (s != 0).to(torch.float32)
            both_nonzero += (nz @ nz.T).double()
            # product of signs is -1 exactly where both are nonzero and disagree
            conflicts += ((nz @ nz.T - s @ s.T) / 2).double()
        if per_layer:
            layers.append({"tensor": k, "shape": list(shape), "cosine": _cos(g).tolist()})
        if ortho and len(shape) == 2:
            row = {"tensor": k, "shape": list(shape), "per_vector": []}
            for i in range(n):
                row["per_vector"].append(_column_angle_stats(x[i].view(shape)))
            ortho_rows.append(row)
        del x
    result = {"vectors": [str(p) for p in paths], "cosine": _cos(gram).tolist(),
              "norms": gram.diagonal().sqrt().tolist()}
    if per_layer:
        result["per_layer"] = layers
    if ortho:
        result["ortho"] = ortho_rows
        means = []
        for i in range(n):
            devs = [r["per_vector"][i]["mean_abs_dev_deg"] for r in ortho_rows if r["per_vector"][i]]
            means.append(sum(devs) / len(devs) if devs else None)
        result["ortho_mean_abs_dev_deg"] = means
        if n > 1:
            rate = torch.where(both_nonzero > 0, conflicts / both_nonzero.clamp_min(1), torch.zeros_like(conflicts))
            result["sign_conflict"] = rate.tolist()
    return result


def _cos(g: torch.Tensor) -> torch.Tensor:
    d = g.diagonal().sqrt()
    denom = d[:, None] * d[None, :]
    return torch.where(denom > 0, g / denom.clamp_min(1e-300), torch.zeros_like(g))


def mean_offdiagonal(matrix: Sequence[Sequence[float]]) -> float | None:
    n = len(matrix)
    vals = [matrix[i][j] for i in range(n) for j in range(n) if i != j]
    return sum(vals) / len(vals) if vals else None


def plot_heatmap(matrix, labels: Sequence[str], path: str | os.PathLike, *, title: str = "cosine similarity",
                 vmin: float | None = None, vmax: float | None = None, force: bool = False) -> None:
    """Draw a labelled heat-map PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = torch.as_tensor(matrix, dtype=torch.float64).numpy()
    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(m, cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    if len(labels) <= 12:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    with atomic_path(path, force) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
