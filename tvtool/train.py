"""Fine-tuning with OrthoReg: one task in, one task vector out. Readable top to bottom.

The protocol (docs/PROTOCOL.md): AdamW lr 1e-5, weight decay 0.1, cosine schedule with 500 warm-up optimizer
steps, batch 128, gradient clipping 1.0 on the total gradient, frozen zero-shot head, the dataset's epoch count,
training on the Val-held-out split. OrthoReg adds lambda * sum_l ||dW_l^T dW_l - I||_F^2, computed every forward
(every micro-batch) in fp32.

Speed: the uint8 training images live on the device once when they fit (else a background thread streams each
batch from the cache file ahead of the step: ``tvtool/feed.py``, ``--data-on-device``); each step gathers a batch by
index, crops, resizes and normalizes it there (no JPEG decoding), runs under bf16 autocast on CUDA, and never
synchronizes with the host except at logging and checkpoint steps.

Survival: seeds are set; the data order of epoch e is a permutation seeded by (seed, e) and each step's
augmentation by (seed, step), so a run resumed from a checkpoint (trainable tensors + optimizer state + step) ends
exactly where an unbroken one would. The learning rate is a pure function of the step. Checkpoints are written
atomically and only after the loss was checked finite.

One step, one module: :class:`TrainStep` computes a micro-batch's task loss and the OrthoReg penalty, so
``--compile`` compiles both into one graph and one backward (the penalty's hand-derived gradient is a custom op the
compiler captures; ``reduce-overhead``'s CUDA graphs record it with the model), and DDP / FSDP2 wrap both.

Multi-GPU / multi-process: under `torchrun`, each rank takes a disjoint slice of every step's global batch; PyTorch's
DistributedDataParallel averages the gradients, its buckets all-reduced while the backward runs (micro-batches
before the last of an accumulation step under ``no_sync``), or ``--fsdp`` shards the tower with FSDP2
(tvtool/parallel.py, which also derives why the penalty's gradient is neither double-counted nor divided). The
per-epoch permutation plays the role of DistributedSampler.set_epoch.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__, datasets, heads, models, parallel, variants
from .defaults import default_device
from .errors import TVToolError, spell, warn
from .evaluate import Evaluator
from .feed import Placement, TrainFeed
from .feed import epoch_permutation  # noqa: F401  (the data order; tests and tools read it here too)
from .fileio import atomic_path, check_append, open_append
from .orthoreg import OrthoReg
from .taskvector import check_output, history_entry, new_meta, write_vector

# TrainConfig and the choices of its options live in a torch-free module (the CLI checks options before importing
# this one); re-exported here, where they always were.
from .trainconfig import (  # noqa: F401,E402
    COMPILE_MODES, CUDA_GRAPH_MODES, MAX_SEED, MODES, UPPER_BOUNDS, TrainConfig, check_weights_spec,
    config_key as _config_key, option_name,
)


# ------------------------------------------------------------------------------------------------ small pieces
def step_seed(seed: int, step: int) -> int:
    """The seed of one optimizer step's augmentation (and Hutchinson probes)."""
    return (seed * 7_919 + step * 131) % 2**64


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up then cosine decay to 0, as in the reference code's cosine_lr (per optimizer step)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    e, es = step - cfg.warmup_steps, max(1, total_steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * cfg.lr


def crop_boxes(n: int, height: int, width: int, generator: torch.Generator, device=None,
               scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for ``n`` images at once: [n, 4] boxes (left, top, w, h) in pixels.

    Per image, up to ``attempts`` draws of area ~ U(scale) x H*W and log-aspect ~ U(log ratio), rounded to whole
    pixels; the first that fits is kept (offsets uniform over the valid positions), else the central crop of the
    clamped aspect. Drawn for every attempt in one go, so it costs a few small kernels and no host sync. Clipping
    an oversized crop instead (the obvious batched shortcut) is not the same distribution: at scale 0.9-1 most
    draws do not fit, and clipping shrinks and distorts them.
    """
    dev = torch.device(device) if device is not None else generator.device
    area = torch.empty(n, attempts, device=dev).uniform_(*scale, generator=generator) * (height * width)
    log_r = torch.empty(n, attempts, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                          generator=generator)
    r = torch.exp(log_r)
    w = torch.round(torch.sqrt(area * r))
    h = torch.round(torch.sqrt(area / r))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # index of the first fitting attempt (0 if none)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    found = fits.any(1)
    # fallback: torchvision's central crop with the aspect clamped into ``ratio``
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = float(width), float(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = float(round(height * ratio[1])), float(height)
    else:
        fw, fh = float(width), float(height)
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    u = torch.rand(n, 2, device=dev, generator=generator)
    left = torch.where(found, torch.floor(u[:, 0] * (width - w + 1)), torch.full_like(w, (width - fw) // 2))
    top = torch.where(found, torch.floor(u[:, 1] * (height - h + 1)), torch.full_like(h, (height - fh) // 2))
    return torch.stack([left, top, w, h], 1)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image of float [B, C, H, W] to its box (left, top, w, h) and resize to size x size (bicubic): one
    affine grid and one grid_sample for the whole batch."""
    b, c, h, w = images.shape
    boxes = boxes.to(images.device, torch.float32)
    left, top, cw, ch = boxes.unbind(1)
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0] = cw / w
    theta[:, 1, 1] = ch / h
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)


