"""Data parallelism for ``finetune`` under ``torchrun``: PyTorch's DistributedDataParallel, or FSDP2 for towers
that do not fit one device.

* **DDP** (default with 2+ processes): the training step (:class:`tvtool.train.TrainStep`: classifier, task loss and
  OrthoReg penalty) is wrapped in ``DistributedDataParallel``, whose gradient buckets are all-reduced while the
  backward is still running. Non-final micro-batches of a gradient-accumulation step run under ``no_sync()``.
* **FSDP2** (``--fsdp``): every residual block of the image tower and then the tower itself go through
  ``torch.distributed.fsdp.fully_shard``: parameters, gradients and AdamW's state are sharded over the ranks and
  each block is gathered only while it runs. Every 2-D tensor is sharded along its longer side, so OrthoReg's
  smaller Gram matrix of a layer is the sum of the ranks' local Grams: one all-reduce of a k x k matrix per layer,
  and a gradient that needs no communication at all (``tvtool.orthoreg``: ``ShardedGramDefect``).

Why the penalty's gradient comes out right in both (the derivation the tests check numerically). Each of the ``W``
ranks computes the loss ``l_r = c_r L_r + lam P`` with the task loss ``L_r`` of its ``n_r`` images weighted
``c_r = n_r W / n`` and the *whole* penalty ``P`` (the same value on every rank: the same weights).
DDP averages: ``g = (1/W) sum_r grad l_r = sum_r (n_r / n) grad L_r + lam grad P`` - the global batch's mean task
gradient plus the penalty's gradient once, exactly what one process computes. Adding ``lam P / W`` on each rank
instead would divide it by W; adding it outside DDP's averaging would count it W times.
FSDP2 reduce-scatters the blocks' gradients with the same average, so the task part is the same; the penalty's
gradient does not pass through the blocks (it is taken with respect to the local shards directly, after the
forward) and is not averaged, so each rank must contribute the penalty's full gradient for its own shard and
nothing for the others' - which is what the local-Gram computation gives: the all-reduce inside the penalty has an
identity backward (every rank holds the same downstream gradient dP/dG).
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .errors import TVToolError

def shard_dim(shape) -> int:
    """FSDP2's shard dimension for a tensor: the longer side of a 2-D tensor (0 for ties and other tensors)."""
    return 1 if len(shape) == 2 and shape[0] < shape[1] else 0


def _placement(param: nn.Parameter):
    from torch.distributed.tensor import Shard

    return Shard(shard_dim(param.shape))


def ddp(step: nn.Module, device: str) -> tuple[nn.Module, Callable]:
    """``step`` wrapped in DistributedDataParallel, and its ``no_sync`` (for non-final micro-batches)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [torch.device(device).index or 0] if device.startswith("cuda") else None
    # broadcast_buffers=False: the buffers (the frozen head, OrthoReg's theta_0 stacks) never change and are equal
    # on every rank; DDP would otherwise broadcast all of them before every forward
    module = DDP(step, device_ids=ids, broadcast_buffers=False)
    return module, module.no_sync


def shard_tower(tuned, device: str) -> Callable:
    """Shard the image tower with FSDP2 (each residual block, then the tower) and return its ``no_sync``.

    Call it before building OrthoReg and the optimizer: both must see the sharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if tuned.mode == "linear":
        raise TVToolError("--fsdp does not support --mode linear (the jvp runs over the whole tower); "
                          "use DDP (the default) or another mode")
    visual = tuned.module
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None:
        raise TVToolError("--fsdp needs a ViT image tower (transformer.resblocks); run without --fsdp")
    mesh = init_device_mesh(torch.device(device).type, (torch.distributed.get_world_size(),))
    # theta_0 moves to the host (it is read once, for the task vector at the end); OrthoReg keeps on the device
    # only the shards it needs
    for k, v in list(tuned.theta0.items()):
        tuned.theta0[k] = v.detach().to("cpu")
    for block in blocks:
        fully_shard(block, mesh=mesh, shard_placement_fn=_placement)
    fully_shard(visual, mesh=mesh, shard_placement_fn=_placement)

    @contextlib.contextmanager
    def no_sync():
        visual.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            visual.set_requires_gradient_sync(True)

    return no_sync


def is_sharded(t) -> bool:
    """Whether ``t`` is an FSDP2 shard (a DTensor). Nothing can be one before torch.distributed.tensor is imported,
    and that import takes most of a second: not done here."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every rank must call it, in the same order); other tensors as
    they are. Differentiable: its backward hands each rank its own shard of the gradient."""
    return t.full_tensor() if is_sharded(t) else t


def local_shard(full_tensor: torch.Tensor, like) -> torch.Tensor:
    """This rank's piece of ``full_tensor`` as FSDP2 shards ``like`` (torch.chunk along the shard dimension)."""
    placement = like.placements[0]
    mesh = like.device_mesh
    piece = torch.chunk(full_tensor, mesh.size(), dim=placement.dim)
    rank = mesh.get_local_rank()
    local = like.to_local()
    out = piece[rank] if rank < len(piece) else full_tensor.narrow(placement.dim, 0, 0)
    if out.shape != local.shape:
        raise TVToolError(f"FSDP shard of shape {tuple(local.shape)} does not match the expected "
                          f"{tuple(out.shape)}; run without --fsdp")
    return out


def gather_task_vector(tuned) -> dict[str, torch.Tensor]:
    """The task vector (base key -> dW, fp32, on the CPU) of a model sharded with FSDP2: every rank takes part in
    the gathers; every rank gets the result."""
    out = {}
    with torch.no_grad():
        if tuned.mode == "lora":
            for k, (b, a, s) in tuned.lora_factors().items():
                out[k] = (full(b).float() @ full(a).float() * s).cpu()
        else:
            for k, p in tuned.current().items():
                out[k] = full(p).float().cpu() - tuned.theta0[k].float().cpu()
    return out


def gather_state(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors (on the CPU) of possibly sharded ones, for a checkpoint: a collective."""
    return {k: full(v.detach()).cpu() for k, v in tensors.items()}


def gather_optimizer_state(state: dict) -> dict:
    """An optimizer ``state_dict()`` with every sharded tensor gathered whole onto the CPU (a collective)."""
    def walk(v):
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, torch.Tensor) and is_sharded(v):
            return v.full_tensor().cpu()
        return v

    return walk(state)


def shard_optimizer_state(state: dict, params: list[torch.Tensor]) -> dict:
    """The inverse of :func:`gather_optimizer_state` for ``optimizer.load_state_dict``: a whole per-parameter
    tensor becomes the local shard of its parameter, as a sharded tensor like the parameter."""
    from torch.distributed.tensor import DTensor

    out = dict(state)
    out["state"] = {}
    for i, st in state["state"].items():
        p = params[int(i)]
        new = {}
        for name, v in st.items():
            if is_sharded(p) and isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape):
                local = local_shard(v.to(p.to_local().device), p).to(p.dtype).contiguous()
                v = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                       shape=p.shape, stride=p.stride())
            new[name] = v
        out["state"][i] = new
    return out


def load_trainable(named: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Copy whole tensors from a checkpoint into possibly sharded parameters (each rank its shard)."""
    with torch.no_grad():
        for k, p in named.items():
            src = state[k]
            if is_sharded(p):
                p.to_local().copy_(local_shard(src.to(p.to_local().device), p))
            else:
                p.copy_(src)
