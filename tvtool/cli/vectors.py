"""Commands on task-vector files: extract, add, negate, apply, inspect."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import TVToolError
from ._app import app
from ._output import add_name, apply_name, destination, extract_name, negate_name, output_option, wrote

# The API modules (torch) are imported inside each command, so `--help` and `--version` start instantly.

force_opt = typer.Option(False, "--force", help="Overwrite the output if it exists.")
dtype_opt = typer.Option(None, "--dtype", help="Output dtype: fp32, bf16 or fp16 (default: keep the inputs' dtype).")
union_opt = typer.Option(False, "--union", help="Allow inputs with different tensor sets; missing tensors count as 0.")
pickle_opt = typer.Option(False, "--trust-pickle",
                          help="Fully unpickle a .pt/.bin checkpoint that the safe reader refuses (runs code from "
                               "the file; only for sources you trust). Not needed for ordinary checkpoints.")


PRETRAINED_HELP = ("Pre-trained weights theta_0: ARCH[:TAG] (e.g. ViT-B-32:openai), a safetensors state dict, an "
                   "open_clip or transformers CLIP folder, a transformers model's hub id ORG/NAME[@REV] (from the "
                   "Hugging Face cache, or downloaded), or a torch checkpoint (docs/CHECKPOINTS.md).")
# --base was this option's old name; kept, hidden, so existing scripts keep working (one name: the one
# finetune and eval use).
base_alias_opt = typer.Option(None, "--base", hidden=True, help="Old name of --pretrained.")


def _pretrained_spec(ctx: typer.Context, pretrained: Optional[str], base: Optional[str]) -> str:
    if pretrained is not None and base is not None and pretrained != base:
        ctx.fail("--base is the old name of --pretrained; give only one of them.")
    spec = pretrained if pretrained is not None else base
    if spec is None:
        ctx.fail("Missing option '--pretrained'.")
    return spec


def _parse_weights(text: str, n: int) -> list[float]:
    try:
        weights = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TVToolError(f"--weights {text!r}: expected comma-separated numbers, e.g. 0.3,0.5") from None
    if len(weights) != n:
        raise TVToolError(f"--weights has {len(weights)} values for {n} vectors; give one per input")
    return weights


@app.command()
def extract(
    ctx: typer.Context,
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help=PRETRAINED_HELP + " Required."),
    finetuned: str = typer.Option(..., "--finetuned", help="Fine-tuned weights, in any form --pretrained "
                                                                  "accepts, or a PEFT LoRA adapter folder (merged onto "
                                                                  "--pretrained)."),
    output: Optional[str] = output_option("the task vector", "TASK.st (--task), else the fine-tuned file's name "
                                          "with .st"),
    keep_all: bool = typer.Option(False, "--all", help="Store every shared tensor, not only those that differ."),
    task: Optional[str] = typer.Option(None, "--task", help="Task name recorded in the metadata."),
    mode: Optional[str] = typer.Option(None, "--mode", help="Fine-tuning mode recorded in the metadata."),
    model: Optional[str] = typer.Option(None, "--model", help="open_clip architecture of the base, recorded for "
                                        "`eval` (default: read from the base, or inferred from its shapes)."),
    trust_pickle: bool = pickle_opt,
    dtype: Optional[str] = dtype_opt,
    force: bool = force_opt,
    base: Optional[str] = base_alias_opt,
):
    """Take the task vector tau = finetuned - pretrained and write it with its provenance.

    Example: tvtool extract --pretrained ViT-B-32:openai --finetuned cars_ft.safetensors --task cars
    """
    from .. import taskvector

    base = _pretrained_spec(ctx, pretrained, base)
    if task:
        from ..datasets.base import canonical_task

        task = canonical_task(task)  # FusionBench's stanford-cars is recorded as tvtool's cars
    with destination(output, extract_name(finetuned, task)) as target:
        fp = taskvector.extract(base, finetuned, target.path, keep_all=keep_all, trust_pickle=trust_pickle,
                                dtype=dtype, tasks=[task] if task else [], mode=mode,
                                force=force, model=model)
        unknown_arch = not taskvector.open_vector(target.path).meta["base"].get("model")
    wrote(target, fp)
    if unknown_arch:
        typer.echo("note: the base's architecture could not be told from its weights (QuickGELU twins and custom "
                   "configs look alike); pass --model to record it, or give `eval` --model", err=True)


@app.command()
def add(
    vectors: List[Path] = typer.Argument(..., help="Task-vector files to add."),
    output: Optional[str] = output_option("the sum", "A+B-alphaX.st (A+B.st when alpha is 1; A+B-weightsX_Y.st with --weights)"),
    alpha: float = typer.Option(1.0, "--alpha", help="Scaling coefficient applied to the sum."),
    weights: Optional[str] = typer.Option(None, "--weights", help="One coefficient per input instead of --alpha, "
                                                                  "e.g. 0.3,0.5."),
    union: bool = union_opt,
    dtype: Optional[str] = dtype_opt,
    force: bool = force_opt,
):
    """Task addition: output = alpha * (a + b + ...), or sum of weights[i] * input[i].

    Example: tvtool add a.st b.st --alpha 0.3   (writes a+b-alpha0.3.st; -o ab.st or -o - to choose)
    """
    from .. import taskvector

    w = _parse_weights(weights, len(vectors)) if weights else None
    with destination(output, add_name(vectors, alpha, w)) as target:
        fp = taskvector.add(vectors, target.path, alpha=alpha, weights=w, dtype=dtype, force=force,
                            union=union)
    wrote(target, fp)


@app.command()
def negate(
    vector: Path = typer.Argument(..., help="Task-vector file to negate."),
    output: Optional[str] = output_option("the negated vector", "not_A-alphaX.st (not_A.st when alpha is 1)"),
    alpha: float = typer.Option(1.0, "--alpha", help="Output = -alpha * input."),
    dtype: Optional[str] = dtype_opt,
    force: bool = force_opt,
):
    """Task negation: output = -alpha * vector (apply it to forget the task).

    Example: tvtool negate a.st -o not_a.st
    """
    from .. import taskvector

    with destination(output, negate_name(vector, alpha)) as target:
        fp = taskvector.negate(vector, target.path, alpha=alpha, dtype=dtype, force=force)
    wrote(target, fp)


@app.command()
def apply(
    ctx: typer.Context,
    vectors: List[Path] = typer.Argument(..., help="Task-vector files (summed)."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help=PRETRAINED_HELP + " Default: the base the "
                                             "vectors record, else the tasks' default model (tvtool-mini:builtin "
                                             "for mini tasks, ViT-B-32:openai otherwise)."),
    output: Optional[str] = output_option("the model", "A+B-alphaX-model.safetensors (A+B-model.safetensors when "
                                          "alpha is 1; a folder A+B-alphaX-model onto a transformers base)"),
    alpha: float = typer.Option(1.0, "--alpha", help="Model = pretrained + alpha * sum(vectors)."),
    check_base: bool = typer.Option(True, "--check-base/--no-check-base",
                                    help="Refuse vectors whose recorded base fingerprint differs from --pretrained."),
    nonlinear: bool = typer.Option(False, "--nonlinear",
                                   help="Vectors from --mode linear (tangent) fine-tuning are refused: eval measures "
                                        "them on the tangent model f(theta_0) + J tau, which no plain weights hold. "
                                        "With this flag the file is written anyway and holds the ordinary "
                                        "(non-linear) model theta_0 + alpha * tau, a different and usually much "
                                        "worse model."),
    trust_pickle: bool = pickle_opt,
    dtype: Optional[str] = dtype_opt,
    force: bool = force_opt,
    base: Optional[str] = base_alias_opt,
):
    """Write pretrained + alpha * sum(vectors) as a model state dict (safetensors) that open_clip can load; onto a
    transformers CLIP folder, a transformers folder of the same kind with a model card (README.md).

    Example: tvtool apply a+b-alpha0.3.st -o model.safetensors   (onto the base the vector records)
    """
    from .. import taskvector
    from ..checkpoints import open_weights
    from ..trainconfig import default_weights

    if pretrained is not None and base is not None and pretrained != base:
        ctx.fail("--base is the old name of --pretrained; give only one of them.")
    spec = pretrained if pretrained is not None else base
    vecs = [taskvector.open_vector(p) for p in vectors]  # a wrong path fails before any base is loaded
    if spec is None:
        spec = taskvector.recorded_base_spec(vecs)
        how = "recorded in the vectors"
        if spec is None:
            spec, how = ":".join(default_weights([t for v in vecs for t in v.tasks])), "the tasks' default model"
        typer.echo(f"base: {spec} ({how}; --pretrained chooses another)", err=True)
    base_src = open_weights(spec, trust_pickle=trust_pickle)
    folder = base_src.config.transformers is not None  # onto a transformers base: a transformers folder
    with destination(output, apply_name(vectors, alpha, folder), directory=folder) as target:
        taskvector.apply(base_src, vectors, target.path, alpha=alpha, trust_pickle=trust_pickle,
                         check_base=check_base, force=force, dtype=dtype, nonlinear=nonlinear)
    wrote(target)


@app.command()
def inspect(
    vectors: Optional[List[Path]] = typer.Argument(None, help="Task-vector files (default: the *.st files in the "
                                                               "current directory, in name order)."),
    cosine: bool = typer.Option(False, "--cosine", help="Pairwise cosine similarity of the flattened vectors."),
    per_layer: bool = typer.Option(False, "--per-layer", help="With --cosine: break the similarity down by tensor."),
    ortho: bool = typer.Option(False, "--ortho", help="Per 2-D tensor: angles between the update's columns (mean "
                                                      "|angle - 90 deg|) and the sign-conflict rate between vectors."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="With --cosine: draw the heat-map to this PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout and nothing else."),
    force: bool = force_opt,
):
    """Summarize task vectors, or compare them: how orthogonal are they?

    Without files it takes the task vectors (*.st) in the current directory and says which, in order.

    Examples: tvtool inspect --cosine;  tvtool inspect cars.st;  tvtool inspect --cosine a.st b.st --plot cos.png;
    tvtool inspect --ortho a.st
    """
    from rich.console import Console
    from rich.table import Table

    from .. import inspection, taskvector

    if not vectors:
        vectors = _vectors_here(2 if (cosine or per_layer) else 1)
    console = Console()
    if plot is not None:  # checked before the (possibly long) comparison
        if not cosine:
            raise TVToolError("--plot draws the cosine heat-map: add --cosine")
        if plot.suffix.lower() not in (".png", ".pdf", ".svg"):
            raise TVToolError(f"--plot {plot}: use a .png, .pdf or .svg file name")
        taskvector.check_output(plot, force)
    if not (cosine or per_layer or ortho):
        results = [inspection.summary(v) for v in vectors]
        if as_json:
            typer.echo(json.dumps(results if len(results) > 1 else results[0], indent=1))
            return
        for r in results:
            _print_summary(console, r)
        return
    res = inspection.compare(vectors, per_layer=per_layer, ortho=ortho)
    if plot is not None:
        inspection.plot_heatmap(res["cosine"], [Path(p).stem for p in res["vectors"]], plot, force=force)
    if as_json:
        typer.echo(json.dumps(res))
        return
    names = [Path(p).stem for p in res["vectors"]]
    _print_matrix(console, "cosine similarity", names, res["cosine"])
    mean = inspection.mean_offdiagonal(res["cosine"])
    if mean is not None:
        console.print(f"mean off-diagonal cosine: {mean:.4f}")
    if per_layer:
        t = Table(title="per-tensor cosine (mean off-diagonal)")
        t.add_column("tensor")
        t.add_column("shape")
        t.add_column("mean cos", justify="right")
        for row in res["per_layer"]:
            m = inspection.mean_offdiagonal(row["cosine"])
            t.add_row(row["tensor"], "x".join(map(str, row["shape"])), "-" if m is None else f"{m:.4f}")
        console.print(t)
    if ortho:
        t = Table(title="column orthogonality of each update: mean |angle - 90 deg| (lower = more orthogonal)")
        t.add_column("tensor")
        for n in names:
            t.add_column(n, justify="right")
        for row in res["ortho"]:
            t.add_row(row["tensor"], *["-" if s is None else f"{s['mean_abs_dev_deg']:.2f}" for s in row["per_vector"]])
        t.add_row("[b]mean[/b]", *["-" if m is None else f"[b]{m:.2f}[/b]" for m in res["ortho_mean_abs_dev_deg"]])
        console.print(t)
        if "sign_conflict" in res:
            _print_matrix(console, "sign-conflict rate (entries nonzero in both)", names, res["sign_conflict"])
    if plot is not None:
        console.print(f"wrote {plot}")


def _vectors_here(at_least: int) -> list[Path]:
    """The task vectors (readable *.st files) of the current directory in name order, said on stderr."""
    from ..taskvector import open_vector

    found = []
    for p in sorted(p for p in Path(".").glob("*.st") if p.is_file()):
        try:
            open_vector(p).close()
            found.append(p)
        except TVToolError as exc:
            typer.echo(f"skipped {p.name}: not a readable task vector ({exc})", err=True)
    if len(found) < at_least:
        raise TVToolError(f"no task vectors given and {len(found)} *.st file(s) in {Path.cwd()}; pass the files "
                          f"to inspect" + (" (--cosine compares two or more)" if at_least > 1 else ""))
    typer.echo(f"task vectors in {Path.cwd()}, in this order: {', '.join(p.name for p in found)}", err=True)
    return found


def _print_matrix(console, title: str, names: list[str], m) -> None:
    from rich.table import Table

    t = Table(title=title)
    t.add_column("")
    for n in names:
        t.add_column(n, justify="right")
    for n, row in zip(names, m):
        t.add_row(n, *[f"{x:.4f}" for x in row])
    console.print(t)


def _text(value) -> str:
    """Human output never shows Python's None."""
    return "-" if value is None else str(value)


