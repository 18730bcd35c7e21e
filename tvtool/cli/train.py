"""Commands that train: finetune (one task), run (a YAML recipe), quickstart (the offline mini-world job)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import app
from ._output import STDOUT, announce, destination, finetune_name, output_option, wrote

# The API (torch) and rich are imported inside the commands, so `--help` starts instantly.


from ..trainconfig import FAMILY_DEFAULTS, default_values

# Every default below is TrainConfig's (tvtool/trainconfig.py): declared once, shown here. None means "decided by
# the task family" (the protocol's for real datasets, the quickstart's for the mini-world).
D = default_values()


def _family(field: str) -> str:
    real, mini = FAMILY_DEFAULTS["real"][field], FAMILY_DEFAULTS["mini"][field]
    return f"default: {real:g} for real datasets, {mini:g} for mini tasks" if isinstance(real, float) else \
        f"default: {real} for real datasets, {mini} for mini tasks"


@app.command()
def finetune(
    task: str = typer.Argument(..., help="Task name (see `tvtool data list`; FusionBench's and TALL masks' spellings "
                                         "such as stanford-cars or CarsVal work too), e.g. cars or mini-shapes."),
    output: Optional[str] = output_option("the task vector", "TASK.st, with -MODE, -lambdaL (-FORM, -SCOPE, "
                                          "-ESTIMATOR) and -seedS added when not the default, e.g. "
                                          "cars-lambda0.0001.st"),
    model: Optional[str] = typer.Option(D["model"], "--model", help=f"open_clip architecture ({_family('model')})."),
    pretrained: Optional[str] = typer.Option(D["pretrained"], "--pretrained",
                                             help="open_clip tag, a .safetensors file, an open_clip or transformers "
                                                  "CLIP folder, or a hub id ORG/NAME (default: the model's own: "
                                                  "openai, or builtin for tvtool-mini)."),
    mode: str = typer.Option(D["mode"], "--mode", help="full | attn (in_proj + out_proj weights) | lora | linear "
                                                       "(tangent-space model via torch.func.jvp)."),
    orthoreg: Optional[bool] = typer.Option(None, "--orthoreg/--no-orthoreg",
                                            help="Add the OrthoReg penalty (on by default when --lambda > 0)."),
    lam: float = typer.Option(D["lam"], "--lambda", help="OrthoReg strength; > 0 turns it on. Paper: 10 for full FT "
                                                         "ViT-B-32 with --orthoreg-form plain, 1.0 for LoRA-ATT."),
    form: str = typer.Option(D["orthoreg_form"], "--orthoreg-form",
                             help="squared (paper: ||dW^T dW - I||_F^2) | plain (reference code: not squared)."),
    scope: str = typer.Option(D["orthoreg_scope"], "--orthoreg-scope",
                              help="visual-linear (paper: tuned visual linear layers) | reference (every trainable "
                                   "2-D tensor)."),
    estimator: str = typer.Option(D["orthoreg_estimator"], "--orthoreg-estimator",
                                  help="exact | hutchinson (unbiased randomized)."),
    probes: int = typer.Option(D["orthoreg_probes"], "--orthoreg-probes",
                               help="Probe vectors per layer for the hutchinson estimator."),
    orthoreg_precision: str = typer.Option(D["orthoreg_precision"], "--orthoreg-precision",
                                           help="fp32 (protocol) | tf32: the exact penalty's matrix products in TF32 "
                                                "on CUDA, about 2x faster."),
    lr: Optional[float] = typer.Option(D["lr"], "--lr", help=f"AdamW learning rate ({_family('lr')})."),
    weight_decay: float = typer.Option(D["weight_decay"], "--weight-decay", help="AdamW weight decay (decoupled)."),
    warmup: Optional[int] = typer.Option(D["warmup_steps"], "--warmup-steps",
                                         help=f"Linear warm-up steps before the cosine decay ({_family('warmup_steps')})."),
    batch_size: Optional[int] = typer.Option(D["batch_size"], "--batch-size",
                                             help=f"Global batch per optimizer step ({_family('batch_size')})."),
    grad_accum: int = typer.Option(D["grad_accum"], "--grad-accum", help="Micro-batches per step (ViT-L-14: 2)."),
    epochs: Optional[int] = typer.Option(D["epochs"], "--epochs", help="Default: the protocol's table for the dataset."),
    max_steps: Optional[int] = typer.Option(D["max_steps"], "--max-steps",
                                            help="Train at most N optimizer steps. The cosine schedule is squeezed to "
                                                 "end at step N (warm-up unchanged): a shorter run, not a truncated one."),
    lora_rank: int = typer.Option(D["lora_rank"], "--lora-rank",
                                  help="With --mode lora: rank r of each low-rank update B A."),
    lora_alpha: float = typer.Option(D["lora_alpha"], "--lora-alpha",
                                     help="With --mode lora: the update is scaled by lora_alpha / lora_rank."),
    seed: int = typer.Option(D["seed"], "--seed", help="Seed of data order, augmentation and initialization; same "
                                                       "seed, same run."),
    data_root: Optional[str] = typer.Option(D["data_root"], "--data-root", envvar="TVTOOL_DATA", help="Dataset root."),
    device: Optional[str] = typer.Option(D["device"], "--device", help="cuda, cuda:1, cpu (default: cuda if "
                                                                       "available)."),
    precision: str = typer.Option(D["precision"], "--precision", help="auto (bf16 autocast on CUDA) | fp32 | bf16."),
    compile: bool = typer.Option(D["compile"], "--compile",
                                 help="torch.compile the training step (model, loss and OrthoReg penalty): faster "
                                      "steps on a GPU after a minute of compiling; the same function."),
    compile_mode: Optional[str] = typer.Option(None, "--compile-mode", help="torch.compile's mode (implies "
                                               "--compile): default | reduce-overhead (CUDA graphs; needs "
                                               "--grad-accum 1) | max-autotune | max-autotune-no-cudagraphs."),
    fsdp: bool = typer.Option(D["fsdp"], "--fsdp",
                              help="Under torchrun: shard the image tower, its gradients and AdamW's state over the "
                                   "processes (FSDP2) instead of replicating it (DDP); for towers whose training "
                                   "state does not fit one device (the weights are loaded whole once, then sharded). "
                                   "Not with --compile or --mode linear."),
    no_eval: bool = typer.Option(not D["eval"], "--no-eval",
                                 help="Skip the zero-shot / fine-tuned accuracy measurements."),
    data_on_device: str = typer.Option(D["data_on_device"], "--data-on-device",
                                       help="auto | yes | no: hold the training images on the device (auto: when "
                                            "they fit its memory budget) or stream each batch from the cache ahead "
                                            "of the step; the trained vector is the same."),
    checkpoint_every: int = typer.Option(D["checkpoint_every"], "--checkpoint-every",
                                         help="Save a resumable checkpoint every N steps."),
    checkpoint_dir: Optional[str] = typer.Option(D["checkpoint_dir"], "--checkpoint-dir",
                                                 help="Default: .OUTPUT.ckpt/ beside it."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint of the same settings."),
    keep_checkpoints: bool = typer.Option(D["keep_checkpoints"], "--keep-checkpoints",
                                          help="Keep the checkpoint folder after the run finishes (default: removed)."),
    log: Optional[Path] = typer.Option(None, "--log", help="Append a JSON line per logging step to this file."),
    log_dir: Optional[Path] = typer.Option(None, "--log-dir", help="Also log to TensorBoard, in LOG_DIR/<output "
                                           "name>/ (needs pip install 'tvtool[tensorboard]')."),
    log_every: int = typer.Option(D["log_every"], "--log-every", help="Optimizer steps between log lines."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    force: bool = typer.Option(False, "--force", help="Overwrite the output if it exists."),
):
    """Fine-tune CLIP's image tower on TASK (optionally with OrthoReg) and write the task vector.

    Without -o the vector goes to TASK.st plus the settings that tell variants apart, in the current directory:
    `tvtool finetune cars --lambda 1e-4` writes cars-lambda0.0001.st (said on stderr).

    Examples:
      tvtool finetune cars --lambda 1e-4
      tvtool finetune cars --lambda 10 --orthoreg-form plain -o cars.st   (the paper's ViT-B-32 setting)
      tvtool finetune mini-shapes --lambda 0.1 --log-dir tb
      torchrun --nproc_per_node 4 -m tvtool finetune sun397 --mode attn -o sun.st
      torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m tvtool finetune
          sun397 --model ViT-H-14 --pretrained laion2b_s32b_b79k --fsdp -o sun.st   (on each node)
    """
    # Everything checkable without torch is checked first (options, output, --log-dir), so a mistake answers at
    # once; the trainer (torch, open_clip) is imported only for the run itself.
    from ..errors import TVToolError
    from ..fileio import check_output
    from ..trainconfig import TrainConfig

    if orthoreg is True and lam <= 0:
        raise TVToolError("--orthoreg needs --lambda > 0")
    if orthoreg is False:
        lam = 0.0
    cfg = TrainConfig(task=task, model=model, pretrained=pretrained, mode=mode, lam=lam, orthoreg_form=form,
                      orthoreg_scope=scope, orthoreg_estimator=estimator, orthoreg_probes=probes,
                      orthoreg_precision=orthoreg_precision, lr=lr,
                      weight_decay=weight_decay, warmup_steps=warmup, batch_size=batch_size, grad_accum=grad_accum,
                      epochs=epochs, max_steps=max_steps, lora_rank=lora_rank, lora_alpha=lora_alpha, seed=seed,
                      data_root=data_root, device=device, precision=precision,
                      compile=compile or compile_mode is not None,
                      compile_mode=compile_mode or D["compile_mode"], fsdp=fsdp,
                      eval=not no_eval, data_on_device=data_on_device,
                      checkpoint_every=checkpoint_every, checkpoint_dir=checkpoint_dir, log_every=log_every,
                      keep_checkpoints=keep_checkpoints)
    resolved = cfg.resolved()
    if output == STDOUT and (resume or (checkpoint_every and not checkpoint_dir)):
        raise TVToolError("-o - keeps no file beside which checkpoints could live; give -o FILE (or "
                          "--checkpoint-dir) to checkpoint or resume")
    if log_dir is not None:
        from ..tblog import check_available

        check_available()
    with destination(output, finetune_name(resolved)) as target:
        if not resume:
            check_output(target.path, force)  # refused before the trainer is imported
        from ..datasets.sources import check_available

        check_available(resolved.task, ("train", "val", "test") if resolved.eval else ("train",), resolved.data_root)
        announce(target)
        from ..train import finetune as run_finetune

        tb = None
        if log_dir is not None:
            from ..tblog import TensorBoardLog

            tb = TensorBoardLog(log_dir, Path(finetune_name(resolved) if target.to_stdout else target.path).stem)
        label = f"{resolved.task} ({resolved.mode}{', OrthoReg' if resolved.lam > 0 else ''})"
        try:
            with progress_reporter(quiet, label) as report:
                sinks = [s for s in (report, tb) if s is not None]
                result = run_finetune(cfg, target.path, force=force, resume=resume, log_path=log,
                                      progress=(lambda r: [s(r) for s in sinks]) if sinks else None)
            if tb is not None:
                import dataclasses

                tb.finish(result.metrics, dataclasses.asdict(resolved), result.steps)
        finally:
            if tb is not None:
                tb.close()
    m = result.metrics
    if m and not quiet:
        typer.echo(f"accuracy (%): zero-shot val {_pct(m.get('zeroshot_val_acc'))} test "
                   f"{_pct(m.get('zeroshot_test_acc'))} -> fine-tuned val {_pct(m.get('val_acc'))} "
                   f"test {_pct(m.get('test_acc'))}", err=True)
    wrote(target)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


class progress_reporter:
    """A rich progress bar fed by the trainer's per-log-step records (or nothing with --quiet)."""

    def __init__(self, quiet: bool, label: str):
        self.quiet, self.label = quiet, label
        self.bar = None
        self.task_id = None

    def __enter__(self):
        import sys

        if self.quiet:
            return None
        if not sys.stderr.isatty():  # a batch job's log gets plain lines, not a live bar
            from ..train import PlainProgress

            return PlainProgress(self.label)
        return self.update

    def update(self, r: dict) -> None:
        if self.bar is None:  # started at the first record, so set-up errors print alone
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                                TimeRemainingColumn(), console=Console(stderr=True))
            self.bar.__enter__()
            self.task_id = self.bar.add_task(self.label, total=r["total"], info="")
        info = (f"loss {r['task_loss']:.4f}  pen {r['penalty']:.4g}  lr {r['lr']:.2e}  "
                f"{r['images_per_s']:.0f} img/s")
        self.bar.update(self.task_id, completed=r["step"], total=r["total"], info=info)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="A YAML recipe (see recipes/ and `tvtool.recipes`)."),
    only_train: bool = typer.Option(False, "--only-train", help="Fine-tune only; skip the evaluation steps."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cpu (default: cuda if available)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Run a recipe: fine-tune every (variant, task), then evaluate; outputs made with the same settings are skipped.

    Example: tvtool run recipes/vit-b-32.yaml
    """
    from ..recipes import load_recipe, run_recipe

    r = load_recipe(recipe)  # validated before any work
    results = run_recipe(r, progress_factory=progress_reporter, quiet=quiet, device=device,
                         only_train=only_train, log=_logger(quiet))
    if results["variants"]:
        _print_results(results, r.out_dir)


@app.command()
def quickstart(
    size: str = typer.Option("full", "--size", help="full (the documented run) | ci (3 tasks, 8 steps)."),
    out_dir: Path = typer.Option(Path("runs/quickstart"), "--out-dir", help="Where vectors and results go."),
    modes: str = typer.Option("full", "--modes", help="full (FT vs FT + OrthoReg) | all (also attn, lora and "
                                                     "linear, each with and without OrthoReg; ~4x longer)."),
    device: Optional[str] = typer.Option(None, "--device", help="Default: cuda if available, else cpu."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON (accuracies in %) instead of the "
                                                       "table: {zeroshot: {abs_acc, ..}, variants: {ft: {abs_acc, "
                                                       "norm_acc, finetuned_acc, tar_acc, con_acc, cosine, ..}, ..}}."),
):
    """The built-in offline job: the 8 mini-world tasks fine-tuned with and without OrthoReg, then task addition,
    negation and cosine in a paper-style table (zero-shot row first).

    Runs on the bundled tiny CLIP: measured 2 min 46 s on a quiet 2-core VM (BENCHMARKS.md), longer on a busy one;
    --modes all takes several times longer. Reruns skip finished work made with the same settings. Vectors and JSON results go to --out-dir.
    It is the recipe recipes/mini.yaml.

    Example: tvtool quickstart --modes all --out-dir runs/qs
    """
    from ..errors import TVToolError
    from ..quickstart import quickstart_recipe
    from ..recipes import parse_recipe, run_recipe

    if size not in ("full", "ci"):
        raise TVToolError(f"--size {size!r}: use full or ci")
    if modes not in ("full", "all"):
        raise TVToolError(f"--modes {modes!r}: use full or all")
    r = parse_recipe(quickstart_recipe(size, out_dir, modes), f"quickstart ({size})")
    results = run_recipe(r, progress_factory=progress_reporter, quiet=quiet, device=device, log=_logger(quiet))
    if as_json:
        import json

        from ..quickstart import json_summary

        typer.echo(json.dumps(json_summary(results), indent=2))
        return
    _print_results(results, out_dir)


def _logger(quiet: bool):
    """Log lines of `run` / `quickstart` on stderr as plain text: never wrapped (a log file keeps one line per
    message) and never read as rich markup (a path may hold brackets)."""
    return (lambda m: None) if quiet else (lambda m: typer.echo(m, err=True))


def _print_results(results: dict, out_dir: Optional[Path] = None) -> None:
    from rich.table import Table

    from ..quickstart import summarize

    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}"

    variants = results["variants"].values()
    # only the steps the recipe ran: a recipe without negation gets no "neg. ok 0/0" column
    has_add = any(v.get("addition") for v in variants)
    has_neg = any(v.get("negation") for v in variants)
    has_cos = any(v.get("cosine") for v in variants)
    columns = ([("Abs.Acc", lambda r: pct(r["abs_acc"])), ("Norm.Acc", lambda r: pct(r["norm_acc"])),
                ("alpha", lambda r: "-" if r["alpha"] is None else f"{r['alpha']:.2f}")] if has_add else [])
    if has_neg:
        columns += [("Tar.Acc", lambda r: pct(r["tar_acc"])), ("Con.Acc", lambda r: pct(r["con_acc"])),
                    ("neg. ok", lambda r: r["negation_qualified"])]
    if has_cos:
        columns.append(("mean cos", lambda r: "-" if r["cosine"] is None else f"{r['cosine']:.4f}"))
    caption = []
    if has_neg:
        caption.append("neg. ok: tasks whose negation found an alpha keeping control Val accuracy >= threshold "
                       "(default 0.95) x zero-shot; Tar.Acc and Con.Acc average those tasks.")
    if has_cos:
        caption.append("mean cos: mean pairwise cosine of the task vectors.")
    t = Table(title="task arithmetic: test accuracy (%), alpha chosen on Val" + ("; Tar.Acc lower is better"
                                                                                  if has_neg else ""),
              caption=" ".join(caption) or None)
    t.add_column("variant", no_wrap=True)
    for col, _ in columns:
        t.add_column(col, justify="right", no_wrap=True)
    for row in summarize(results):
        t.add_row(row["variant"], *(cell(row) for _, cell in columns))
    from rich.console import Console

    Console(width=max(110, Console().width)).print(t)
    if out_dir is not None:
        typer.echo(f"results: {out_dir}/<variant>/ holds the task vectors (*.st) and addition.json / negation.json "
                   f"with every figure above")