def random_resized_crop(images: torch.Tensor, size: int, generator: torch.Generator,
                        scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Batched RandomResizedCrop on the device (torchvision's distribution, see :func:`crop_boxes`)."""
    b, _, h, w = images.shape
    return resized_crop(images, crop_boxes(b, h, w, generator, images.device, scale, ratio), size)


@contextlib.contextmanager
def _compile_errors(cfg: TrainConfig):
    """torch.compile compiles lazily: the forward at the first call, the backward at the first loss.backward(). Its
    failures there (no C++ compiler, an op a mode cannot handle) read as one line with the way out."""
    if not cfg.compile:
        yield
        return
    try:
        yield
    except Exception as exc:
        if not type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise TVToolError(f"--compile (mode {cfg.compile_mode}) failed for --mode {cfg.mode}: "
                          f"{type(exc).__name__}: {first}; run without --compile") from None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # the legacy global seeding takes 32 bits; smaller seeds are unchanged
    torch.manual_seed(seed)


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def maybe_init_distributed(device: str) -> tuple[int, int]:
    """Join the process group when launched by torchrun (RANK / WORLD_SIZE set)."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return _dist_info()


class TrainStep(torch.nn.Module):
    """One micro-batch's differentiable work: the classifier's task loss (mean cross-entropy; bf16 autocast around
    the classifier when asked) and the unscaled OrthoReg penalty (fp32, or None without one).

    One module so that torch.compile turns both into one graph and one backward, CUDA graphs capture both, and DDP
    or FSDP2 see one forward per backward. ``probes``: the Hutchinson estimator's draws, made outside (a compiled
    graph cannot draw from a ``torch.Generator``)."""

    def __init__(self, classifier: torch.nn.Module, reg: torch.nn.Module | None, bf16: bool):
        super().__init__()
        self.classifier = classifier
        self.reg = reg
        self.bf16 = bf16

    def forward(self, x: torch.Tensor, y: torch.Tensor, probes: list[torch.Tensor] | None = None):
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.classifier(x)
        task_loss = F.cross_entropy(logits.float(), y)
        penalty = self.reg.penalty(probes=probes) if self.reg is not None else None
        return task_loss, penalty


# ------------------------------------------------------------------------------------------------ checkpoints
def _checkpoint_path(cfg: TrainConfig, out: Path) -> Path:
    folder = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out.parent / f".{out.name}.ckpt"
    return folder / "last.pt"


_CHECKPOINT_KEYS = {"step": int, "trainable": dict, "optimizer": dict, "config": str, "metrics": str}


def save_checkpoint(path: Path, step: int, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    cfg: TrainConfig, metrics: dict, output: Path | None = None,
                    total_steps: int | None = None, base: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "trainable": {k: v.detach().cpu() for k, v in trainable.items()},
             "optimizer": optimizer_state, "config": json.dumps(_config_key(cfg)),
             "metrics": json.dumps(metrics), "tvtool": __version__,
             # the schedule's length: the config key holds `epochs` as given (None = the dataset's table), so a
             # changed epoch table or train split would otherwise resume onto another cosine schedule
             "total_steps": total_steps,
             # the base's fingerprint: the config names the weights (`builtin`, a file), not their content
             "base": base,
             # the output this run writes: a resume may replace that file, and no other, without --force
             "output": str(Path(output).resolve()) if output is not None else ""}
    with atomic_path(path, force=True) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, cfg: TrainConfig) -> dict:
    if not path.exists():
        raise TVToolError(f"--resume: no checkpoint at {path}; start without --resume")
    if not path.is_file():
        raise TVToolError(f"--resume: {path} is not a regular file; remove it or start without --resume")
    how = f"delete {path.parent} (or pass another --checkpoint-dir) and start without --resume"
    try:
        # weights_only: our own checkpoints hold only tensors and plain containers, so no code can run on load
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, random bytes: all mean "not a usable checkpoint"
        raise TVToolError(f"--resume: {path} is not a readable tvtool checkpoint ({type(exc).__name__}); "
                          f"{how}") from None
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t) for k, t in _CHECKPOINT_KEYS.items()):
        raise TVToolError(f"--resume: {path} is not a tvtool training checkpoint; {how}")
    try:
        config = json.loads(state["config"])
        json.loads(state["metrics"])
    except ValueError:
        raise TVToolError(f"--resume: {path} has an unreadable settings record; {how}") from None
    if config != _config_key(cfg):
        raise TVToolError(f"--resume: {path} was written by a run with different settings; use the same options "
                          "or start afresh")
    if state["step"] < 0 or not all(isinstance(v, torch.Tensor) for v in state["trainable"].values()):
        raise TVToolError(f"--resume: {path} is not a tvtool training checkpoint; {how}")
    return state


def _checkpoint_output(path: Path) -> str | None:
    """The output a tvtool checkpoint was written for, or None (not readable as one)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # foreign bytes, a truncated file: not one of ours
        return None
    return state.get("output") if isinstance(state, dict) and isinstance(state.get("output"), str) else None


def check_checkpoint_slot(cfg: TrainConfig, ckpt: Path, out: Path) -> None:
    """Before any model: a fresh run that will write checkpoints into a user's --checkpoint-dir may replace a
    last.pt there only if it is a tvtool checkpoint of this same output (an earlier, unfinished try of it)."""
    if not cfg.checkpoint_dir or cfg.checkpoint_every <= 0 or not os.path.lexists(ckpt):
        return
    if _checkpoint_output(ckpt) != str(Path(out).resolve()):
        raise TVToolError(f"{ckpt}: already exists and is not a checkpoint of {out}; pass --resume to continue it, "
                          "another --checkpoint-dir, or remove it yourself")


def _remove_checkpoint(cfg: TrainConfig, ckpt: Path) -> None:
    """A finished run no longer needs its checkpoint: drop the file and the folder if nothing else is in it."""
    with contextlib.suppress(FileNotFoundError):
        ckpt.unlink()
    if not cfg.checkpoint_dir:  # only the default .OUTPUT.ckpt folder is ours to remove; a user's folder stays
        with contextlib.suppress(OSError):
            ckpt.parent.rmdir()


class PlainProgress:
    """Progress as plain lines, for a stderr that is not a terminal (batch jobs, ``2> log``): the first and the last
    record always, others at most every ``interval_s`` seconds. Each line: step, loss, penalty, images/s, ETA."""

    def __init__(self, label: str, write: Callable[[str], None] | None = None, interval_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.label = label
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.interval_s = interval_s
        self.clock = clock
        self.t0: float | None = None
        self.step0 = 0
        self.last: float | None = None

    def __call__(self, r: dict) -> None:
        now = self.clock()
        if self.t0 is None:
            self.t0, self.step0 = now, r["step"]  # the rate is measured from the first record on
        last_step = r["step"] >= r["total"]
        if self.last is not None and not last_step and now - self.last < self.interval_s:
            return
        self.last = now
        done = r["step"] - self.step0
        left = r["total"] - r["step"]
        eta = (now - self.t0) / done * left if done > 0 and now > self.t0 else None
        eta_s = "?" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta))
        self.write(f"{self.label}: step {r['step']}/{r['total']} loss {r['task_loss']:.4f} "
                   f"penalty {r['penalty']:.4g} lr {r['lr']:.2e} {r['images_per_s']:.0f} img/s ETA {eta_s}")


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class TrainResult:
    output: Path
    steps: int
    task_loss: float
    penalty: float
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    images_per_second: float = 0.0


