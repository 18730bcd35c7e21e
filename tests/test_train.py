"""Fine-tuning: schedule and augmentation against formulas, a short run that learns, variants' footprints,
resume bit-identical to an unbroken run, non-finite losses, and a 2-process gloo run."""
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import REPO, entry_point, run_tvtool
from tvtool import train
from tvtool.errors import TVToolError
from tvtool.taskvector import open_vector
from tvtool.train import TrainConfig, crop_boxes, finetune, lr_at, random_resized_crop

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


@pytest.mark.parametrize("height,width,scale", [(32, 32, (0.9, 1.0)), (32, 32, (0.08, 1.0)), (24, 48, (0.9, 1.0))])
def test_crop_boxes_follow_torchvision(height, width, scale):
    """Same distribution as torchvision's RandomResizedCrop.get_params (whole-pixel boxes, retries, central-crop
    fallback - the 24x48 case never fits and always falls back). Clipping oversized crops instead, as the first
    version did, gives widths 1.2 px smaller on average and twice as spread at the protocol's scale 0.9-1."""
    import torchvision.transforms as T

    n = 4000
    torch.manual_seed(0)
    img = torch.empty(1, height, width)
    theirs = torch.tensor([[j, i, w, h] for i, j, h, w in
                           (T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n))],
                          dtype=torch.float32)
    ours = crop_boxes(n, height, width, torch.Generator().manual_seed(1), "cpu", scale)
    assert torch.equal(ours, ours.round())  # whole pixels
    assert bool(((ours[:, 0] + ours[:, 2]) <= width).all() and ((ours[:, 1] + ours[:, 3]) <= height).all())
    for col in range(4):  # left, top, width, height: means and spreads within ~5 standard errors
        tol = 5 * float(theirs[:, col].std()) / n ** 0.5 + 1e-6
        assert abs(float(ours[:, col].mean() - theirs[:, col].mean())) <= tol, col
        assert abs(float(ours[:, col].std() - theirs[:, col].std())) <= tol, col


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


