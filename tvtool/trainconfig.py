"""What a fine-tuning run is asked to do: :class:`TrainConfig` (every `tvtool finetune` option, declared once), the
choices each option takes, and the defaults of each task family. No torch here: `tvtool finetune` builds its
options from this module and checks them (and its output) before the trainer, torch and open_clip are imported.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

from .errors import TVToolError, spell

MODES = ("full", "attn", "lora", "linear")  # tvtool/variants.py implements them
# OrthoReg's options (tvtool/orthoreg.py implements them)
FORMS = ("squared", "plain")
PRECISIONS = ("fp32", "tf32")
SCOPES = ("visual-linear", "reference")
ESTIMATORS = ("exact", "hutchinson")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the ones that capture CUDA graphs

# Far above any real run, refused at once: a typo like 1e9 epochs would otherwise train until killed, and seeds
# must fit the 64-bit generators (numpy's legacy seeding takes the seed modulo 2**32).
MAX_SEED = 2**63 - 1
UPPER_BOUNDS = {"epochs": 10_000, "max_steps": 10**9, "warmup_steps": 10**9, "seed": MAX_SEED,
                "batch_size": 1 << 20, "eval_batch_size": 1 << 20, "orthoreg_probes": 1 << 10, "lora_rank": 1 << 14}
UPPER_WHY = {"epochs": " (the protocol's longest run is 147 epochs)", "seed": " (seeds are 63-bit numbers)"}

# The defaults that depend on the task family. Real datasets: the protocol (docs/PROTOCOL.md) on ViT-B-32. The
# mini-world: the bundled tiny CLIP and the quickstart's settings, the protocol's shape (AdamW, wd 0.1, cosine with
# warm-up, clip 1.0, frozen head) with a learning rate, warm-up and batch (64: twice the updates per epoch) suited
# to a 1M-parameter model trained for 60-210 steps (docs/MINI_WORLD.md: every task >= 80%, mean ~92%); the
# protocol's lr 1e-5 and 500 warm-up steps would end those runs inside their warm-up, the vector barely moved.
FAMILY_DEFAULTS = {
    "real": {"model": "ViT-B-32", "pretrained": "openai", "lr": 1e-5, "warmup_steps": 500, "batch_size": 128},
    "mini": {"model": "tvtool-mini", "pretrained": "builtin", "lr": 1e-3, "warmup_steps": 10, "batch_size": 64},
}
FAMILY_FIELDS = ("lr", "warmup_steps", "batch_size")  # TrainConfig fields whose None means "the family's default"


def task_family(task: str) -> str:
    """"mini" for the built-in mini-world tasks, else "real"."""
    return "mini" if str(task).startswith("mini-") else "real"


def family_defaults(task: str) -> dict:
    return FAMILY_DEFAULTS[task_family(task)]


def default_weights(tasks) -> tuple[str, str]:
    """(model, pretrained) of the task family of ``tasks`` (one family; mini if they are all mini tasks). The rule
    every command follows without --model / --pretrained: the base the vectors record, else this."""
    families = {task_family(t) for t in tasks} or {"real"}
    d = FAMILY_DEFAULTS["mini" if families == {"mini"} else "real"]
    return d["model"], d["pretrained"]


# Command-line flags whose name is not the field's with dashes.
_FLAGS = {"lam": "--lambda"}


def option_name(field_name: str) -> str:
    """How the user named a TrainConfig field: its `tvtool finetune` flag on the command line, the field in Python."""
    return spell(_FLAGS.get(field_name, "--" + field_name.replace("_", "-")), field_name)


@dataclass
class TrainConfig:
    task: str
    model: str | None = None             # default: the task family's (tvtool-mini for mini tasks, else ViT-B-32)
    pretrained: str | None = None        # default: the model's default tag (openai for ViT-B-32)
    mode: str = "full"                   # full | attn | lora | linear
    lam: float = 0.0                     # OrthoReg lambda; > 0 turns it on
    orthoreg_form: str = "squared"       # squared (paper) | plain (reference code)
    orthoreg_scope: str = "visual-linear"  # visual-linear (paper) | reference (every trainable 2-D tensor)
    orthoreg_estimator: str = "exact"    # exact | hutchinson (unbiased randomized)
    orthoreg_probes: int = 1
    orthoreg_precision: str = "fp32"     # fp32 (protocol) | tf32 (the exact penalty's products in TF32)
    lr: float | None = None              # default: the task family's (protocol 1e-5; mini 1e-3)
    weight_decay: float = 0.1
    warmup_steps: int | None = None      # default: the task family's (protocol 500; mini 10)
    batch_size: int | None = None        # global batch per optimizer step; default: the family's (128; mini 64)
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
    data_on_device: str = "auto"         # auto | yes | no: hold the split's images on the device or stream them

    def resolved(self) -> "TrainConfig":
        """Defaults filled in and every option checked (types, finite numbers, ranges, combinations)."""
        from .checks import check_finite

        c = copy.copy(self)
        if not isinstance(c.task, str) or not c.task:
            raise TVToolError(f"task must be a dataset name, got {c.task!r}")
        from .datasets.base import canonical_task

        c.task = canonical_task(c.task)  # FusionBench's and TALL masks' spellings (stanford-cars, CarsVal) too
        if c.mode not in MODES:
            raise TVToolError(f"unknown {option_name('mode')} {c.mode!r}; use one of {', '.join(MODES)}")
        family = family_defaults(c.task)
        if c.model is None:
            c.model = family["model"]
        if c.pretrained is None:
            # a model's own default tag (builtin for tvtool-mini, whatever the task), else open_clip's openai
            c.pretrained = next((d["pretrained"] for d in FAMILY_DEFAULTS.values() if d["model"] == c.model), "openai")
        for name in FAMILY_FIELDS:
            if getattr(c, name) is None:
                setattr(c, name, family[name])
        for name in ("model", "pretrained", "data_root", "device", "checkpoint_dir"):
            value = getattr(c, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TVToolError(f"{option_name(name)} must be a text value, got {value!r}")
        if c.data_root is not None:
            c.data_root = os.fspath(c.data_root)
        for name in ("batch_size", "grad_accum", "log_every", "lora_rank", "eval_batch_size", "orthoreg_probes",
                     "epochs", "max_steps", "warmup_steps", "checkpoint_every", "seed"):
            value = getattr(c, name)
            if value is None and name in ("epochs", "max_steps"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TVToolError(f"{option_name(name)} must be a whole number, got {value!r}")
            low = 0 if name in ("warmup_steps", "checkpoint_every", "seed") else 1
            if value < low:
                raise TVToolError(f"{option_name(name)} must be >= {low}, got {value}")
            high = UPPER_BOUNDS.get(name)
            if high is not None and value > high:
                raise TVToolError(f"{option_name(name)} must be <= {high}, got {value}{UPPER_WHY.get(name, '')}")
        c.lr = check_finite(option_name("lr"), c.lr, low=0, high=10, low_open=True)
        c.weight_decay = check_finite(option_name("weight_decay"), c.weight_decay, low=0, high=100)
        c.lam = check_finite(option_name("lam"), c.lam, low=0, high=1e6)
        c.lora_alpha = check_finite(option_name("lora_alpha"), c.lora_alpha, low=0, high=1e6, low_open=True)
        c.clip_grad = check_finite(option_name("clip_grad"), c.clip_grad, low=0)
        for name in ("eval", "keep_checkpoints", "compile", "fsdp"):
            if not isinstance(getattr(c, name), bool):
                raise TVToolError(f"{name} must be true or false, got {getattr(c, name)!r}")
        if c.data_on_device not in ("auto", "yes", "no"):
            raise TVToolError(f"{option_name('data_on_device')} {c.data_on_device!r}: use auto, yes or no")
        if c.precision not in ("auto", "fp32", "bf16"):
            raise TVToolError(f"{option_name('precision')} {c.precision!r}: use auto, fp32 or bf16")
        if c.compile_mode not in COMPILE_MODES:
            raise TVToolError(f"{option_name('compile_mode')} {c.compile_mode!r}: use one of "
                              f"{', '.join(COMPILE_MODES)}")
        if not isinstance(c.compile_backend, str) or not c.compile_backend:
            raise TVToolError(f"compile_backend must be a torch.compile backend name, got {c.compile_backend!r}")
        if c.fsdp and c.mode == "linear":
            raise TVToolError(f"{option_name('fsdp')} does not support {option_name('mode')} linear (the jvp runs "
                              "over the whole tower); use DDP (the default under torchrun) or another mode")
        if c.fsdp and c.compile:
            raise TVToolError(f"{option_name('fsdp')} with {option_name('compile')} is not supported yet; drop one "
                              "of them")
        if c.compile and c.compile_mode in CUDA_GRAPH_MODES and c.grad_accum > 1:
            # each micro-batch's replay overwrites the graph-owned gradients the previous one left (pytorch#169545)
            raise TVToolError(f"{option_name('compile_mode')} {c.compile_mode} captures CUDA graphs, which cannot "
                              f"accumulate gradients over {option_name('grad_accum')} {c.grad_accum} micro-batches; "
                              "use compile mode default or max-autotune-no-cudagraphs")
        choices = {"orthoreg_form": FORMS, "orthoreg_scope": SCOPES, "orthoreg_estimator": ESTIMATORS,
                   "orthoreg_precision": PRECISIONS}
        for name, allowed in choices.items():
            if getattr(c, name) not in allowed:
                raise TVToolError(f"{option_name(name)} {getattr(c, name)!r}: use one of {', '.join(allowed)}")
        if c.batch_size % c.grad_accum:
            raise TVToolError(f"{option_name('batch_size')} {c.batch_size} is not divisible by "
                              f"{option_name('grad_accum')} {c.grad_accum}")
        return c

    def validate(self) -> "TrainConfig":
        """:meth:`resolved` plus everything checkable without building a model: the dataset is registered, its
        data root holds the splits the run reads, and the weights spec names a known tag or an existing file.
        ``finetune`` calls it first, so a mistake costs seconds, not a model build."""
        from .datasets.sources import check_available

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
        key = json.dumps(config_key(self.resolved()), sort_keys=True, default=str)
        return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:16]

    def orthoreg_settings(self) -> dict | None:
        if self.lam <= 0:
            return None
        return {"lambda": self.lam, "form": self.orthoreg_form, "scope": self.orthoreg_scope,
                "estimator": self.orthoreg_estimator, "probes": self.orthoreg_probes,
                "precision": self.orthoreg_precision}


def default_values() -> dict:
    """Each TrainConfig field's declared default (None where the task family decides): what the CLI shows."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


def config_key(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share with the run it continues (and that determine its vector)."""
    d = dataclasses.asdict(cfg)
    for k in ("device", "eval", "eval_batch_size", "checkpoint_every", "checkpoint_dir", "log_every", "data_root",
              "keep_checkpoints", "compile", "compile_mode", "compile_backend", "fsdp", "data_on_device"):
        d.pop(k)
    if d["orthoreg_precision"] == "fp32":  # the default before the option existed: older digests stay valid
        d.pop("orthoreg_precision")
    return d


def check_weights_spec(model: str, pretrained: str) -> None:
    """Fail before any model is built when ``pretrained`` names neither an existing file/folder nor a known tag."""
    from .models import check_pretrained  # torch: only once the cheap checks have passed

    check_pretrained(model, pretrained)
