"""Fisher merging: each entry a weighted mean of the tasks' values, weighted by each model's diagonal Fisher."""
from __future__ import annotations

from ...errors import TVToolError
from ..parts import compute_device, torch
from ..registry import Option, register
from .regmean import BATCH, EXAMPLES


def _scaling(text, t_count):
    if text is None:
        return [1.0 / t_count] * t_count
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise TVToolError(f"fisher: option scaling={text!r} is not a comma-separated list of numbers") from None
    if len(values) != t_count or any(not (v >= 0) for v in values) or not any(values):
        raise TVToolError(f"fisher: option scaling needs {t_count} non-negative numbers (one per vector, in order), "
                          f"not all zero; got {text!r}")
    return values


def _check(options, n_inputs):
    _scaling(options["scaling"], n_inputs)


def coefficient(norm: float, scale: float, normalize: bool, eps: float) -> float:
    """Task t's coefficient c_t up to a factor common to every task (which cancels in :func:`fisher`): scaling_t,
    divided with ``normalize`` by ||F_t|| + eps, the L2 norm of its whole Fisher (FusionBench's
    merging_with_fisher_weights further divides by the sum over tasks)."""
    return scale / (norm + eps) if normalize else scale


def fold(sums: dict, key: str, fisher_t, tau, c: float, eps: float) -> None:
    """Add one task's terms to ``key``'s weighted mean (sum c (F + eps) tau, sum c (F + eps))."""
    from ..data import accumulate

    w = (fisher_t.to(torch.float32) + eps) * c
    accumulate(sums, key, (w * tau.to(w.device, torch.float32), w))


def _sum_scores(visual, params, x, head, estimator):
    """Squared-gradient Fisher terms of one batch, per parameter (a list aligned with ``params``)."""
    import torch.nn.functional as F

    logits = F.normalize(_features(visual, x), dim=-1) @ head.T
    if estimator == "batch":
        # FusionBench / MergeLM: the gradient of sum_{i,c} sqrt(p_ic) log p_ic over the batch, squared
        p = torch.softmax(logits, -1).detach()
        grads = torch.autograd.grad((p.sqrt() * torch.log_softmax(logits, -1)).sum(), params)
        return [g.square() for g in grads]
    # exact (the paper): sum_i sum_c p_ic (d log p_ic)^2, one gradient per example and class
    out = [torch.zeros_like(p) for p in params]
    logp = torch.log_softmax(logits, -1)
    p = logp.detach().exp()
    for i in range(logp.shape[0]):
        for c in range(logp.shape[1]):
            last = i == logp.shape[0] - 1 and c == logp.shape[1] - 1
            grads = torch.autograd.grad(logp[i, c], params, retain_graph=not last)
            for acc, g in zip(out, grads):
                acc.add_(g.square(), alpha=float(p[i, c]))
    return out


def _features(visual, x):
    out = visual(x)
    return out[0] if isinstance(out, tuple) else out