def test_resume_onto_another_schedule_refused(tmp_path, monkeypatch):
    """The config key holds epochs as given (None: the dataset's table); a changed table means another cosine
    schedule, so the checkpoint records the run's length and a resume of another length is refused."""
    from tvtool.datasets import get_dataset

    spec = get_dataset(TASK)
    monkeypatch.setattr(spec, "epochs", 1)
    cfg = small(max_steps=None, batch_size=1000, checkpoint_every=1, checkpoint_dir=str(tmp_path / "ck"))
    finetune(cfg, tmp_path / "v.st", stop_after=1)
    monkeypatch.setattr(spec, "epochs", 2)
    with pytest.raises(TVToolError, match=r"--resume: .* belongs to a run of (\d+) steps, this one has (\d+) "
                                          r"\(the dataset's epoch table"):
        finetune(cfg, tmp_path / "v.st", resume=True)
    assert not (tmp_path / "v.st").exists()


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


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_processes_gloo(tmp_path, strategy):
    """`torchrun ... tvtool finetune` with DDP (the default) and with --fsdp (FSDP2), OrthoReg on, equals one process.
    The step gradients agree to 1e-5 (tests/test_parallel.py); after 2 AdamW steps the vectors to 1e-3."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = ["--fsdp"] if strategy == "fsdp" else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           "29533" if strategy == "ddp" else "29534",
           "-m", "tvtool", "finetune", TASK, "--device", "cpu", "--max-steps", "2", "--batch-size", "16",
           "--warmup-steps", "1", "--lr", "1e-3", "--lambda", "0.5", "--no-eval", "-q", *flags,
           "-o", str(tmp_path / "ddp.st")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    v = open_vector(tmp_path / "ddp.st")
    assert v.meta["train"]["world_size"] == 2 and v.meta["train"]["fsdp"] == (strategy == "fsdp")
    # every rank draws the same crops for the global batch and takes its slice: the same run in one process
    # gives the same vector up to the float summation order of the gradient all-reduce (measured ~1e-4; with
    # rank-seeded crops, as before, the two differed by ~0.5)
    single = cmd[cmd.index("tvtool") + 1:]
    single[single.index("-o") + 1] = str(tmp_path / "one.st")
    r = subprocess.run([sys.executable, "-m", "tvtool", *single], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    one = open_vector(tmp_path / "one.st")
    assert one.keys() == v.keys()
    a = torch.cat([v.get(k).flatten().float() for k in v.keys()])
    b = torch.cat([one.get(k).flatten().float() for k in v.keys()])
    assert float((a - b).norm() / b.norm()) < 1e-3


# ---- issue 9 / 10: honest resume, checkpoints, option checks, fail-fast validation, progress ---------------------

def test_resume_refuses_an_existing_output_it_does_not_own(tmp_path):
    cfg = small(checkpoint_every=2, checkpoint_dir=str(tmp_path / "ck"))
    finetune(cfg, tmp_path / "mine.st", stop_after=2)
    other = tmp_path / "EXISTING.st"
    other.write_bytes(b"precious")
    with pytest.raises(TVToolError, match="not the output of the checkpoint"):
        finetune(cfg, other, resume=True)
    assert other.read_bytes() == b"precious"
    # --force is the explicit way to replace it anyway
    finetune(cfg, other, resume=True, force=True)
    assert open_vector(other).tasks == [TASK]


def test_resume_may_replace_its_own_output(tmp_path):
    cfg = small(checkpoint_every=2, checkpoint_dir=str(tmp_path / "ck"), keep_checkpoints=True)
    finetune(cfg, tmp_path / "v.st")  # finished, checkpoint kept at step 6
    before = (tmp_path / "v.st").stat().st_mtime_ns
    finetune(cfg, tmp_path / "v.st", resume=True)  # its own output: no --force needed
    assert (tmp_path / "v.st").stat().st_mtime_ns != before


def test_finished_run_removes_its_checkpoint_unless_kept(tmp_path):
    finetune(small(checkpoint_every=2), tmp_path / "a.st")
    assert (tmp_path / "a.st").is_file() and not (tmp_path / ".a.st.ckpt").exists()
    finetune(small(checkpoint_every=2, keep_checkpoints=True), tmp_path / "b.st")
    assert (tmp_path / ".b.st.ckpt" / "last.pt").is_file()
    # a user's own checkpoint folder stays (other files may live there); only our file goes
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    finetune(small(checkpoint_every=2, checkpoint_dir=str(tmp_path / "mine")), tmp_path / "c.st")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "foreign"])
def test_corrupt_or_foreign_checkpoint_is_one_line(tmp_path, content):
    ck = tmp_path / "ck"
    ck.mkdir()
    if content == "foreign":
        torch.save({"weights": torch.zeros(3)}, ck / "last.pt")
    else:
        (ck / "last.pt").write_bytes(content)
    with pytest.raises(TVToolError, match="--resume: .*last.pt is not a (readable )?tvtool"):
        finetune(small(checkpoint_dir=str(ck)), tmp_path / "v.st", resume=True)
    assert not (tmp_path / "v.st").exists()


@pytest.mark.parametrize("field,value,needle", [  # the Python API names its parameters (the CLI: tests/test_cli_card.py)
    ("lam", float("nan"), "^lam must be a finite number"),
    ("lam", float("inf"), "^lam must be a finite number"),
    ("lr", float("nan"), "^lr must be a finite number"),
    ("lr", 0.0, "^lr must be > 0"),
    ("weight_decay", -1.0, "^weight_decay must be >= 0"),
    ("lora_alpha", float("nan"), "^lora_alpha must be a finite number"),
    ("clip_grad", float("nan"), "^clip_grad must be a finite number"),
    ("max_steps", 2.5, "^max_steps must be a whole number"),
    ("data_root", 17, "^data_root must be a text value"),
])
def test_numeric_options_checked(field, value, needle):
    with pytest.raises(TVToolError, match=needle):
        small(**{field: value}).resolved()


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is built: validation must come first."""
    from tvtool import models

    def boom(*a, **k):
        raise AssertionError("a model was built before validation failed")

    monkeypatch.setattr(models, "load_clip", boom)


def test_validation_before_any_model(tmp_path, monkeypatch, no_model):
    monkeypatch.delenv("TVTOOL_DATA", raising=False)
    with pytest.raises(TVToolError, match="no data root"):
        finetune(TrainConfig(task="cars", pretrained=str(tmp_path)), tmp_path / "v.st")
    with pytest.raises(TVToolError, match="expected .*stanford_cars"):
        finetune(TrainConfig(task="cars", pretrained=str(tmp_path), data_root=str(tmp_path)), tmp_path / "v.st")
    with pytest.raises(TVToolError, match="no such file"):
        finetune(small(pretrained=str(tmp_path / "nope.safetensors")), tmp_path / "v.st")
    with pytest.raises(TVToolError, match="unknown pretrained tag"):
        finetune(small(model="ViT-B-32", pretrained="no-such-tag"), tmp_path / "v.st")
    with pytest.raises(TVToolError, match="unknown dataset"):
        finetune(small(task="mini-nope"), tmp_path / "v.st")
    assert not (tmp_path / "v.st").exists()


