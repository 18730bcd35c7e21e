"""Fine-tuning: schedule and augmentation against formulas, a short run that learns, variants' footprints,
resume bit-identical to an unbroken run, non-finite losses, and a 2-process gloo run."""
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tvtool import train
from tvtool.errors import TVToolError
from tvtool.taskvector import open_vector
from tvtool.train import TrainConfig, finetune, lr_at, random_resized_crop

TASK = "mini-shapes"


def small(**kw):
    base = dict(task=TASK, lr=2e-3, warmup_steps=2, batch_size=32, max_steps=6, eval=False, log_every=1,
                device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_matches_formula():
    cfg = TrainConfig(task=TASK, lr=1e-3, warmup_steps=10)
    assert lr_at(0, cfg, 100) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 100) == pytest.approx(1e-3)
    for s in (10, 37, 99):
        assert lr_at(s, cfg, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - 10) / 90)) * 1e-3)


def test_random_resized_crop_identity_and_range():
    x = torch.rand(4, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    same = random_resized_crop(x, 16, g, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    out = random_resized_crop(x, 8, g)
    assert out.shape == (4, 3, 8, 8)
    a = random_resized_crop(x, 16, torch.Generator().manual_seed(1))
    b = random_resized_crop(x, 16, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_short_run_lowers_task_loss_and_writes_vector(tmp_path):
    records = []
    res = finetune(small(max_steps=25, eval=True, lr=1e-3), tmp_path / "v.st", progress=records.append)
    first = sum(r["task_loss"] for r in records[:3]) / 3
    last = sum(r["task_loss"] for r in records[-3:]) / 3
    assert last < first * 0.9
    v = open_vector(tmp_path / "v.st")
    assert v.tasks == [TASK] and v.meta["mode"] == "full" and v.meta["orthoreg"] is None
    m = v.meta["metrics"]
    assert set(m) >= {"val_acc", "test_acc", "zeroshot_val_acc", "zeroshot_test_acc"}
    # the recorded accuracies are what an independent evaluation of theta_0 + tau measures
    from tvtool.evaluate import Evaluator, load_deltas
    from tvtool.models import load_clip

    ev = Evaluator(load_clip("tvtool-mini"), [TASK], device="cpu")
    assert ev.accuracy(TASK, "val") == pytest.approx(m["zeroshot_val_acc"])
    ev.set_weights(load_deltas([v], "cpu"), 1.0)
    assert ev.accuracy(TASK, "val") == pytest.approx(m["val_acc"])
    assert ev.accuracy(TASK, "test") == pytest.approx(m["test_acc"])
    assert all(k.startswith("visual.") for k in v.keys())
    assert res.steps == 25


@pytest.mark.parametrize("mode,allowed", [
    ("attn", ("attn.in_proj_weight", "attn.out_proj.weight")),
    ("lora", ("attn.in_proj_weight", "attn.out_proj.weight")),
])
def test_variant_vectors_touch_only_their_tensors(tmp_path, mode, allowed):
    finetune(small(mode=mode, max_steps=3, lam=0.1), tmp_path / "v.st")
    v = open_vector(tmp_path / "v.st")
    assert v.keys() and all(k.endswith(allowed) for k in v.keys())
    assert v.meta["orthoreg"]["lambda"] == 0.1
    if mode == "lora":  # the dense update of a rank-r LoRA has rank <= r
        w = v.get(v.keys()[0]).float()
        assert torch.linalg.matrix_rank(w) <= 8


def test_linear_mode_runs(tmp_path):
    finetune(small(mode="linear", max_steps=2), tmp_path / "v.st")
    assert open_vector(tmp_path / "v.st").meta["mode"] == "linear"


def test_resume_is_bit_identical(tmp_path):
    cfg = small(checkpoint_every=3, lam=0.05)
    finetune(cfg, tmp_path / "unbroken.st")
    ckdir = tmp_path / "ck"
    cfg2 = small(checkpoint_every=3, lam=0.05, checkpoint_dir=str(ckdir))
    finetune(cfg2, tmp_path / "resumed.st", stop_after=4)  # "killed" after step 4; last checkpoint at step 3
    assert not (tmp_path / "resumed.st").exists() and (ckdir / "last.pt").exists()
    finetune(cfg2, tmp_path / "resumed.st", resume=True)
    a, b = load_file(tmp_path / "unbroken.st"), load_file(tmp_path / "resumed.st")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_with_other_settings_refused(tmp_path):
    cfg = small(checkpoint_every=2, checkpoint_dir=str(tmp_path / "ck"))
    finetune(cfg, tmp_path / "v.st", stop_after=2)
    with pytest.raises(TVToolError, match="different settings"):
        finetune(small(checkpoint_every=2, checkpoint_dir=str(tmp_path / "ck"), lr=0.5), tmp_path / "v.st",
                 resume=True)


def test_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    real = train.F.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, y):
        calls["n"] += 1
        loss = real(logits, y)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(train.F, "cross_entropy", poisoned)
    cfg = small(checkpoint_every=2, checkpoint_dir=str(tmp_path / "ck"), log_every=2)
    with pytest.raises(TVToolError, match="non-finite loss"):
        finetune(cfg, tmp_path / "v.st")
    assert not (tmp_path / "v.st").exists()
    state = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["trainable"].values())


def test_cli_finetune_bad_input(tmp_path, capsys):
    from tvtool.cli import main

    assert main(["finetune", "no-such-task", "-o", str(tmp_path / "x.st")]) == 1
    assert "no-such-task" in capsys.readouterr().err
    assert main(["finetune", TASK, "--mode", "bogus", "-o", str(tmp_path / "x.st")]) == 1
    assert not (tmp_path / "x.st").exists()


def test_torchrun_two_processes_gloo(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "tvtool", "finetune", TASK, "--device", "cpu", "--max-steps", "2", "--batch-size", "16",
           "--warmup-steps", "1", "--lr", "1e-3", "--no-eval", "-q", "-o", str(tmp_path / "ddp.st")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    v = open_vector(tmp_path / "ddp.st")
    assert v.meta["train"]["world_size"] == 2
