"""RegMean: per linear layer, the weights that best reproduce every task's outputs on its own inputs."""
from __future__ import annotations

from ..parts import compute_device, flat, torch
from ..registry import Option, register

EXAMPLES = Option(int, 256, "training images per task the statistics are computed on, a --seed-chosen subset "
                  "(FusionBench's CLIP config: 256)", lo=1)
BATCH = Option(int, 32, "images per forward pass (FusionBench's CLIP config: 32); RegMean's result does not depend "
               "on it", lo=1)


def collect_grams(ctx, *, examples, batch, ratio):
    """Per task t: G_t = X_t^T X_t / rows for every linear map of the image tower, X_t its inputs (all tokens) on
    task t's training images through the fine-tuned model theta_0 + tau_t; folded as each task is done into the
    normal equations of :func:`regmean`, sum_t G_t~ and sum_t G_t~ tau_t^T, so one pair per layer is held instead
    of every task's Gram matrices (4.3 GB for 8 ViT-B-32 tasks)."""
    from ..data import complete, linear_inputs

    wanted = set().union(*(tau.keys() for tau in ctx.taus))
    sums: dict[str, list] = {}  # key -> [sum_t G_t~, sum_t G_t~ tau_t^T, tasks folded in]
    with torch.no_grad():
        for i, task in enumerate(ctx.tasks):
            ctx.say(f"regmean: Gram matrices of {task} ({i + 1}/{len(ctx.tasks)}), {examples} images")
            ctx.use(i)
            with linear_inputs(ctx.visual, wanted) as rec:
                for x in ctx.batches(i, examples, batch):
                    ctx.visual(x)
            for key, gram in rec.means().items():
                tau = ctx.taus[i].get(key)
                if tau is not None and tau.ndim == 2:
                    fold(sums, key, gram.to(tau.device), tau, ratio)
    done = complete(sums, len(ctx.tasks))  # a layer without every task's statistics is averaged
    return lambda key: {"normal": done.get(key)}


def fold(sums: dict, key: str, gram, tau, ratio: float) -> None:
    """Add one task's terms to ``key``'s normal equations (sum G~, sum G~ tau^T)."""
    from ..data import accumulate

    g = reduced(gram.to(torch.float32), ratio)
    accumulate(sums, key, (g, g @ tau.to(g.device, torch.float32).T))


def reduced(gram, ratio: float):
    """G~: G's diagonal kept, its other entries multiplied by ``ratio``."""
    if ratio == 1.0:
        return gram
    eye = torch.eye(gram.shape[-1], dtype=torch.bool, device=gram.device)
    return torch.where(eye, gram, gram * ratio)


@register("regmean", kind="data-aware", collect=collect_grams, options={
    "ratio": Option(float, 0.95, "off-diagonal entries of each Gram matrix are multiplied by this (the paper's alpha, "
                    "FusionBench's reduce_non_diagonal_ratio; its CLIP config: 0.95, its generic config: 0.1; "
                    "1 = plain least squares)", lo=0.0, hi=1.0),
    "examples": EXAMPLES,
    "batch": BATCH,
}, paper='Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023',
    url="https://arxiv.org/abs/2212.09849",
    code="bloomberg/dataless-model-merging; FusionBench regmean/regmean.py, clip_regmean.py",
    alpha_grid="1", alpha_source="RegMean's merged model is used as it is (alpha 1; FusionBench applies none)")
def regmean(tensors, key, *, normal):
    """RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023).

    For each linear map W (out x in) of the image tower: W = (sum_t G_t~)^-1 sum_t G_t~ W_t (acting on W^T), where
    G_t = X_t^T X_t / rows is the Gram matrix of the layer's inputs on task t's training images through the
    fine-tuned model theta_0 + tau_t, and G~ keeps G's diagonal and multiplies the rest by ``ratio``. Merging
    weights or task vectors gives the same result (theta_0 cancels), so the output is the merged task vector.
    Every other tensor (biases, norms, class token, conv, the projection) is averaged, as the authors' code does.
    open_clip's attention keeps q, k and v in one in_proj_weight: it gets the statistics of the attention's input,
    out_proj those of the attention context (FusionBench's HF CLIP: separate q/k/v layers, the same input).

    ``normal`` is the layer's normal equations (sum_t G_t~, sum_t G_t~ W_t^T), folded task by task (:func:`fold`)
    as the statistics are collected, or None for a tensor without statistics.
    """
    if normal is None or tensors[0].ndim != 2:
        return flat(tensors).mean(0).reshape(tensors[0].shape)
    dev = compute_device()
    lhs, rhs = (t.to(dev, torch.float32) for t in normal)
    try:
        merged = torch.linalg.solve(lhs, rhs)
    except RuntimeError:  # singular (inputs that never vary, ratio 1): the least-norm least-squares solution
        merged = torch.linalg.pinv(lhs) @ rhs
    return merged.T.contiguous().to(tensors[0].device)
