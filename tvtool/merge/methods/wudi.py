"""WUDI-merging: per 2-D layer, the merged update that least disturbs each task along its own task vector."""
from __future__ import annotations

from ..parts import FALLBACK, compute_device, fallback as fall_back, torch
from ..registry import Option, register


@register("wudi", kind="optimization", per_layer=True, options={
    "iters": Option(int, 300, "Adam iterations per layer (the authors' code and FusionBench's function: 300)",
                    lo=0),
    "lr": Option(float, 1e-5, "Adam learning rate (the authors' code and FusionBench: 1e-5)", lo=0.0),
    "fallback": FALLBACK,
}, paper='Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task '
         'Vectors", ICML 2025',
    url="https://arxiv.org/abs/2503.08099", code="nathanielyvo/WUDI-Merging; FusionBench wudi/wudi.py",
    alpha_grid="1", alpha_source="WUDI merges without a rescaling coefficient (alpha 1)")
def wudi(tensors, key, *, iters, lr, fallback):
    """WUDI-merging, per 2-D layer (Cheng et al., "Whoever Started the Interference Should End It: Guiding
    Data-Free Model Merging via Task Vectors", ICML 2025).

    Starting from the sum, Adam (lr, iters; betas 0.9/0.999, eps 1e-8) minimizes
        L(M) = sum_t ||(M - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2,
    the interference of M on the inputs each task vector spans. The gradient is computed in closed form,
    dL/dM = 2 (M S - B) with S = sum_t tau_t^T tau_t / ||tau_t||^2 and B = sum_t tau_t tau_t^T tau_t / ||tau_t||^2
    formed once, so an iteration costs one m x n x n product instead of T of them (and no autograd). Tasks whose
    update is zero in this layer add nothing (the authors' code would divide by 0). Tensors that are not 2-D are
    averaged, as FusionBench does (fallback=sum adds them). Runs on the GPU when there is one.
    """
    if tensors[0].ndim != 2:
        return fall_back(tensors, fallback)
    dev = compute_device()
    x = torch.stack(tensors).to(dev, torch.float32)
    merged = x.sum(0).clone()
    norms = x.reshape(len(tensors), -1).norm(dim=1).square()
    live = norms > 0
    if iters == 0 or not bool(live.any()):
        return merged.to(tensors[0].device)
    xs = x[live] / norms[live].sqrt()[:, None, None]  # tau_t / ||tau_t||: S and B from the scaled updates
    gram = xs.transpose(1, 2) @ xs  # T x n x n
    s_mat = gram.sum(0)
    b_mat = (x[live] @ gram).sum(0)
    param = torch.nn.Parameter(merged)
    opt = torch.optim.Adam([param], lr=lr, weight_decay=0)
    with torch.no_grad():
        for _ in range(iters):
            param.grad = 2.0 * (param @ s_mat - b_mat)
            opt.step()
    return param.detach().to(tensors[0].device)