def test_empty_training_split_refused_before_training(tmp_path, no_model):
    from test_datasets import write_idx
    import numpy as np

    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8))
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(0, np.uint8))
    with pytest.raises(TVToolError, match="mnist: the train split .*has no examples"):
        finetune(small(task="mnist", model="tvtool-mini", data_root=str(tmp_path)), tmp_path / "v.st")
    assert not (tmp_path / "v.st").exists()


def test_settings_digest_recorded_and_sensitive():
    a = small(lam=10.0)
    assert a.settings_digest() == small(lam=10.0, device="cuda", log_every=7).settings_digest()
    assert a.settings_digest() != small(lam=0.5).settings_digest()
    assert a.settings_digest() != small(lam=10.0, max_steps=5).settings_digest()


def test_vector_records_its_settings(tmp_path):
    cfg = small(max_steps=2)
    finetune(cfg, tmp_path / "v.st")
    meta = open_vector(tmp_path / "v.st").meta
    assert meta["settings_digest"] == cfg.settings_digest()
    assert meta["train"]["max_steps"] == 2 and meta["train"]["lr"] == cfg.lr


def test_plain_progress_lines_first_last_and_interval():
    lines, now = [], [0.0]
    p = train.PlainProgress("t", write=lines.append, interval_s=30, clock=lambda: now[0])
    for step in range(1, 11):
        now[0] = 10.0 * step
        p({"step": step, "total": 10, "task_loss": 1.0, "penalty": 0.0, "lr": 1e-3, "images_per_s": 5.0})
    # first (t=10), then every >= 30 s (t=40, 70, 100 = the last step)
    assert [ln.split()[2] for ln in lines] == ["1/10", "4/10", "7/10", "10/10"]
    assert lines[1].endswith("ETA 00:01:00")  # 3 steps in 30 s, 6 left


def test_cli_finetune_writes_plain_progress_when_stderr_is_a_file(tmp_path):
    log = tmp_path / "stderr.txt"
    cmd = [entry_point(), "finetune", TASK, "--device", "cpu", "--max-steps", "3", "--batch-size", "16",
           "--warmup-steps", "1", "--no-eval", "-o", str(tmp_path / "v.st")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as err:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=240, env=env)
    text = log.read_text()
    assert r.returncode == 0, text
    steps = [ln for ln in text.splitlines() if " step " in ln]
    assert "step 1/3" in steps[0] and "step 3/3" in steps[-1] and "img/s" in steps[-1] and "ETA" in steps[-1]
    assert "\x1b[" not in text  # no terminal control sequences in a log file


def test_cli_finetune_nan_lambda_and_keep_checkpoints(tmp_path):
    r = run_tvtool("finetune", TASK, "--lambda", "nan", "-o", tmp_path / "x.st")
    assert r.returncode == 1 and "--lambda must be a finite number" in r.stderr and "Traceback" not in r.stderr
    r = run_tvtool("finetune", TASK, "--device", "cpu", "--max-steps", "2", "--batch-size", "16", "--no-eval", "-q",
                   "--checkpoint-every", "1", "--keep-checkpoints", "-o", tmp_path / "k.st", timeout=240)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / ".k.st.ckpt" / "last.pt").is_file()


def test_local_pretrained_recorded_absolute(tmp_path, monkeypatch):
    """A relative --pretrained path is stored absolute, so the vector can be evaluated from another directory."""
    from safetensors.torch import save_file

    from tvtool.models import load_clip

    weights = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in load_clip("tvtool-mini").model.state_dict().items()}, str(weights))
    monkeypatch.chdir(tmp_path)
    finetune(small(max_steps=1, pretrained="base.safetensors"), "v.st")
    base = open_vector(tmp_path / "v.st").meta["base"]
    assert base["pretrained"] == str(weights.resolve()) and base["model"] == "tvtool-mini"


def test_speed_options_leave_the_digest_and_precision_changes_it():
    from tvtool.train import _config_key

    a = small(lam=10.0)
    assert a.settings_digest() == small(lam=10.0, compile=True, compile_mode="reduce-overhead").settings_digest()
    assert a.settings_digest() == small(lam=10.0, compile=True, compile_backend="aot_eager").settings_digest()
    assert a.settings_digest() == small(lam=10.0, fsdp=True).settings_digest()  # same results, sharded
    assert a.settings_digest() != small(lam=10.0, orthoreg_precision="tf32").settings_digest()
    # the defaults add no key, so digests recorded before these options existed still match
    assert not {"compile", "compile_mode", "compile_backend", "fsdp", "orthoreg_precision"} & \
        set(_config_key(a.resolved()))