def collect_fishers(ctx, *, examples, batch, estimator, scaling, normalize, eps):
    """Per task t: the diagonal Fisher F_t of every image-tower parameter of theta_0 + tau_t on task t's training
    images, under the model's own predictive distribution (mean over the images); folded as each task is done into
    :func:`fisher`'s numerator sum_t c_t (F_t + eps) tau_t and denominator sum_t c_t (F_t + eps), so two tensors per
    key are held instead of every task's Fisher (2.8 GB for 8 ViT-B-32 tasks). c_t needs only task t's own norm:
    the coefficients' common normalization (to sum 1) cancels between numerator and denominator."""
    from ..data import complete

    wanted = set().union(*(tau.keys() for tau in ctx.taus))
    named = [(f"visual.{n}", p) for n, p in ctx.visual.named_parameters()]
    params = [p for _, p in named]
    was = [p.requires_grad for p in params]
    scales = _scaling(scaling, len(ctx.tasks))
    folded: dict[str, list] = {}  # key -> [numerator, denominator, tasks folded in]
    try:
        for p in params:
            p.requires_grad_(True)
        for i, task in enumerate(ctx.tasks):
            ctx.say(f"fisher: diagonal Fisher of {task} ({i + 1}/{len(ctx.tasks)}), {examples} images, "
                    f"{estimator} estimator")
            ctx.use(i)
            head = ctx.head(i)
            sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
            count = 0
            with torch.enable_grad():
                for x in ctx.batches(i, examples, batch):
                    for acc, s in zip(sums, _sum_scores(ctx.visual, params, x, head, estimator)):
                        acc.add_(s)
                    count += x.shape[0]
            # the mean over the images used (FusionBench's CLIP class too; its generic loop: batches x batch size);
            # the norm is the whole model's Fisher, whichever tensors the vectors hold
            norm = (sum(float(s.double().square().sum()) for s in sums) / count**2) ** 0.5
            c = coefficient(norm, scales[i], normalize, eps)
            with torch.no_grad():
                for (k, _), s in zip(named, sums):
                    tau = ctx.taus[i].get(k)
                    if k in wanted and tau is not None:
                        fold(folded, k, s / count, tau, c, eps)
            del sums
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)
    done = complete(folded, len(ctx.tasks))  # a key some task lacks: the mean
    return lambda key: {"folded": done.get(key)}


@register("fisher", kind="data-aware", collect=collect_fishers, check=_check, options={
    "examples": EXAMPLES,
    "batch": Option(int, 32, "images per gradient (FusionBench's CLIP config: 32); the batch estimator squares one "
                    "gradient per batch, so its Fisher depends on it", lo=1),
    "estimator": Option(str, "batch", "batch: FusionBench's (MergeLM's) squared gradient of the batch's "
                        "sum_c sqrt(p_c) log p_c | exact: the paper's per-image expectation sum_c p_c (d log p_c)^2 "
                        "(one backward pass per image and class)", choices=("batch", "exact")),
    "normalize": Option(bool, True, "divide each task's Fisher by its L2 norm over the whole tower (FusionBench's "
                        "normalize_fisher_weight, default true)"),
    "eps": Option(float, 1e-6, "added to every Fisher entry and norm against division by zero (FusionBench's "
                  "minimal_fisher_weight)", lo=0.0, lo_open=True),
    "scaling": Option(str, None, "per-task weights a,b,c (one per vector, in order; auto: 1/T each, as FusionBench "
                      "and the paper's uniform merge)"),
}, paper='Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022',
    url="https://arxiv.org/abs/2111.09832",
    code="mmatena/model_merging; FusionBench fisher_merging/fisher_merging.py, clip_fisher_merging.py",
    alpha_grid="1", alpha_source="Fisher merging uses the merged model as it is (alpha 1; FusionBench applies none)")
def fisher(tensors, key, *, folded):
    """Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022).

    Every entry: theta = sum_t c_t (F_t + eps) theta_t / sum_t c_t (F_t + eps), F_t the diagonal Fisher of the
    fine-tuned model theta_0 + tau_t on task t's training images, c_t the task's coefficient (``scaling``, divided by
    the norm of its Fisher with ``normalize``), as FusionBench's merging_with_fisher_weights. The weights sum to 1
    per entry, so merging weights or task vectors gives the same result. The Fisher is taken under the model's own
    predictive distribution: estimator=batch is FusionBench's (the square of one gradient per batch), exact the
    paper's expectation per image.

    ``folded`` is the (numerator, denominator) pair summed task by task (:func:`fold`) as the statistics are
    collected, or None for a tensor the model does not have (then the mean).
    """
    if folded is None:  # a tensor the model does not have (should be zero anyway): the mean
        return torch.stack(tensors).mean(0)
    num, den = (t.to(compute_device(), torch.float32) for t in folded)
    return (num / den).to(tensors[0].device)
