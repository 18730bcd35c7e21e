"""`tvtool eval ...`: accuracy, task addition, task negation and weight disentanglement (tvtool/evaluate.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..defaults import ALPHA_GRID, DISENTANGLEMENT_GRID
from ..errors import TVToolError
from ._app import app

# tvtool.evaluate (torch, open_clip) is imported inside each command, so `--help` starts instantly.

eval_app = typer.Typer(
    help=(
        "Evaluate task arithmetic on CLIP (PROTOCOL.md 'Evaluation'). Accuracies are shown in percent.\n\n"
        "Example: tvtool eval addition cars.st dtd.st eurosat.st --data-root ~/data\n\n"
        "  tvtool eval accuracy [VEC.st ...] [--alpha A] --tasks t1,t2 [--split test|val]\n\n"
        f"  tvtool eval addition VEC.st ... [--grid {ALPHA_GRID}]\n\n"
        "  tvtool eval negation VEC.st [--control imagenet] [--threshold 0.95]\n\n"
        f"  tvtool eval disentanglement A.st B.st [--grid {DISENTANGLEMENT_GRID}] [--plot map.png]\n\n"
        "  tvtool eval adamerging VEC.st ... [--layer-wise|--task-wise] [--steps 500] [-o merged.st]\n\n"
        "--model/--pretrained default to the base recorded in the vectors. Every command prints a table; --json "
        "prints the JSON result only (on stdout) and --json-out F also writes it to F. Each result records the model, "
        "base fingerprint, vectors (path + fingerprint), grid, splits and tvtool version."
    ),
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")

_MODEL = typer.Option(None, "--model", help="open_clip architecture (default: the vectors' recorded base).")
_PRETRAINED = typer.Option(None, "--pretrained", help="Tag, weights file or folder, or a hub id "
                                                             "ORG/NAME (default: the vectors' base).")
_DATA_ROOT = typer.Option(None, "--data-root", help="Data root of the real datasets (default $TVTOOL_DATA).")
_DEVICE = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available).")
_BATCH = typer.Option(256, "--batch-size", help="Evaluation batch size.")
_MAX = typer.Option(None, "--max-examples", help="Use only the first N examples of each split (quick looks; the "
                                                 "protocol's figures use whole splits).")
_JSON = typer.Option(False, "--json", help="Print the JSON result only, on stdout.")
_ON_DEVICE = typer.Option("auto", "--data-on-device", help="auto | yes | no: hold each split's images on the device "
                                                           "(auto: when they fit its memory budget) or stream them "
                                                           "from the cache in batches; the results are the same.")
_LINEAR = typer.Option(None, "--linearized/--no-linearized",
                       help="Evaluate the tangent model f(theta_0) + J (theta - theta_0) (default: when every vector "
                            "comes from --mode linear fine-tuning, as in tangent task arithmetic).")
_JSON_OUT = typer.Option(None, "--json-out", help="Also write the JSON result to this file.")
_FORCE = typer.Option(False, "--force", help="Overwrite --json-out / --plot files that exist.")


def _setup(paths, model, pretrained, tasks, splits, data_root, device, batch_size, outputs=(), force=False,
           max_examples=None, linearized=None, data_on_device="auto"):
    from .. import evaluate as ev
    from ..models import load_clip
    from ..taskvector import check_output

    for out in outputs:
        if out is not None:
            check_output(out, force)  # refuse an existing output before the long computation, not after

    vectors = ev.open_vectors(paths) if paths else []
    if tasks is None:
        tasks = list(dict.fromkeys(t for v in vectors for t in v.tasks))
    # one rule for every command: the base the vectors record, else the tasks' family default model
    rec_model, rec_pre = ev.recorded_base(vectors)
    from ..trainconfig import default_weights

    fam_model, fam_pre = default_weights(tasks)
    model = model or rec_model or fam_model
    if pretrained is None:
        pretrained = rec_pre if model == rec_model else fam_pre if model == fam_model else None
    from ..datasets.sources import check_available
    from ..feed import check_placement

    check_placement(data_on_device)

    for task in tasks:  # every task's data, before the model is built
        check_available(task, splits, data_root)
    bundle = load_clip(model, pretrained, device=device)
    ev.check_base(vectors, bundle)
    return vectors, ev.Evaluator(bundle, tasks, data_root=data_root, splits=splits, device=device,
                                 batch_size=batch_size, max_examples=max_examples,
                                 linearized=ev.wants_linearized(vectors, linearized), data_on_device=data_on_device)


def _progress(line: str) -> None:
    """Evaluation progress (per task and alpha point) as plain lines on stderr: stdout stays clean for --json."""
    typer.echo(line, err=True)


def _emit(result: dict, as_json: bool, json_out: Optional[Path], force: bool, table) -> None:
    from .. import evaluate as ev

    if json_out is not None:
        ev.write_json(result, json_out, force=force)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console

    console = Console()
    table(console)
    if json_out is not None:
        console.print(f"JSON written to {json_out}")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _table(title: str, columns: list[str]):
    from rich.table import Table

    t = Table(title=title)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    return t


def _tasks_option(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    if not text.replace(",", "").strip():
        raise TVToolError("--tasks is empty; pass a comma-separated list like mini-shapes,mini-colors or a suite (ta8)")
    from ..datasets import resolve_tasks

    return resolve_tasks(text)  # expands ta8 / ta14 / ta20 and checks every name


@eval_app.command("accuracy", help="Accuracy of theta_0 + alpha * sum(vectors) on each task (zero-shot without "
                                   "vectors).\n\nExample: tvtool eval accuracy a.st b.st --alpha 0.3")
def accuracy_cmd(
    vectors: Optional[List[Path]] = typer.Argument(None, help="Task-vector files (none: the zero-shot model)."),
    alpha: float = typer.Option(1.0, "--alpha", help="Scaling coefficient of the summed vectors."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated tasks or a suite: ta8, ta14, ta20 (default: the vectors' tasks)."),
    split: str = typer.Option("test", "--split", help="test or val."),
    model: Optional[str] = _MODEL, pretrained: Optional[str] = _PRETRAINED, data_root: Optional[Path] = _DATA_ROOT,
    device: Optional[str] = _DEVICE, batch_size: int = _BATCH, max_examples: Optional[int] = _MAX,
    data_on_device: str = _ON_DEVICE, as_json: bool = _JSON,
    linearized: Optional[bool] = _LINEAR,
    json_out: Optional[Path] = _JSON_OUT, force: bool = _FORCE,
):
    from .. import evaluate as ev

    if split not in ("test", "val"):
        raise TVToolError(f"--split must be test or val, got {split!r}")
    from ..checks import check_alpha

    alpha = check_alpha("--alpha", alpha)  # before any model is loaded
    vecs, evaluator = _setup(vectors, model, pretrained, _tasks_option(tasks), [split], data_root, device, batch_size,
                             (json_out,), force, max_examples, linearized, data_on_device)
    result = ev.eval_accuracy(evaluator, vecs, alpha, evaluator.tasks, split, progress=_progress)

    def table(console):
        t = _table(f"accuracy (%) on {split}, alpha={alpha:g}, {len(vecs)} vector(s)", ["task", "accuracy"])
        for task, a in result["accuracy"].items():
            t.add_row(task, _pct(a))
        t.add_row("mean", _pct(result["mean_accuracy"]))
        console.print(t)

    _emit(result, as_json, json_out, force, table)


@eval_app.command("addition", help="Task addition: alpha from --grid chosen on the Val splits by mean normalized "
                                   "accuracy (ties: smallest alpha), then test Abs.Acc and Norm.Acc.\n\n"
                                   f"Example: tvtool eval addition cars.st dtd.st eurosat.st --grid {ALPHA_GRID}")
def addition_cmd(
    vectors: List[Path] = typer.Argument(..., help="One single-task vector per task."),
    grid: Optional[str] = typer.Option(None, "--grid", help="START:STOP:STEP (inclusive) or a list 0,0.3,0.5 "
                                       f"(default: {ALPHA_GRID}, the protocol's; with --merged, the merge method's own "
                                       "grid from its paper, see `tvtool merge --list`)."),
    merged: Optional[Path] = typer.Option(None, "--merged", help="A vector made by `tvtool merge` from VECTORS: the "
                                                               "alpha search scales it instead of their sum."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="BASE.st,... one vector per task (e.g. plain "
                                           "fine-tuning of the same tasks): also report Norm.Acc over THEIR "
                                           "single-task accuracies, a denominator that is the same for every method "
                                           "compared (the paper's Norm.Acc uses each method's own)."),
    model: Optional[str] = _MODEL, pretrained: Optional[str] = _PRETRAINED, data_root: Optional[Path] = _DATA_ROOT,
    device: Optional[str] = _DEVICE, batch_size: int = _BATCH, max_examples: Optional[int] = _MAX,
    data_on_device: str = _ON_DEVICE, as_json: bool = _JSON,
    linearized: Optional[bool] = _LINEAR,
    json_out: Optional[Path] = _JSON_OUT, force: bool = _FORCE,
):
    from .. import evaluate as ev

    g = ev.parse_grid(grid) if grid is not None else None
    base_paths = None
    if baseline is not None:
        base_paths = [Path(p.strip()) for p in baseline.split(",") if p.strip()]
        if not base_paths:
            raise TVToolError("--baseline is empty; pass the baseline's vectors as BASE1.st,BASE2.st,...")
        base_vecs = ev.open_vectors(base_paths)  # before the model loads: a missing file fails at once
        own = ev.open_vectors(vectors)
        tasks = sorted(ev.vector_task(v) for v in own)
        if sorted(ev.vector_task(b) for b in base_vecs) != tasks:
            raise TVToolError(f"--baseline: its vectors are for tasks {sorted(ev.vector_task(b) for b in base_vecs)}, "
                              f"VECTORS for {tasks}; pass one baseline vector per task")
        try:  # the baseline's single-task accuracies are measured on the model VECTORS are evaluated on
            same_model = ev.wants_linearized(base_vecs, linearized) == ev.wants_linearized(own, linearized)
        except TVToolError:
            same_model = False
        if not same_model:
            raise TVToolError("--baseline vectors call for another model than VECTORS (tangent vs ordinary: "
                              "linear-mode fine-tuning vs the others); pass a baseline of the same fine-tuning "
                              "mode, or --linearized / --no-linearized to measure both on one model")
    vecs, evaluator = _setup(vectors, model, pretrained, None, ["val", "test"], data_root, device, batch_size,
                             (json_out,), force, max_examples, linearized, data_on_device)
    merged_vec = ev.open_vectors([merged])[0] if merged is not None else None
    if merged_vec is not None:
        ev.check_base([merged_vec], evaluator.bundle)
    if base_paths is not None:
        ev.check_base(base_vecs, evaluator.bundle)
    if g is None:
        g = list(ev.DEFAULT_GRID)
        from ..merge import alpha_grid, get_method, merged_method

        method = merged_method(merged_vec.meta) if merged_vec is not None else None
        if method is not None:
            g = alpha_grid(method)
            _progress(f"addition: alpha grid {get_method(method).alpha_grid} ({method}'s default: "
                      f"{get_method(method).alpha_source})")
    result = ev.addition(evaluator, vecs, g, merged=merged_vec, baseline=base_vecs if base_paths else None,
                         progress=_progress)

    def table(console):
        base = result.get("baseline")
        t = _table(f"task addition, alpha={result['alpha']:g} (chosen on val)",
                   ["task", "test acc", "fine-tuned", "normalized"]
                   + (["baseline fine-tuned", "vs baseline"] if base else []))
        for task in result["tasks"]:
            t.add_row(task, _pct(result["test_acc"][task]), _pct(result["finetuned_acc"]["test"][task]),
                      _pct(result["test_norm_acc"][task]),
                      *([_pct(base["finetuned_acc"]["test"][task]), _pct(base["test_norm_acc"][task])] if base else []))
        t.add_row("mean: Abs.Acc / single-task / Norm.Acc", _pct(result["abs_acc"]), _pct(result["finetuned_mean_acc"]),
                  _pct(result["norm_acc"]),
                  *([_pct(base["finetuned_mean_acc"]), _pct(result["norm_acc_vs_baseline"])] if base else []))
        console.print(t)
        if base:
            console.print("Norm.Acc divides by these vectors' own single-task accuracies (the paper's); \"vs "
                          "baseline\" by the baseline's, the same denominator for every method compared.")
        c = _table("alpha grid (val)", ["alpha", "mean acc", "mean norm acc"])
        for p in result["curve"]:
            mark = " *" if p["alpha"] == result["alpha"] else ""
            c.add_row(f"{p['alpha']:g}{mark}", _pct(p["mean_val_acc"]), _pct(p["mean_val_norm_acc"]))
        console.print(c)

    _emit(result, as_json, json_out, force, table)


@eval_app.command("negation", help="Task negation theta_0 - alpha*tau: alpha minimizing target Val accuracy while "
                                   "control Val accuracy >= threshold x zero-shot; reports Tar.Acc and Con.Acc.\n\n"
                                   "Example: tvtool eval negation mnist.st --control imagenet --data-root ~/data")
def negation_cmd(
    vector: Path = typer.Argument(..., help="The single-task vector to negate."),
    control: Optional[str] = typer.Option(None, "--control", help="Control task (default: imagenet, or "
                                                                  "mini-control for mini tasks)."),
    threshold: Optional[float] = typer.Option(None, "--threshold",
                                              help="Control accuracy must stay >= threshold x zero-shot (default: "
                                                   "the protocol's 0.95)."),
    grid: str = typer.Option(ALPHA_GRID, "--grid", help="START:STOP:STEP (inclusive) or a list."),
    model: Optional[str] = _MODEL, pretrained: Optional[str] = _PRETRAINED, data_root: Optional[Path] = _DATA_ROOT,
    device: Optional[str] = _DEVICE, batch_size: int = _BATCH, max_examples: Optional[int] = _MAX,
    data_on_device: str = _ON_DEVICE, as_json: bool = _JSON,
    linearized: Optional[bool] = _LINEAR,
    json_out: Optional[Path] = _JSON_OUT, force: bool = _FORCE,
):
    from .. import evaluate as ev

    g = ev.parse_grid(grid)
    from ..checks import check_finite

    if threshold is None:
        threshold = ev.DEFAULT_THRESHOLD
    check_finite("--threshold", threshold, low=0, low_open=True)  # before any model is loaded
    opened = ev.open_vectors([vector])[0]
    ev.check_not_negated(opened)
    _check_control(control or ev.default_control(ev.vector_task(opened)), data_root)
    vecs, evaluator = _setup([vector], model, pretrained, None, ["val", "test"], data_root, device, batch_size,
                             (json_out,), force, max_examples, linearized, data_on_device)
    result = ev.negation(evaluator, vecs[0], control, g, threshold=threshold, progress=_progress)

    def table(console):
        alpha = "none" if result["alpha"] is None else f"{result['alpha']:g}"
        t = _table(f"task negation, test accuracy (%); alpha={alpha} chosen on Val, where control accuracy must stay "
                   f">= {result['threshold']:g} x zero-shot", ["", f"Tar.Acc ({result['target']})",
                                                               f"Con.Acc ({result['control']})"])
        zs = result["zeroshot"]
        t.add_row("zero-shot", _pct(zs["target_test_acc"]), _pct(zs["control_test_acc"]))
        t.add_row("negated", _pct(result["tar_acc"]), _pct(result["con_acc"]))
        console.print(t)
        if result["alpha"] is None:
            console.print(result["message"])

    _emit(result, as_json, json_out, force, table)


def _check_control(control: str, data_root) -> None:
    """Negation's default control (ImageNet) needs data of its own: say so, naming --control, before any work."""
    from ..datasets import get_dataset
    from ..datasets.base import resolve_data_root
    from .data import check_dataset

    if not get_dataset(control).needs_data_root:
        return
    try:
        problems = check_dataset(control, resolve_data_root(data_root, name=control))["problems"]
    except TVToolError as exc:
        problems = [str(exc)]
    if problems:
        raise TVToolError(f"negation measures the control task {control!r}, whose data is missing ({'; '.join(problems)}); "
                          f"get it (`tvtool data check {control}` says how) or pass --control TASK with a task you have")