@pytest.mark.parametrize("bad, message", [
    (dict(compile_mode="fast"), "^compile_mode 'fast'"),
    (dict(orthoreg_precision="bf16"), "^orthoreg_precision 'bf16'"),
    (dict(compile="yes"), "compile must be true or false"),
    (dict(fsdp=1), "fsdp must be true or false"),
    (dict(fsdp=True, mode="linear"), "^fsdp does not support mode linear"),
    (dict(fsdp=True, compile=True), "^fsdp with compile is not supported yet"),
    (dict(compile=True, compile_backend=""), "compile_backend must be a torch.compile backend name"),
])
def test_speed_options_checked(bad, message):
    with pytest.raises(TVToolError, match=message):
        small(**bad).resolved()


def test_compile_wraps_the_whole_step_with_its_mode(tmp_path, monkeypatch):
    """--compile hands the whole training step (classifier, task loss and penalty) to torch.compile with
    --compile-mode; the run is otherwise the same."""
    import torch

    calls = []

    def fake_compile(module, mode=None, dynamic=None):
        calls.append((type(module).__name__, type(module.reg).__name__, mode, dynamic))
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    plain = finetune(small(max_steps=2, lam=0.5), tmp_path / "a.st")
    compiled = finetune(small(max_steps=2, lam=0.5, compile=True, compile_mode="max-autotune-no-cudagraphs"),
                        tmp_path / "b.st")
    # static shapes: the short last batch of an epoch gets its own graph, later steps keep the full-batch one
    assert calls == [("TrainStep", "OrthoReg", "max-autotune-no-cudagraphs", False)]
    assert compiled.task_loss == plain.task_loss


def test_orthoreg_precision_recorded_and_tf32_flag_restored(tmp_path):
    import torch

    before = torch.backends.cuda.matmul.allow_tf32
    finetune(small(max_steps=2, lam=1.0, orthoreg_precision="tf32"), tmp_path / "v.st")
    assert torch.backends.cuda.matmul.allow_tf32 == before
    assert open_vector(tmp_path / "v.st").meta["orthoreg"]["precision"] == "tf32"


def test_compile_failure_is_one_line_with_the_way_out(tmp_path, monkeypatch):
    """torch.compile fails lazily, at the first forward; that failure reads as one line naming --compile."""
    import torch
    from torch._dynamo.exc import TorchDynamoException

    def failing(*inputs):
        raise TorchDynamoException("CppCompileError: no C++ compiler found\nlong trace ...")

    monkeypatch.setattr(torch, "compile", lambda module, mode=None, dynamic=None: failing)
    with pytest.raises(TVToolError, match=r"--compile \(mode default\) failed for --mode full: "
                                          r"TorchDynamoException: CppCompileError: no C\+\+ compiler found; "
                                          r"run without --compile$"):
        finetune(small(max_steps=2, compile=True), tmp_path / "v.st")
    assert not (tmp_path / "v.st").exists()


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_modes_refuse_gradient_accumulation(mode):
    """CUDA-graph replays overwrite the gradients an earlier micro-batch left (pytorch#169545): refused up front."""
    with pytest.raises(TVToolError, match=f"compile_mode {mode} captures CUDA graphs, which cannot accumulate"):
        small(compile=True, compile_mode=mode, grad_accum=2).resolved()
    small(compile=True, compile_mode="max-autotune-no-cudagraphs", grad_accum=2).resolved()
    small(compile=True, compile_mode=mode, grad_accum=1).resolved()


def test_compile_failure_in_the_backward_is_one_line_too(tmp_path, monkeypatch):
    """The backward is compiled at the first loss.backward(); its failure reads like the forward's."""
    import torch
    from torch._dynamo.exc import TorchDynamoException

    class FailsBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise TorchDynamoException("InductorError: backward lowering failed")

    def compile_(module, mode=None, dynamic=None):
        return lambda *inputs: (FailsBackward.apply(module(*inputs)[0]), None)

    monkeypatch.setattr(torch, "compile", compile_)
    with pytest.raises(TVToolError, match=r"failed for --mode full: TorchDynamoException: InductorError: backward "
                                          r"lowering failed; run without --compile$"):
        finetune(small(max_steps=2, compile=True), tmp_path / "v.st")


def test_compile_mode_alone_turns_compile_on(tmp_path):
    """`--compile-mode M` without `--compile` compiles (a mode that silently did nothing would mislead)."""
    code = ("import sys, torch\n"
            "calls = []\n"
            "torch.compile = lambda m, mode=None, dynamic=None: calls.append(mode) or m\n"
            "from tvtool.cli import main\n"
            "try:\n"
            f"    main(['finetune', '{TASK}', '--compile-mode', 'max-autotune-no-cudagraphs', '--max-steps', '1',"
            f" '--no-eval', '--device', 'cpu', '-q', '-o', {str(tmp_path / 'v.st')!r}])\n"
            "except SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print(calls)")
    from cli_helpers import run_python

    r = run_python(code, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "['max-autotune-no-cudagraphs']"