def finetune(cfg: TrainConfig, out: str | os.PathLike, *, force: bool = False, resume: bool = False,
             progress: Callable[[dict], None] | None = None, log_path: str | os.PathLike | None = None,
             stop_after: int | None = None) -> TrainResult:
    """Fine-tune ``cfg.task`` and write its task vector to ``out``.

    ``progress`` receives a dict per logging step (step, total, task_loss, penalty, lr, images_per_s).
    ``stop_after`` ends the run after that many optimizer steps without writing the vector (tests use it to
    simulate a killed run).
    """
    # --- set-up, in this order (the random draws of model building and LoRA's init follow the seeding)
    cfg = cfg.validate()  # options, dataset, data root, weights spec: before any model is built
    run = _plan_outputs(cfg, Path(out), force, resume, log_path)
    device, rank, world = _join(cfg)
    _seed_everything(cfg.seed)
    task = _load_task(cfg, device, rank)
    eval_bundle, metrics = _zeroshot_metrics(cfg, task.bundle, device, rank, resume)
    model = _build_model(cfg, task, device, world)
    epochs, steps_per_epoch, total_steps = _schedule(cfg, len(task.train_data), warn_short=rank == 0 and not resume)
    optimizer = _optimizer(cfg, model.params, device)
    step = 0
    if run.state is not None:
        step, metrics = _resume_from(run, cfg, model, optimizer, total_steps, task.bundle)
    log_file = open_append(log_path, "a log file (--log)") if log_path and rank == 0 else None
    feed = _train_feed(cfg, task, device, rank, world, steps_per_epoch, step, total_steps)
    size, mean, std, reg = task.bundle.image_size, task.mean, task.std, model.reg

    # --- the loop
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    loss_acc = torch.zeros((), device=device)
    pen_acc = torch.zeros((), device=device)
    meter = _Meter(step)
    record = {"task_loss": float("nan"), "penalty": 0.0}
    model.step_module.train()
    while step < total_steps:
        # the learning rate: a pure function of the step
        lr = lr_at(step, cfg, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the step's batch and crops. Seeded by the step alone, not the rank: every rank draws the same crops for
        # the whole global batch and takes its own slice, so a torchrun run sees exactly the images a one-process
        # run sees. Per micro-batch the feed gives the span [a, b) of the batch this rank trains on (balanced
        # across ranks; a short last batch can leave a rank none: then one stand-in image weighted 0, so every
        # rank runs the same forward and backward and the penalty is still added once per micro-batch).
        gen = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step))
        n_batch, micro_batches = feed.step(step)
        boxes = crop_boxes(n_batch, size, size, gen, device)
        # forward and backward, micro-batch by micro-batch: task loss + lambda * penalty
        for m, ((a, b), n_real, images, y) in enumerate(micro_batches):
            x = (resized_crop(images.float().div_(255), boxes[a:b], size) - mean) / std
            probes = reg.draw_probes(gen) if reg is not None else None
            if model.graphs:
                torch.compiler.cudagraph_mark_step_begin()
            # the gradients of a micro-batch before the last stay local; the last one's backward averages the sum
            with (model.no_sync() if m < cfg.grad_accum - 1 else contextlib.nullcontext()), _compile_errors(cfg):
                task_loss, pen = model.run_step(x, y, probes)
                # a step's loss is the mean over the global batch: micro-batches and ranks carry their share (see
                # tvtool/parallel.py for why the penalty is added whole on every rank)
                weight = n_real * world / n_batch
                loss = task_loss * weight
                loss_acc += task_loss.detach() * weight
                if pen is not None:
                    loss = loss + cfg.lam * pen / cfg.grad_accum
                    pen_acc += pen.detach() / cfg.grad_accum
                loss.backward()
            meter.seen += n_real * world
        # clip the total gradient, step
        grad_norm = torch.nn.utils.clip_grad_norm_(list(model.params.values()), cfg.clip_grad if cfg.clip_grad > 0
                                                   else float("inf"))
        if parallel.is_sharded(grad_norm):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # non-finite loss, penalty or gradient: caught at the next logging step, before any checkpoint
        nonfinite |= ~(torch.isfinite(loss_acc) & torch.isfinite(pen_acc) & torch.isfinite(grad_norm))
        step += 1
        # log, then checkpoint (step 1 is logged too, so a batch job's log shows the run has started within a step)
        at_ckpt = cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0
        if step % cfg.log_every == 0 or step in (1, total_steps) or at_ckpt or step == stop_after:
            nonfinite = _stop_if_nonfinite(nonfinite, world, step, run.ckpt)  # the only host sync
            record = meter.record(step, total_steps, lr, loss_acc, pen_acc, reg is not None)
            loss_acc.zero_()
            pen_acc.zero_()
            if progress and rank == 0:
                progress(record)
            if log_file:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if at_ckpt:
                _save(run, cfg, model, optimizer, step, metrics, total_steps, task.bundle, rank)
            run.owns_checkpoint = run.owns_checkpoint or at_ckpt  # written by this run: removed when it finishes
        if stop_after is not None and step >= stop_after:
            _close(feed, log_file)
            if world > 1:  # every rank leaves after rank 0 has written its checkpoint
                torch.distributed.barrier()
            return TrainResult(run.out, step, record["task_loss"], record["penalty"])
    elapsed = time.perf_counter() - meter.t_start
    _close(feed, log_file)

    # --- the task vector and its metadata
    if model.sharded:
        deltas = parallel.gather_task_vector(model.tuned)
    else:
        deltas = {k: v.detach().float().cpu() for k, v in model.tuned.deltas().items()}
    if rank == 0:
        if eval_bundle is not None:
            if "zeroshot_val_acc" not in metrics:  # resumed from a checkpoint taken before they were known
                metrics.update(_accuracies(eval_bundle, cfg, device, {}, "zeroshot_"))
            metrics.update(_accuracies(eval_bundle, cfg, device, deltas, ""))
        _warn_if_unmoved(cfg, deltas, task.base_sq, metrics)
        info = {"steps": step, "epochs": epochs, "world_size": world, "seconds": elapsed, "device": device,
                "final": {"task_loss": record["task_loss"], "penalty": record["penalty"]}}
        _write_task_vector(run, cfg, task.bundle, deltas, metrics, info, force)
    if world > 1:
        torch.distributed.barrier()
    return TrainResult(run.out, step, record["task_loss"], record["penalty"], metrics, elapsed,
                       meter.seen / max(elapsed, 1e-9))


