"""Fine-tuning with OrthoReg: one task in, one task vector out. Readable top to bottom.

The protocol (docs/PROTOCOL.md): AdamW lr 1e-5, weight decay 0.1, cosine schedule with 500 warm-up optimizer
steps, batch 128, gradient clipping 1.0 on the total gradient, frozen zero-shot head, the dataset's epoch count,
training on the Val-held-out split. OrthoReg adds lambda * sum_l ||dW_l^T dW_l - I||_F^2, computed every forward
(every micro-batch) in fp32.

Speed: the uint8 training images live on the device once; each step gathers a batch by index, crops, resizes and
normalizes it there (no JPEG decoding, no host copies), runs under bf16 autocast on CUDA, and never synchronizes
with the host except at logging and checkpoint steps.

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
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import __version__
from .errors import TVToolError
from .fileio import check_append, open_append

from .variants import MODES  # noqa: E402  one list of modes


@dataclass
class TrainConfig:
    task: str
    model: str | None = None             # default: tvtool-mini for mini tasks, else ViT-B-32
    pretrained: str | None = None        # default: the model's default tag (openai for ViT-B-32)
    mode: str = "full"                   # full | attn | lora | linear
    lam: float = 0.0                     # OrthoReg lambda; > 0 turns it on
    orthoreg_form: str = "squared"       # squared (paper) | plain (reference code)
    orthoreg_scope: str = "visual-linear"  # visual-linear (paper) | reference (every trainable 2-D tensor)
    orthoreg_estimator: str = "exact"    # exact | hutchinson (unbiased randomized)
    orthoreg_probes: int = 1
    orthoreg_precision: str = "fp32"     # fp32 (protocol) | tf32 (the exact penalty's products in TF32)
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 500
    batch_size: int = 128                # global batch per optimizer step
    grad_accum: int = 1
    epochs: int | None = None            # default: the dataset's epoch table
    max_steps: int | None = None         # cap on optimizer steps (smoke tests, benchmarks)
    clip_grad: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 8.0
    seed: int = 0
    data_root: str | None = None
    device: str | None = None
    precision: str = "auto"              # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False                # torch.compile the classifier (speed only: same function)
    compile_mode: str = "default"        # torch.compile mode: default | reduce-overhead | max-autotune ... (CUDA
                                         # graph modes need grad_accum 1)
    compile_backend: str = "inductor"    # torch.compile backend (aot_eager: the same graphs without code
                                         # generation, for tests on machines without a C++ compiler)
    fsdp: bool = False                   # under torchrun: shard the tower with FSDP2 instead of DDP (towers that
                                         # do not fit one device)
    eval: bool = True                    # evaluate zero-shot and fine-tuned accuracy (Val + test) for the metadata
    eval_batch_size: int = 256
    checkpoint_every: int = 0            # optimizer steps between checkpoints (0: none)
    checkpoint_dir: str | None = None
    log_every: int = 20
    keep_checkpoints: bool = False       # keep the checkpoint folder after a finished run

    def resolved(self) -> "TrainConfig":
        """Defaults filled in and every option checked (types, finite numbers, ranges, combinations)."""
        from .checks import check_finite

        c = copy.copy(self)
        if not isinstance(c.task, str) or not c.task:
            raise TVToolError(f"task must be a dataset name, got {c.task!r}")
        if c.mode not in MODES:
            raise TVToolError(f"unknown --mode {c.mode!r}; use one of {', '.join(MODES)}")
        if c.model is None:
            c.model = "tvtool-mini" if c.task.startswith("mini-") else "ViT-B-32"
        if c.pretrained is None:
            c.pretrained = "builtin" if c.model == "tvtool-mini" else "openai"
        for name in ("model", "pretrained", "data_root", "device", "checkpoint_dir"):
            value = getattr(c, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TVToolError(f"--{name.replace('_', '-')} must be a text value, got {value!r}")
        if c.data_root is not None:
            c.data_root = os.fspath(c.data_root)
        for name in ("batch_size", "grad_accum", "log_every", "lora_rank", "eval_batch_size", "orthoreg_probes",
                     "epochs", "max_steps", "warmup_steps", "checkpoint_every", "seed"):
            value = getattr(c, name)
            if value is None and name in ("epochs", "max_steps"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TVToolError(f"--{name.replace('_', '-')} must be a whole number, got {value!r}")
            low = 0 if name in ("warmup_steps", "checkpoint_every", "seed") else 1
            if value < low:
                raise TVToolError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
            high = UPPER_BOUNDS.get(name)
            if high is not None and value > high:
                why = UPPER_WHY.get(name, "")
                raise TVToolError(f"--{name.replace('_', '-')} must be <= {high}, got {value}{why}")
        c.lr = check_finite("--lr", c.lr, low=0, high=10, low_open=True)
        c.weight_decay = check_finite("--weight-decay", c.weight_decay, low=0, high=100)
        c.lam = check_finite("--lambda", c.lam, low=0, high=1e6)
        c.lora_alpha = check_finite("--lora-alpha", c.lora_alpha, low=0, high=1e6, low_open=True)
        c.clip_grad = check_finite("--clip-grad", c.clip_grad, low=0)
        for name in ("eval", "keep_checkpoints", "compile", "fsdp"):
            if not isinstance(getattr(c, name), bool):
                raise TVToolError(f"{name} must be true or false, got {getattr(c, name)!r}")
        if c.precision not in ("auto", "fp32", "bf16"):
            raise TVToolError(f"--precision {c.precision!r}: use auto, fp32 or bf16")
        if c.compile_mode not in COMPILE_MODES:
            raise TVToolError(f"--compile-mode {c.compile_mode!r}: use one of {', '.join(COMPILE_MODES)}")
        if not isinstance(c.compile_backend, str) or not c.compile_backend:
            raise TVToolError(f"compile_backend must be a torch.compile backend name, got {c.compile_backend!r}")
        if c.fsdp and c.mode == "linear":
            raise TVToolError("--fsdp does not support --mode linear (the jvp runs over the whole tower); use DDP "
                              "(the default under torchrun) or another mode")
        if c.fsdp and c.compile:
            raise TVToolError("--fsdp with --compile is not supported yet; drop one of them")
        if c.compile and c.compile_mode in CUDA_GRAPH_MODES and c.grad_accum > 1:
            # each micro-batch's replay overwrites the graph-owned gradients the previous one left (pytorch#169545)
            raise TVToolError(f"--compile-mode {c.compile_mode} captures CUDA graphs, which cannot accumulate "
                              f"gradients over --grad-accum {c.grad_accum} micro-batches; use --compile-mode default "
                              "or max-autotune-no-cudagraphs")
        from .orthoreg import ESTIMATORS, FORMS, PRECISIONS, SCOPES

        choices = {"orthoreg_form": FORMS, "orthoreg_scope": SCOPES, "orthoreg_estimator": ESTIMATORS,
                   "orthoreg_precision": PRECISIONS}
        for name, allowed in choices.items():
            if getattr(c, name) not in allowed:
                raise TVToolError(f"--{name.replace('_', '-')} {getattr(c, name)!r}: use one of {', '.join(allowed)}")
        if c.batch_size % c.grad_accum:
            raise TVToolError(f"--batch-size {c.batch_size} is not divisible by --grad-accum {c.grad_accum}")
        return c

    def validate(self) -> "TrainConfig":
        """:meth:`resolved` plus everything checkable without building a model: the dataset is registered, its
        data root holds the splits the run reads, and the weights spec names a known tag or an existing file.
        ``finetune`` calls it first, so a mistake costs seconds, not a model build."""
        from .datasets.base import check_available

        c = self.resolved()
        check_available(c.task, ("train", "val", "test") if c.eval else ("train",), c.data_root)
        check_weights_spec(c.model, c.pretrained)
        return c

    def effective_epochs(self) -> int:
        """The epochs a run of this config trains: ``epochs``, else the dataset's epoch table."""
        if self.epochs is not None:
            return self.epochs
        from .datasets import get_dataset

        return get_dataset(self.task).epochs

    def settings_digest(self) -> str:
        """Canonical digest of the settings that determine the trained vector (the resolved config): a recipe
        reruns an output whose recorded digest differs."""
        key = json.dumps(_config_key(self.resolved()), sort_keys=True, default=str)
        return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:16]

    def orthoreg_settings(self) -> dict | None:
        if self.lam <= 0:
            return None
        return {"lambda": self.lam, "form": self.orthoreg_form, "scope": self.orthoreg_scope,
                "estimator": self.orthoreg_estimator, "probes": self.orthoreg_probes,
                "precision": self.orthoreg_precision}