def _without_none(value):
    """A copy of nested dicts and lists without None entries: unknown fields are omitted, not shown as null."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value if v is not None]
    return value


def _metric(name: str, value) -> str:
    """Accuracies (stored as fractions) in percent, like every other human-readable table."""
    if value is None:
        return "-"
    if name.endswith("acc") and isinstance(value, (int, float)):
        return f"{100 * value:.2f}%"
    return value if isinstance(value, str) else json.dumps(value)


def _print_summary(console, r: dict) -> None:
    from rich.table import Table

    t = Table(title=str(r["path"]), show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    base = r.get("base") or {}
    t.add_row("fingerprint", r["fingerprint"])
    t.add_row("base", f"{_text(base.get('model'))} / {_text(base.get('pretrained'))} ({_text(base.get('fingerprint'))})")
    t.add_row("tasks", ", ".join(r["tasks"]) or "-")
    t.add_row("mode", _text(r.get("mode")))
    t.add_row("orthoreg", json.dumps(r["orthoreg"]) if r.get("orthoreg") else "off")
    t.add_row("tensors", str(r["tensors"]))
    t.add_row("parameters", f"{r['parameters']:,}")
    t.add_row("L2 norm", f"{r['l2_norm']:.6g}")
    t.add_row("dtypes", ", ".join(r["dtypes"]))
    if r.get("metrics"):
        t.add_row("metrics", ", ".join(f"{k} {_metric(k, v)}" for k, v in r["metrics"].items()))
    for i, h in enumerate(r["history"]):
        fields = _without_none({k: v for k, v in h.items() if k not in ("inputs", "op", "tvtool", "time")})
        ins = ", ".join(x.get("path", "?") for x in h.get("inputs", []))
        t.add_row(f"history[{i}]", f"{h.get('op')} {json.dumps(fields)}" + (f" <- {ins}" if ins else ""))
    console.print(t)