# ------------------------------------------------------------------------------------------------ set-up
@dataclass
class _Outputs:
    """Where a run writes: its output, its checkpoint file, the checkpoint it resumes from (or None), whether the
    output is that checkpoint's own (a resume may replace it without --force), and whether the checkpoint file is
    this run's to remove when it finishes."""
    out: Path
    ckpt: Path
    state: dict | None
    own_output: bool
    owns_checkpoint: bool


def _plan_outputs(cfg: TrainConfig, out: Path, force: bool, resume: bool, log_path) -> _Outputs:
    """Output, log and checkpoint checked (and the checkpoint read, on resume) before any model is built."""
    ckpt = _checkpoint_path(cfg, out)
    if log_path:
        check_append(log_path, "a log file (--log)")
    state = None
    own_output = False
    if resume:
        state = load_checkpoint(ckpt, cfg)
        own_output = bool(state.get("output")) and state.get("output") == str(out.resolve())
        if out.exists() and not force and not own_output:
            raise TVToolError(f"{out}: already exists and is not the output of the checkpoint in {ckpt.parent}; "
                              f"pass {spell('--force', 'force=True')} to overwrite it, or another output")
        check_output(out, True)
    else:
        check_output(out, force)
        check_checkpoint_slot(cfg, ckpt, out)
    # the checkpoint file this run may remove when it finishes: one it resumed from or writes, or any in the
    # default .OUTPUT.ckpt folder (named after this output); never a file in a user's folder it did not touch
    return _Outputs(out, ckpt, state, own_output, owns_checkpoint=resume or not cfg.checkpoint_dir)


