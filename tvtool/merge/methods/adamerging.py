"""AdaMerging's description and options (declared once): the method itself needs the model and the tasks' unlabeled
test images, so it runs in `tvtool eval adamerging` (tvtool/adamerging.py), never in the file-only driver."""
from __future__ import annotations

from ...errors import TVToolError
from ..registry import Option, register

COMMAND = "tvtool eval adamerging A.st B.st ... [--layer-wise | --task-wise]"


@register("adamerging", kind="data-aware", command=COMMAND, options={
    "granularity": Option(str, "layer", "layer: one coefficient per task and tensor (layer-wise AdaMerging); task: "
                          "one per task (task-wise)", choices=("layer", "task")),
    "steps": Option(int, 500, "Adam steps, each on one batch of every task (the paper and the authors' code: 500; "
                    "FusionBench's config: 1000)", lo=1),
    "lr": Option(float, 1e-3, "Adam learning rate of the coefficients (the paper, the authors' code, FusionBench)",
                 lo=0.0, lo_open=True),
    "init": Option(float, 0.3, "initial value of every coefficient (the paper's prior 0.3; FusionBench's "
                   "init_values)"),
    "clamp": Option(bool, True, "clip the coefficients to [0, 1] in the forward (the authors' code; FusionBench's "
                    "CLIP config leaves them free)"),
    "batch_size": Option(int, 16, "unlabeled test images of each task per step (the authors' code, FusionBench)",
                         lo=1),
    "eps": Option(float, 0.0, "entropy as -sum p log(p + eps): 0 is the exact entropy of the authors' code; "
                  "FusionBench's entropy_loss adds 1e-8", lo=0.0, hi=1.0),
    "seed": Option(int, 0, "seed of the order in which each task's test images are drawn"),
}, paper='Yang et al., "AdaMerging: Adaptive Model Merging for Multi-task Learning", ICLR 2024',
    url="https://arxiv.org/abs/2310.02575",
    code="EnnengYang/AdaMerging; FusionBench 0.2.33 adamerging/ (entropy_loss.py, layer_wise_fusion.py)",
    alpha_grid="1", alpha_source="the coefficients are learned (no alpha search): the merged vector is applied as "
                                 "it is")
def adamerging(tensors, key, *, granularity, steps, lr, init, clamp, batch_size, eps, seed):
    """AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-task Learning", ICLR 2024).

    theta = theta_0 + sum_t lambda_t,l tau_t,l, with the coefficients lambda (one per task and tensor, or one per task)
    learned by Adam to minimize sum over tasks of the mean Shannon entropy of the merged model's predictions on
    unlabeled test images of every task. Writes the merged vector sum_t lambda_t,l tau_t,l with the learned lambdas.
    """
    raise TVToolError(f"adamerging needs the model and the tasks' data; run `{COMMAND}`")
