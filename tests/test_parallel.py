"""torchrun with DDP and with FSDP2 (gloo, 2 CPU processes) against one process: the same step gradient.

Every config runs one finetune step from the same start moved off theta_0 (tests/dist_grads.py), so the OrthoReg
gradient is not zero and the only difference between the runs is the order of float sums. The gradient after DDP's
averaging (or FSDP2's reduce-scatter) must equal one process's to 1e-5 relative - far below what a penalty counted
once per rank (x2), divided by the number of ranks (x1/2), a micro-batch synchronised early, or a rank's images
lost would cost (the sensitivity check puts the penalty's share of these gradients at percents).
Covered: full with gradient accumulation (no_sync), lora (parametrization), linear (jvp; DDP only), attn with the
Hutchinson estimator, the reference scope's plain form (wide tensors: positional_embedding), a 3-image run whose
second micro-batch is empty on every rank and whose first leaves one rank a single image, attn without a penalty,
and (DDP only) the compiled step (aot_eager) with the penalty inside it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import dist_grads  # noqa: E402

TOL = 1e-5
CONFIGS = [
    {"name": "full_accum", "mode": "full", "lam": 1.0, "batch_size": 16, "grad_accum": 2},
    {"name": "full_one", "mode": "full", "lam": 1.0, "batch_size": 8},
    {"name": "lora", "mode": "lora", "lam": 1.0, "batch_size": 8},
    {"name": "linear", "mode": "linear", "lam": 1.0, "batch_size": 8},
    {"name": "attn_hutchinson", "mode": "attn", "lam": 1.0, "batch_size": 8, "orthoreg_estimator": "hutchinson",
     "orthoreg_probes": 2},
    {"name": "reference_plain", "mode": "full", "lam": 1.0, "batch_size": 8, "orthoreg_form": "plain",
     "orthoreg_scope": "reference"},
    {"name": "short", "mode": "full", "lam": 1.0, "batch_size": 16, "grad_accum": 2, "n_images": 3},
    {"name": "attn_no_penalty", "mode": "attn", "lam": 0.0, "batch_size": 8},
    {"name": "full_compiled", "mode": "full", "lam": 1.0, "batch_size": 16, "grad_accum": 2, "compile": True,
     "compile_backend": "aot_eager"},
]
# FSDP2 refuses the linear mode and --compile (for now)
FSDP_CONFIGS = [dict(c, fsdp=True) for c in CONFIGS if c["mode"] != "linear" and not c.get("compile")]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, every config (fsdp is a no-op for one process), plus full_accum without the penalty."""
    out = tmp_path_factory.mktemp("single")
    dist_grads.run(out, CONFIGS + [dict(CONFIGS[0], name="full_accum_no_penalty", lam=0.0)])
    return out


def torchrun(out: Path, configs, port: int, *flags: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(HERE / "dist_grads.py"), *flags, str(out), json.dumps(configs)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def load(folder: Path, name: str) -> dict:
    return torch.load(folder / f"{name}.pt")


def rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x, y = torch.cat([t.flatten().double() for t in a]), torch.cat([t.flatten().double() for t in b])
    return float((x - y).norm() / y.norm())


def test_penalty_is_a_visible_share_of_the_gradient(single):
    """The comparisons below can see a mis-scaled penalty: it moves these gradients by far more than TOL (by a
    factor of about 5 here, so a task part mis-scaled by 1e-3 would show too)."""
    with_pen, without = load(single, "full_accum")["grads"], load(single, "full_accum_no_penalty")["grads"]
    assert rel_diff(with_pen, without) > 1e-2


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_give_one_process_gradient(single, tmp_path, strategy):
    configs = CONFIGS if strategy == "ddp" else FSDP_CONFIGS
    torchrun(tmp_path, configs, 29541 if strategy == "ddp" else 29542)
    for c in configs:
        one, two = load(single, c["name"])["grads"], load(tmp_path, c["name"])["grads"]
        assert [t.shape for t in one] == [t.shape for t in two], c["name"]
        assert rel_diff(two, one) <= TOL, (c["name"], rel_diff(two, one))
    if strategy == "ddp":
        # accumulation: the first micro-batch's backward runs under no_sync, so a 2-micro-batch step all-reduces
        # each bucket once, as a 1-micro-batch step does (twice without no_sync)
        once = load(tmp_path, "full_one")["ddp_bucket_reductions"]
        assert once >= 1 and load(tmp_path, "full_accum")["ddp_bucket_reductions"] == once


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fsdp_resume_is_bit_identical(tmp_path, mode):
    """Under FSDP2 a checkpoint holds whole tensors (gathered from the shards, AdamW's state too) and a resumed run
    reloads each rank's shards: it ends exactly where the unbroken run does."""
    from safetensors.torch import load_file

    torchrun(tmp_path, {"mode": mode, "lam": 1.0, "batch_size": 8, "fsdp": True}, 29543 + (mode == "lora"),
             "--resume")
    a, b = load_file(tmp_path / "unbroken.st"), load_file(tmp_path / "resumed.st")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