def _join(cfg: TrainConfig) -> tuple[str, int, int]:
    """(device, rank, world size): this process's device, and its place in the process group under torchrun."""
    device = cfg.device or default_device()
    if device.startswith("cuda") and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', os.environ.get('RANK', 0)))}"
        # before the process group: NCCL's communicators and FSDP2's device mesh use the current device
        torch.cuda.set_device(torch.device(device))
    rank, world = maybe_init_distributed(device)
    return device, rank, world


@dataclass
class _Task:
    """The base model, the task's frozen head, its training images and their normalization constants."""
    bundle: object
    head: torch.Tensor
    train_data: object
    mean: torch.Tensor
    std: torch.Tensor
    base_sq: dict  # ||theta_0||^2 of each image-tower tensor, to tell at the end whether the vector moved at all


def _load_task(cfg: TrainConfig, device: str, rank: int) -> _Task:
    spec = datasets.get_dataset(cfg.task)  # the task is checked first: a typo should not wait for a model download
    bundle = models.load_clip(cfg.model, cfg.pretrained, device=device)
    base_sq = {k: float(v.float().pow(2).sum()) for k, v in bundle.model.state_dict().items()
               if k.startswith("visual.")} if rank == 0 else {}
    head = heads.zero_shot_head(bundle, spec)
    train_data = datasets.open_split(cfg.task, "train", cfg.data_root, bundle.image_size)
    if len(train_data) == 0:  # 0 steps would write an all-zero vector that looks like a result
        raise TVToolError(f"{cfg.task}: the training split is empty; check the data with `tvtool data check`")
    mean = torch.tensor(bundle.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(bundle.std, device=device).view(1, 3, 1, 1)
    return _Task(bundle, head, train_data, mean, std, base_sq)


def _zeroshot_metrics(cfg: TrainConfig, bundle, device: str, rank: int, resume: bool) -> tuple[object, dict]:
    """(the evaluation copy of the base model or None, the zero-shot accuracies of a fresh run).

    A separate copy of the base model, parked on the CPU during training (no device memory taken from the run):
    accuracies of theta_0 (zero-shot) and theta_0 + tau (fine-tuned) are measured exactly as `tvtool eval` measures
    them (the tangent model for linear mode)."""
    if not (cfg.eval and rank == 0):
        return None, {}
    eval_bundle = copy.copy(bundle)
    eval_bundle.model = copy.deepcopy(bundle.model).to("cpu")
    metrics = {} if resume else _accuracies(eval_bundle, cfg, device, {}, "zeroshot_")
    return eval_bundle, metrics


@dataclass
class _Model:
    """What is tuned and how one micro-batch runs: the variant, its trainable tensors, the regularizer, the step
    module (wrapped by DDP when data-parallel; ``run_step`` is it compiled when asked), the gradient-sync context
    of accumulation micro-batches, whether the tower is sharded (FSDP2), whether CUDA graphs are recorded."""
    tuned: variants.Tuned
    params: dict
    reg: OrthoReg | None
    step_module: torch.nn.Module
    run_step: Callable
    no_sync: Callable
    sharded: bool
    graphs: bool


def _build_model(cfg: TrainConfig, task: _Task, device: str, world: int) -> _Model:
    tuned = variants.prepare(task.bundle.model, cfg.mode, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)
    classifier = heads.ImageClassifier(tuned.module, task.head).to(device)
    no_sync = contextlib.nullcontext  # gradients stay local (accumulation micro-batches); DDP / FSDP2 set it
    sharded = cfg.fsdp and world > 1
    if sharded:  # before OrthoReg and the optimizer: both must hold the sharded parameters
        no_sync = parallel.shard_tower(tuned, device)
    params = dict(tuned.named_trainable())
    reg = None
    if cfg.lam > 0:
        reg = OrthoReg.from_tuned(tuned, scope=cfg.orthoreg_scope, form=cfg.orthoreg_form,
                                  estimator=cfg.orthoreg_estimator, probes=cfg.orthoreg_probes,
                                  precision=cfg.orthoreg_precision)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.startswith("cuda"))
    step_module = TrainStep(classifier, reg, use_bf16)
    if world > 1 and not sharded:
        step_module, no_sync = parallel.ddp(step_module, device)
    # torch.compile: fewer, fused kernels; on a GPU a ViT-B-32 step is bound by Python launching ~1,100 kernels
    # (benchmarks/gpu_profile.py). The penalty is inside the compiled step. reduce-overhead adds CUDA graphs (each
    # step then marks its start). dynamic=False: the short last batch of an epoch compiles its own static graph
    # once instead of turning every later step into a dynamic-shape one.
    run_step = step_module
    if cfg.compile:
        backend = {} if cfg.compile_backend == "inductor" else {"backend": cfg.compile_backend}
        run_step = torch.compile(step_module, mode=cfg.compile_mode, dynamic=False, **backend)
    graphs = cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES and cfg.compile_backend == "inductor"
    return _Model(tuned, params, reg, step_module, run_step, no_sync, sharded, graphs)


