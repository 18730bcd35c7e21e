"""The first step's gradient of short finetune runs, for tests/test_parallel.py.

    python tests/dist_grads.py OUT_DIR CONFIGS_JSON                                   # one process
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_grads.py OUT_DIR CONFIGS_JSON   # DDP / FSDP2
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_grads.py --resume OUT_DIR CONFIG_JSON

For each config (TrainConfig fields plus ``name`` and optionally ``n_images``: keep only the first N training
images), finetune runs ONE optimizer step from a start moved away from theta_0 (seeded noise on the trainable
tensors, so the OrthoReg gradient is not zero), and rank 0 writes the step's whole gradient - after DDP's averaging
or FSDP2's reduce-scatter, gathered, before clipping - to ``OUT_DIR/<name>.pt`` (``{"grads": [...],
"ddp_bucket_reductions": n}``: how many gradient buckets DDP all-reduced in that step, through a counting comm hook
that does what DDP's default does). One step from the same start: the
runs differ only in the order of float sums, so their gradients must agree to fp32 rounding.
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

from tvtool import datasets, parallel, train, variants


@contextlib.contextmanager
def recording(path: Path, n_images: int | None):
    """While active: prepare() moves the trainable tensors off theta_0; the first clip_grad_norm_ call saves the
    gradient; load_split keeps the first ``n_images`` training images."""
    real_prepare, real_clip, real_split = variants.prepare, torch.nn.utils.clip_grad_norm_, datasets.load_split
    real_ddp = parallel.ddp
    reductions = [0]

    def ddp(step, device):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        module, no_sync = real_ddp(step, device)

        def counting(state, bucket):
            reductions[0] += 1
            return allreduce_hook(state, bucket)  # DDP's default: the bucket's sum divided by the world size

        module.register_comm_hook(None, counting)
        return module, no_sync

    def prepare(*a, **k):
        tuned = real_prepare(*a, **k)
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for _, p in tuned.named_trainable():
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
        return tuned

    def clip(params, *a, **k):
        params = list(params)
        grads = [parallel.full(p.grad).detach().float().cpu().clone() for p in params]  # a collective under FSDP
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0 and not path.exists():
            torch.save({"grads": grads, "ddp_bucket_reductions": reductions[0]}, path)
        return real_clip(params, *a, **k)

    def load_split(name, split, *a, **k):
        x, y = real_split(name, split, *a, **k)
        return (x[:n_images], y[:n_images]) if split == "train" and n_images else (x, y)

    patches = [(variants, "prepare", prepare), (torch.nn.utils, "clip_grad_norm_", clip),
               (datasets, "load_split", load_split), (parallel, "ddp", ddp)]
    originals = [getattr(owner, name) for owner, name, _ in patches]
    for owner, name, new in patches:
        setattr(owner, name, new)
    try:
        yield
    finally:
        for (owner, name, _), old in zip(patches, originals):
            setattr(owner, name, old)


def run(out: Path, configs: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for c in configs:
        c = dict(c)
        name, n_images = c.pop("name"), c.pop("n_images", None)
        cfg = train.TrainConfig(**{"task": "mini-shapes", "device": "cpu", "eval": False, "warmup_steps": 1,
                                   "lr": 1e-3, "log_every": 1, **c})
        with recording(out / f"{name}.pt", n_images):
            train.finetune(cfg, out / f"{name}.never-written.st", stop_after=1)


def resume(out: Path, config: dict) -> None:
    """An unbroken 3-step run (``unbroken.st``) and the same run stopped after step 2 with a checkpoint every step,
    then resumed (``resumed.st``): under FSDP2 the checkpoint holds whole tensors, each rank reloads its shards."""
    out.mkdir(parents=True, exist_ok=True)
    base = {"task": "mini-shapes", "device": "cpu", "eval": False, "warmup_steps": 1, "lr": 1e-3, "max_steps": 3,
            **config}
    train.finetune(train.TrainConfig(**base), out / "unbroken.st")
    ck = train.TrainConfig(**base, checkpoint_every=1, checkpoint_dir=str(out / "ck"))
    train.finetune(ck, out / "resumed.st", stop_after=2)
    train.finetune(ck, out / "resumed.st", resume=True)


if __name__ == "__main__":
    if sys.argv[1] == "--resume":
        resume(Path(sys.argv[2]), json.loads(sys.argv[3]))
    else:
        run(Path(sys.argv[1]), json.loads(sys.argv[2]))