# Far above any real run, refused at once: a typo like 1e9 epochs would otherwise train until killed, and seeds
# must fit the 64-bit generators (numpy's legacy seeding takes the seed modulo 2**32).
MAX_SEED = 2**63 - 1
UPPER_BOUNDS = {"epochs": 10_000, "max_steps": 10**9, "warmup_steps": 10**9, "seed": MAX_SEED,
                "batch_size": 1 << 20, "eval_batch_size": 1 << 20, "orthoreg_probes": 1 << 10, "lora_rank": 1 << 14}
UPPER_WHY = {"epochs": " (the protocol's longest run is 147 epochs)", "seed": " (seeds are 63-bit numbers)"}


# ------------------------------------------------------------------------------------------------ small pieces
def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The data order of one epoch: a permutation seeded by (seed, epoch) alone, so a resumed run sees the same."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
    return torch.randperm(n, generator=g)


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


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the ones that capture CUDA graphs


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
    import random

    import numpy as np

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


def _config_key(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share with the run it continues (and that determine its vector)."""
    d = dataclasses.asdict(cfg)
    for k in ("device", "eval", "eval_batch_size", "checkpoint_every", "checkpoint_dir", "log_every", "data_root",
              "keep_checkpoints", "compile", "compile_mode", "compile_backend", "fsdp"):
        d.pop(k)
    if d["orthoreg_precision"] == "fp32":  # the default before the option existed: older digests stay valid
        d.pop("orthoreg_precision")
    return d


def check_weights_spec(model: str, pretrained: str) -> None:
    """Fail before any model is built when ``pretrained`` names neither an existing file/folder nor a known tag."""
    from .models import check_pretrained

    check_pretrained(model, pretrained)


_CHECKPOINT_KEYS = {"step": int, "trainable": dict, "optimizer": dict, "config": str, "metrics": str}


def save_checkpoint(path: Path, step: int, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    cfg: TrainConfig, metrics: dict, output: Path | None = None,
                    total_steps: int | None = None, base: str | None = None) -> None:
    from .taskvector import atomic_path

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
    import contextlib

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
        import sys

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
    from . import datasets, heads, models, parallel, variants
    from .orthoreg import OrthoReg
    from .taskvector import check_output, history_entry, new_meta, write_vector

    cfg = cfg.validate()  # options, dataset, data root, weights spec: before any model is built
    out = Path(out)
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
                              "pass --force to overwrite it, or another -o")
        check_output(out, True)
    else:
        check_output(out, force)
        check_checkpoint_slot(cfg, ckpt, out)
    # the checkpoint file this run may remove when it finishes: one it resumed from or writes, or any in the
    # default .OUTPUT.ckpt folder (named after this output); never a file in a user's folder it did not touch
    owns_checkpoint = resume or not cfg.checkpoint_dir
    device = cfg.device or models.default_device()
    if device.startswith("cuda") and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', os.environ.get('RANK', 0)))}"
        # before the process group: NCCL's communicators and FSDP2's device mesh use the current device
        torch.cuda.set_device(torch.device(device))
    rank, world = maybe_init_distributed(device)
    _seed_everything(cfg.seed)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.startswith("cuda"))

    # --- model, head, data (the task is checked first: a typo should not wait for a model download)
    spec = datasets.get_dataset(cfg.task)
    bundle = models.load_clip(cfg.model, cfg.pretrained, device=device)
    head = heads.zero_shot_head(bundle, spec)
    size = bundle.image_size
    train_x, train_y = datasets.load_split(cfg.task, "train", cfg.data_root, size)
    n_train = train_y.numel()
    if n_train == 0:  # 0 steps would write an all-zero vector that looks like a result
        raise TVToolError(f"{cfg.task}: the training split is empty; check the data with `tvtool data check`")
    train_x, train_y = train_x.to(device), train_y.to(device)
    mean = torch.tensor(bundle.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(bundle.std, device=device).view(1, 3, 1, 1)

    metrics: dict = {}
    eval_bundle = None
    if cfg.eval and rank == 0:
        # A separate copy of the base model, parked on the CPU during training (no device memory taken from the
        # run): accuracies of theta_0 (zero-shot) and theta_0 + tau (fine-tuned) are measured exactly as
        # `tvtool eval` measures them (the tangent model for linear mode).
        eval_bundle = copy.copy(bundle)
        eval_bundle.model = copy.deepcopy(bundle.model).to("cpu")
        if not resume:
            metrics.update(_accuracies(eval_bundle, cfg, device, {}, "zeroshot_"))

    # --- what is tuned, and the regularizer
    tuned = variants.prepare(bundle.model, cfg.mode, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)
    classifier = heads.ImageClassifier(tuned.module, head).to(device)
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
    step_module = TrainStep(classifier, reg, use_bf16)
    if world > 1 and not sharded:
        step_module, no_sync = parallel.ddp(step_module, device)
    # torch.compile: fewer, fused kernels; on a GPU a ViT-B-32 step is bound by Python launching ~1,100 kernels
    # (benchmarks/gpu_profile.py). The penalty is inside the compiled step. reduce-overhead adds CUDA graphs (each
    # step then marks its start, below). dynamic=False: the short last batch of an epoch compiles its own static
    # graph once instead of turning every later step into a dynamic-shape one.
    run_step = step_module
    if cfg.compile:
        backend = {} if cfg.compile_backend == "inductor" else {"backend": cfg.compile_backend}
        run_step = torch.compile(step_module, mode=cfg.compile_mode, dynamic=False, **backend)
    graphs = cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES and cfg.compile_backend == "inductor"

    # --- optimizer and schedule
    epochs = cfg.effective_epochs()
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    fused = device.startswith("cuda")
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=fused or None)
    step = 0
    if state is not None:
        try:
            if sharded:  # the checkpoint holds whole tensors: each rank takes its shards
                own = dict(tuned.named_trainable())
                if set(own) != set(state["trainable"]):
                    raise KeyError("trainable tensors differ")
                parallel.load_trainable(own, state["trainable"])
                optimizer.load_state_dict(parallel.shard_optimizer_state(state["optimizer"], list(params.values())))
            else:
                tuned.load_state_dict(state["trainable"])
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

    # --- the loop
    log_file = open_append(log_path, "a log file (--log)") if log_path and rank == 0 else None
    micro = cfg.batch_size // cfg.grad_accum
    per_rank = micro // world
    if per_rank * world != micro:
        raise TVToolError(f"micro-batch {micro} is not divisible by {world} processes")
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    loss_acc = torch.zeros((), device=device)
    pen_acc = torch.zeros((), device=device)
    t_start, seen, last_log = time.perf_counter(), 0, step
    t_log, seen_at_log = t_start, 0  # throughput is reported per logging interval
    perm, perm_epoch = None, -1
    record = {"task_loss": float("nan"), "penalty": 0.0}
    step_module.train()
    while step < total_steps:
        epoch = step // steps_per_epoch
        if epoch != perm_epoch:
            perm = epoch_permutation(cfg.seed, epoch, n_train).to(device)
            perm_epoch = epoch
        lr = lr_at(step, cfg, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Seeded by the step alone, not the rank: every rank draws the same crops for the whole global batch and
        # takes its own slice, so a torchrun run sees exactly the images a one-process run sees.
        gen = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step))
        batch_idx = perm[(step % steps_per_epoch) * cfg.batch_size:][: cfg.batch_size]
        n_batch = batch_idx.numel()  # the last batch of an epoch can be short
        boxes = crop_boxes(n_batch, train_x.shape[-2], train_x.shape[-1], gen, device)
        positions = torch.arange(n_batch, device=device)
        for m in range(cfg.grad_accum):
            pos = torch.tensor_split(positions[m * micro:(m + 1) * micro], world)[rank]
            n_real = pos.numel()
            if n_real == 0:
                # a short last batch can leave this rank no image in this micro-batch: it still runs the step on one
                # stand-in image weighted 0, so every rank runs the same forward and backward (DDP's gradient
                # buckets, FSDP's gathers) and the penalty is still added once per micro-batch
                pos = positions[:1]
            idx = batch_idx.index_select(0, pos)
            x = train_x.index_select(0, idx).float().div_(255)
            x = resized_crop(x, boxes.index_select(0, pos), size)
            x = (x - mean) / std
            y = train_y.index_select(0, idx)
            probes = reg.draw_probes(gen) if reg is not None else None
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            # the gradients of a micro-batch before the last stay local; the last one's backward averages the sum
            with (no_sync() if m < cfg.grad_accum - 1 else contextlib.nullcontext()), _compile_errors(cfg):
                task_loss, pen = run_step(x, y, probes)
                # a step's loss is the mean over the global batch: micro-batches and ranks carry their share (see
                # tvtool/parallel.py for why the penalty is added whole on every rank)
                weight = n_real * world / n_batch
                loss = task_loss * weight
                loss_acc += task_loss.detach() * weight
                if pen is not None:
                    loss = loss + cfg.lam * pen / cfg.grad_accum
                    pen_acc += pen.detach() / cfg.grad_accum
                loss.backward()
            seen += n_real * world
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.clip_grad if cfg.clip_grad > 0
                                                   else float("inf"))
        if parallel.is_sharded(grad_norm):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # non-finite loss, penalty or gradient: caught at the next logging step, before any checkpoint
        nonfinite |= ~(torch.isfinite(loss_acc) & torch.isfinite(pen_acc) & torch.isfinite(grad_norm))
        step += 1
        at_ckpt = cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0
        # step 1 is logged too, so a batch job's log shows the run has started within one step
        if step % cfg.log_every == 0 or step in (1, total_steps) or at_ckpt or step == stop_after:
            if world > 1:  # one rank's non-finite value stops every rank
                flag = nonfinite.to(torch.int32)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                nonfinite = flag.bool()
            if bool(nonfinite):  # the only host sync: at logging / checkpoint steps
                raise TVToolError(f"non-finite loss before step {step}; stopped. The last good checkpoint "
                                  f"({ckpt if ckpt.exists() else 'none'}) is kept; lower --lr or --lambda")
            n_logged = step - last_log
            record = {"step": step, "total": total_steps, "task_loss": float(loss_acc) / n_logged,
                      "penalty": float(pen_acc) / n_logged if reg is not None else 0.0, "lr": lr,
                      "images_per_s": (seen - seen_at_log) / max(1e-9, time.perf_counter() - t_log)}
            seen_at_log, t_log = seen, time.perf_counter()
            loss_acc.zero_()
            pen_acc.zero_()
            last_log = step
            if progress and rank == 0:
                progress(record)
            if log_file:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if at_ckpt and sharded:  # whole tensors gathered by every rank, written by rank 0
                trainable = parallel.gather_state(params)
                opt_state = parallel.gather_optimizer_state(optimizer.state_dict())
                if rank == 0:
                    save_checkpoint(ckpt, step, trainable, opt_state, cfg, metrics, output=out,
                                    total_steps=total_steps, base=bundle.fingerprint)
            elif at_ckpt and rank == 0:
                save_checkpoint(ckpt, step, params, optimizer.state_dict(), cfg, metrics, output=out,
                                total_steps=total_steps, base=bundle.fingerprint)
            owns_checkpoint = owns_checkpoint or at_ckpt  # written by this run: removed when it finishes
        if stop_after is not None and step >= stop_after:
            if log_file:
                log_file.close()
            if world > 1:  # every rank leaves after rank 0 has written its checkpoint
                torch.distributed.barrier()
            return TrainResult(out, step, record["task_loss"], record["penalty"])
    elapsed = time.perf_counter() - t_start
    if log_file:
        log_file.close()

    # --- the task vector and its metadata
    if sharded:
        deltas = parallel.gather_task_vector(tuned)
    else:
        deltas = {k: v.detach().float().cpu() for k, v in tuned.deltas().items()}
    if rank == 0:
        if eval_bundle is not None:
            if "zeroshot_val_acc" not in metrics:  # resumed from a checkpoint taken before they were known
                metrics.update(_accuracies(eval_bundle, cfg, device, {}, "zeroshot_"))
            metrics.update(_accuracies(eval_bundle, cfg, device, deltas, ""))
        final = {"task_loss": record["task_loss"], "penalty": record["penalty"]}
        train_info = {**{k: v for k, v in dataclasses.asdict(cfg).items()
                         if k not in ("device", "data_root", "checkpoint_dir", "keep_checkpoints")},
                      "steps": step, "epochs": epochs, "world_size": world, "final": final,
                      "seconds": elapsed, "device": device}
        # a local weights path is recorded absolute, so `eval` finds the base from any working directory; anything
        # else as the model loader names it (a hub id with the commit it resolved to)
        pretrained = os.path.abspath(cfg.pretrained) if os.path.exists(cfg.pretrained) else bundle.pretrained
        meta = new_meta({"model": bundle.name or cfg.model, "pretrained": pretrained,
                         "fingerprint": bundle.fingerprint},
                        tasks=[cfg.task], mode=cfg.mode, orthoreg=cfg.orthoreg_settings(),
                        history=[history_entry("finetune", task=cfg.task, mode=cfg.mode, steps=step)], metrics=metrics,
                        train=train_info, settings_digest=cfg.settings_digest())
        write_vector(out, deltas, meta, force=force or own_output)
        if not cfg.keep_checkpoints and owns_checkpoint:
            _remove_checkpoint(cfg, ckpt)
    if world > 1:
        torch.distributed.barrier()
    return TrainResult(out, step, record["task_loss"], record["penalty"], metrics, elapsed, seen / max(elapsed, 1e-9))


def _accuracies(eval_bundle, cfg: TrainConfig, device: str, deltas: dict, prefix: str) -> dict:
    """Val and test accuracy of theta_0 + deltas on the task; the model returns to the CPU afterwards."""
    from .evaluate import Evaluator

    ev = Evaluator(eval_bundle, [cfg.task], cfg.data_root, device=device, batch_size=cfg.eval_batch_size,
                   linearized=cfg.mode == "linear")
    if deltas:
        ev.set_weights({k: v.to(device) for k, v in deltas.items()}, 1.0)
    out = {f"{prefix}{split}_acc": ev.accuracy(cfg.task, split) for split in ("val", "test")}
    ev.reset()
    eval_bundle.model.to("cpu")
    return out