def _schedule(cfg: TrainConfig, n_train: int, *, warn_short: bool) -> tuple[int, int, int]:
    """(epochs, optimizer steps per epoch, total optimizer steps)."""
    epochs = cfg.effective_epochs()
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    if total_steps < cfg.warmup_steps and warn_short:
        warn(f"{cfg.task}: the run's {total_steps} steps end inside its {cfg.warmup_steps} warm-up steps, so the "
             f"learning rate only reaches {lr_at(total_steps - 1, cfg, total_steps):.2g}, not "
             f"{option_name('lr')} {cfg.lr:g}; lower {option_name('warmup_steps')} or train longer")
    return epochs, steps_per_epoch, total_steps


def _optimizer(cfg: TrainConfig, params: dict, device: str) -> torch.optim.Optimizer:
    fused = device.startswith("cuda")
    return torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def _resume_from(run: _Outputs, cfg: TrainConfig, model: _Model, optimizer, total_steps: int, bundle
                 ) -> tuple[int, dict]:
    """The checkpoint's trainable tensors and optimizer state loaded; (its step, its metrics)."""
    state, ckpt = run.state, run.ckpt
    try:
        if model.sharded:  # the checkpoint holds whole tensors: each rank takes its shards
            own = dict(model.tuned.named_trainable())
            if set(own) != set(state["trainable"]):
                raise KeyError("trainable tensors differ")
            parallel.load_trainable(own, state["trainable"])
            optimizer.load_state_dict(parallel.shard_optimizer_state(state["optimizer"], list(model.params.values())))
        else:
            model.tuned.load_state_dict(state["trainable"])
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise TVToolError(f"--resume: {ckpt} does not fit this model ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:120]}); delete {ckpt.parent} and start without "
                          "--resume") from None
    step = int(state["step"])
    metrics = json.loads(state["metrics"])
    if isinstance(state.get("total_steps"), int) and state["total_steps"] != total_steps:
        raise TVToolError(f"--resume: {ckpt} belongs to a run of {state['total_steps']} steps, this one has "
                          f"{total_steps} (the dataset's epoch table or train split changed); delete "
                          f"{ckpt.parent} and start without --resume")
    if isinstance(state.get("base"), str) and state["base"] != bundle.fingerprint:
        raise TVToolError(f"--resume: {ckpt} was trained from base {state['base']}, the weights "
                          f"{cfg.model}:{cfg.pretrained} are now {bundle.fingerprint} (re-made under the same "
                          f"name?); delete {ckpt.parent} and start without --resume")
    return step, metrics


