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
    model: Optional[str] = _MODEL, pretrained: Optional[str] = _PRETRAINED, data_root: Optional[Path] = _DATA_ROOT,
    device: Optional[str] = _DEVICE, batch_size: int = _BATCH, max_examples: Optional[int] = _MAX,
    data_on_device: str = _ON_DEVICE, as_json: bool = _JSON,
    linearized: Optional[bool] = _LINEAR,
    json_out: Optional[Path] = _JSON_OUT, force: bool = _FORCE,
):
    from .. import evaluate as ev

    g = ev.parse_grid(grid) if grid is not None else None
    vecs, evaluator = _setup(vectors, model, pretrained, None, ["val", "test"], data_root, device, batch_size,
                             (json_out,), force, max_examples, linearized, data_on_device)
    merged_vec = ev.open_vectors([merged])[0] if merged is not None else None
    if merged_vec is not None:
        ev.check_base([merged_vec], evaluator.bundle)
    if g is None:
        g = list(ev.DEFAULT_GRID)
        from ..merge import alpha_grid, get_method, merged_method

        method = merged_method(merged_vec.meta) if merged_vec is not None else None
        if method is not None:
            g = alpha_grid(method)
            _progress(f"addition: alpha grid {get_method(method).alpha_grid} ({method}'s default: "
                      f"{get_method(method).alpha_source})")
    result = ev.addition(evaluator, vecs, g, merged=merged_vec, progress=_progress)

    def table(console):
        t = _table(f"task addition, alpha={result['alpha']:g} (chosen on val)",
                   ["task", "test acc", "fine-tuned", "normalized"])
        for task in result["tasks"]:
            t.add_row(task, _pct(result["test_acc"][task]), _pct(result["finetuned_acc"]["test"][task]),
                      _pct(result["test_norm_acc"][task]))
        t.add_row("Abs.Acc / Norm.Acc", _pct(result["abs_acc"]), "", _pct(result["norm_acc"]))
        console.print(t)
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