@eval_app.command("disentanglement", help="Weight-disentanglement error xi(a1, a2) of two task vectors over a grid "
                                          "(JSON + heat-map PNG with --plot).\n\n"
                                          f"Example: tvtool eval disentanglement cars.st dtd.st "
                                          f"--grid={DISENTANGLEMENT_GRID} --plot xi.png")
def disentanglement_cmd(
    a: Path = typer.Argument(..., help="Vector of task 1."),
    b: Path = typer.Argument(..., help="Vector of task 2."),
    grid: str = typer.Option(DISENTANGLEMENT_GRID, "--grid", help="Alpha grid for both axes (START:STOP:STEP or a "
                                                                  f"list); write --grid={DISENTANGLEMENT_GRID} for "
                                                                  "negative starts."),
    split: str = typer.Option("test", "--split", help="test or val."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the heat-map PNG here."),
    model: Optional[str] = _MODEL, pretrained: Optional[str] = _PRETRAINED, data_root: Optional[Path] = _DATA_ROOT,
    device: Optional[str] = _DEVICE, batch_size: int = _BATCH, max_examples: Optional[int] = _MAX,
    data_on_device: str = _ON_DEVICE, as_json: bool = _JSON,
    linearized: Optional[bool] = _LINEAR,
    json_out: Optional[Path] = _JSON_OUT, force: bool = _FORCE,
):
    from .. import evaluate as ev

    g = ev.parse_grid(grid)
    vecs, evaluator = _setup([a, b], model, pretrained, None, [split], data_root, device, batch_size,
                             (json_out, plot), force, max_examples, linearized, data_on_device)
    result = ev.disentanglement(evaluator, vecs[0], vecs[1], g, split=split, progress=_progress)
    if plot is not None:
        ev.plot_disentanglement(result, plot, force=force)
        result["plot"] = str(plot)

    def table(console):
        t1, t2 = result["tasks"]
        t = _table(f"disentanglement error xi\nrows a1: {t1}, columns a2: {t2}",
                   ["a1 \\ a2"] + [f"{x:g}" for x in result["grid"]["alpha2"]])
        for a1, row in zip(result["grid"]["alpha1"], result["error"]):
            t.add_row(f"{a1:g}", *[f"{x:.3f}" for x in row])
        console.print(t)
        if plot is not None:
            console.print(f"heat-map written to {plot}")

    _emit(result, as_json, json_out, force, table)


@eval_app.command("adamerging", help="AdaMerging (Yang et al., ICLR 2024): per-task (--task-wise) or per-task-and-"
                                     "tensor (--layer-wise) coefficients learned by minimizing the entropy of the "
                                     "merged model's predictions on the tasks' unlabeled test images; writes the "
                                     "merged vector sum_t lambda_t tau_t (-o) and reports its test Abs.Acc and "
                                     "Norm.Acc. Defaults are the authors' (`tvtool merge --list`).\n\n"
                                     "Example: tvtool eval adamerging cars.st dtd.st eurosat.st -o ada.st")
def adamerging_cmd(
    vectors: List[Path] = typer.Argument(..., help="One single-task vector per task."),
    layer_wise: bool = typer.Option(True, "--layer-wise/--task-wise", help="One coefficient per task and tensor "
                                                                           "(default), or one per task."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Adam steps (default 500, the paper's)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate (default 1e-3)."),
    init: Optional[float] = typer.Option(None, "--init", help="Initial coefficient (default 0.3, the paper's prior)."),
    clamp: Optional[bool] = typer.Option(None, "--clamp/--no-clamp", help="Clip the coefficients to [0, 1] in the "
                                         "forward (default: yes, the authors' code; FusionBench's CLIP config: no)."),
    adapt_batch_size: Optional[int] = typer.Option(None, "--adapt-batch-size", help="Unlabeled test images of each "
                                                   "task per step (default 16)."),
    entropy_eps: Optional[float] = typer.Option(None, "--entropy-eps", help="Entropy as -sum p log(p + eps) (default "
                                                "0, exact; FusionBench: 1e-8)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the order of the test images (default 0)."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Where to write the merged vector; refused "
                                         "if it exists (see --force). Without -o: adamerging-layer-A+B.st (or "
                                         "-task-) in the current directory."),
    model: Optional[str] = _MODEL, pretrained: Optional[str] = _PRETRAINED, data_root: Optional[Path] = _DATA_ROOT,
    device: Optional[str] = _DEVICE, batch_size: int = _BATCH, max_examples: Optional[int] = _MAX,
    data_on_device: str = _ON_DEVICE, as_json: bool = _JSON,
    json_out: Optional[Path] = _JSON_OUT,
    force: bool = typer.Option(False, "--force", help="Overwrite the merged vector and --json-out files that exist."),
):
    from .. import adamerging as ada
    from .. import evaluate as ev
    from ._output import merge_name, wrote, destination

    given = {"granularity": "layer" if layer_wise else "task", "steps": steps, "lr": lr, "init": init,
             "clamp": clamp, "batch_size": adapt_batch_size, "eps": entropy_eps, "seed": seed}
    flags = {"steps": "--steps", "lr": "--lr", "init": "--init", "batch_size": "--adapt-batch-size",
             "eps": "--entropy-eps", "seed": "--seed"}
    options = ada.resolve({k: v for k, v in given.items() if v is not None}, flags)  # before any model loads
    if output == "-":
        raise TVToolError("-o -: stdout carries this command's table or JSON; give -o FILE for the merged vector")
    opened = ev.open_vectors(vectors)
    if any((v.meta.get("mode") or "full") == "linear" for v in opened):
        raise TVToolError("adamerging merges ordinary task vectors; linear-mode (tangent) vectors are not supported")
    with destination(output, merge_name(f"adamerging-{options['granularity']}", vectors, 1.0)) as target:
        vecs, evaluator = _setup(vectors, model, pretrained, None, ["test"], data_root, device, batch_size,
                                 (target.path, json_out), force, max_examples, False, data_on_device)
        result = ada.adamerging(evaluator, vecs, options, target.path, force=force, progress=_progress)
    wrote(target, result["fingerprint"])

    def table(console):
        t = _table(f"AdaMerging ({options['granularity']}-wise, {options['steps']} steps), test accuracy (%)",
                   ["task", "test acc", "fine-tuned", "normalized", "lambda mean"])
        values = result["lambdas"]["values"]
        for task in result["tasks"]:
            lam = values[task] if isinstance(values[task], float) else sum(values[task].values()) / len(values[task])
            t.add_row(task, _pct(result["test_acc"][task]), _pct(result["finetuned_acc"]["test"][task]),
                      _pct(result["test_norm_acc"][task]), f"{lam:.4f}")
        t.add_row("mean: Abs.Acc / single-task / Norm.Acc", _pct(result["abs_acc"]), _pct(result["finetuned_mean_acc"]),
                  _pct(result["norm_acc"]), "")
        console.print(t)
        e = result["entropy"]
        console.print(f"entropy (sum over tasks, mean over each test split): {e['init_sum']:.4f} at init -> "
                      f"{e['final_sum']:.4f} learned")

    _emit(result, as_json, json_out, force, table)