def _train_feed(cfg: TrainConfig, task: _Task, device: str, rank: int, world: int, steps_per_epoch: int,
                first_step: int, total_steps: int) -> TrainFeed:
    """The training order from ``first_step`` on, each rank's share of every micro-batch, images held or streamed."""
    micro = cfg.batch_size // cfg.grad_accum
    if (micro // world) * world != micro:
        raise TVToolError(f"micro-batch {micro} is not divisible by {world} processes")
    data = task.train_data
    placement = Placement(device, cfg.data_on_device, say=None if rank == 0 else (lambda line: None))
    return TrainFeed(data, device, placement.hold(data.nbytes, f"{cfg.task}/train", len(data)),
                     seed=cfg.seed, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, world=world, rank=rank,
                     steps_per_epoch=steps_per_epoch, first_step=first_step, total_steps=total_steps)


# ------------------------------------------------------------------------------------------------ the loop's parts
class _Meter:
    """Images seen and the time since the start and since the last logging step (throughput per interval)."""

    def __init__(self, step: int):
        self.t_start = self.t_log = time.perf_counter()
        self.seen = self.seen_at_log = 0
        self.last_log = step

    def record(self, step: int, total: int, lr: float, loss_acc: torch.Tensor, pen_acc: torch.Tensor,
               has_reg: bool) -> dict:
        """The logging step's record: mean task loss and penalty since the last one, images per second."""
        n_logged = step - self.last_log
        record = {"step": step, "total": total, "task_loss": float(loss_acc) / n_logged,
                  "penalty": float(pen_acc) / n_logged if has_reg else 0.0, "lr": lr,
                  "images_per_s": (self.seen - self.seen_at_log) / max(1e-9, time.perf_counter() - self.t_log)}
        self.seen_at_log, self.t_log = self.seen, time.perf_counter()
        self.last_log = step
        return record


def _stop_if_nonfinite(nonfinite: torch.Tensor, world: int, step: int, ckpt: Path) -> torch.Tensor:
    if world > 1:  # one rank's non-finite value stops every rank
        flag = nonfinite.to(torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        nonfinite = flag.bool()
    if bool(nonfinite):
        raise TVToolError(f"non-finite loss before step {step}; stopped. The last good checkpoint "
                          f"({ckpt if ckpt.exists() else 'none'}) is kept; lower --lr or --lambda")
    return nonfinite


def _save(run: _Outputs, cfg: TrainConfig, model: _Model, optimizer, step: int, metrics: dict, total_steps: int,
          bundle, rank: int) -> None:
    if model.sharded:  # whole tensors gathered by every rank, written by rank 0
        trainable = parallel.gather_state(model.params)
        opt_state = parallel.gather_optimizer_state(optimizer.state_dict())
    elif rank == 0:
        trainable, opt_state = model.params, optimizer.state_dict()
    if rank == 0:
        save_checkpoint(run.ckpt, step, trainable, opt_state, cfg, metrics, output=run.out,
                        total_steps=total_steps, base=bundle.fingerprint)


def _close(feed: TrainFeed, log_file) -> None:
    feed.close()
    if log_file:
        log_file.close()


def _write_task_vector(run: _Outputs, cfg: TrainConfig, bundle, deltas: dict, metrics: dict, info: dict,
                       force: bool) -> None:
    """The task vector with its metadata (base, task, mode, OrthoReg settings, history, metrics, the run's
    settings); then the finished run's checkpoint is removed unless kept."""
    train_info = {**{k: v for k, v in dataclasses.asdict(cfg).items()
                     if k not in ("device", "data_root", "checkpoint_dir", "keep_checkpoints", "data_on_device")},
                  "steps": info["steps"], "epochs": info["epochs"], "world_size": info["world_size"],
                  "final": info["final"], "seconds": info["seconds"], "device": info["device"]}
    # a local weights path is recorded absolute, so `eval` finds the base from any working directory; anything
    # else as the model loader names it (a hub id with the commit it resolved to)
    pretrained = os.path.abspath(cfg.pretrained) if os.path.exists(cfg.pretrained) else bundle.pretrained
    meta = new_meta({"model": bundle.name or cfg.model, "pretrained": pretrained, "fingerprint": bundle.fingerprint},
                    tasks=[cfg.task], mode=cfg.mode, orthoreg=cfg.orthoreg_settings(),
                    history=[history_entry("finetune", task=cfg.task, mode=cfg.mode, steps=info["steps"])],
                    metrics=metrics, train=train_info, settings_digest=cfg.settings_digest())
    write_vector(run.out, deltas, meta, force=force or run.own_output)
    if not cfg.keep_checkpoints and run.owns_checkpoint:
        _remove_checkpoint(cfg, run.ckpt)


# A fine-tuned vector smaller than this fraction of theta_0 (over the tensors it changes) that did not raise the Val
# accuracy either has barely moved. Between a mini-world run on the protocol's schedule (lr 1e-5, 500 warm-up steps
# for 30 steps: 8e-5) and a useful mini run (0.06); a run that raised the Val accuracy is never flagged.
UNMOVED_FRACTION = 1e-3


def _warn_if_unmoved(cfg: TrainConfig, deltas: dict, base_sq: dict, metrics: dict) -> None:
    tau = math.sqrt(sum(float(v.pow(2).sum()) for v in deltas.values()))
    base = math.sqrt(sum(base_sq.get(k, 0.0) for k in deltas))
    if base <= 0 or tau >= UNMOVED_FRACTION * base:
        return
    before, after = metrics.get("zeroshot_val_acc"), metrics.get("val_acc")
    if before is not None and after is not None and after > before:
        return
    acc = f"; Val accuracy {100 * before:.2f}% -> {100 * after:.2f}%" if after is not None else ""
    warn(f"{cfg.task}: the task vector barely moved (||tau|| {tau:.3g} is {100 * tau / base:.2g}% of ||theta_0|| "
         f"over the tensors it tunes{acc}); raise {option_name('lr')} or train longer")


def _accuracies(eval_bundle, cfg: TrainConfig, device: str, deltas: dict, prefix: str) -> dict:
    """Val and test accuracy of theta_0 + deltas on the task; the model returns to the CPU afterwards."""
    ev = Evaluator(eval_bundle, [cfg.task], cfg.data_root, device=device, batch_size=cfg.eval_batch_size,
                   linearized=cfg.mode == "linear", data_on_device=cfg.data_on_device)
    if deltas:
        ev.set_weights({k: v.to(device) for k, v in deltas.items()}, 1.0)
    out = {f"{prefix}{split}_acc": ev.accuracy(cfg.task, split) for split in ("val", "test")}
    ev.reset()
    eval_bundle.model.to("cpu")
    return out
