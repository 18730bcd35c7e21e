"""`tvtool merge`: merge task vectors with a registered method (tvtool/merge/)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import json

import typer
from typer.core import TyperCommand

from ..errors import TVToolError
from ._app import app
from ._output import destination, merge_name, output_option, wrote


def _methods_help() -> str:
    from .. import merge as merging

    lines = []
    for m in merging.list_methods():
        opts = ", ".join(f"{k}={'auto' if o.default is None else o.default}" for k, o in m.options.items())
        # no square brackets: typer's rich help would read them as markup
        flags = " - per-layer: 2-D tensors only, the mean elsewhere" if m.per_layer else ""
        flags += " - random: reproducible from --seed" if m.random else ""
        flags += " - data-aware: runs the model on the tasks' training images" if m.collect is not None else ""
        lines.append(f"{m.name}({opts}){flags} - alpha grid {m.alpha_grid}")
    return "\n\n".join(lines)


_HELP = """Merge task vectors with an established merging method; output = alpha * merge(inputs).

Method options are typed KEY=VALUE pairs: --option k=20 --option sign=count. `tvtool merge --list` prints each \
method with its options, their meaning and the paper it implements.

Per-layer methods (tsv, iso-c, iso-cts, wudi) act on 2-D tensors only and average every other tensor, as their \
authors' code does (option fallback=sum adds them). SVDs and WUDI's optimization run on the GPU when there is one. \
Each method's paper, reference code and default alpha search (used by `eval addition --merged` and recipes) are \
in `tvtool merge --list`.

Data-aware methods (regmean, fisher) also need the model (the base the vectors record) and each vector's task's training images (--data-root for real datasets; --tasks when the vectors do not record their task); --seed chooses the images, --device where the model runs (default: cuda when available).

Example: tvtool merge --method ties --option k=20 a.st b.st c.st --alpha 0.4   (writes ties-a+b+c-alpha0.4.st)
"""


class _MergeCommand(TyperCommand):
    """Appends the registry's methods to the help only when help is shown: the registry imports torch."""

    def format_help(self, ctx, formatter):
        if "Methods (defaults)" not in (self.help or ""):
            self.help = f"{self.help}\nMethods (defaults):\n\n{_methods_help()}\n"
        return super().format_help(ctx, formatter)


@app.command("merge", help=_HELP, cls=_MergeCommand)
def merge(
    ctx: typer.Context,
    vectors: Optional[List[Path]] = typer.Argument(None, help="Task-vector files to merge."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="Merging method (see --list)."),
    option: Optional[List[str]] = typer.Option(None, "--option", "-O", metavar="KEY=VALUE",
                                               help="A method option, repeatable: --option k=20."),
    output: Optional[str] = output_option("the merged vector", "METHOD-A+B-alphaX.st (METHOD-A+B.st when alpha is 1)"),
    alpha: float = typer.Option(1.0, "--alpha", help="Scaling coefficient applied to the merged vector."),
    seed: int = typer.Option(0, "--seed", help="Seed of random methods (dare, dare-ties, della); recorded in the history."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype: fp32, bf16 or fp16 (default: the "
                                                              "inputs' dtype)."),
    union: bool = typer.Option(False, "--union", help="Allow inputs with different tensor sets; missing tensors "
                                                      "count as 0."),
    force: bool = typer.Option(False, "--force", help="Overwrite the output if it exists."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Data-aware methods: each vector's task, comma-"
                                                               "separated in order (default: the one it records)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Data-aware methods: data root of the real "
                                                                       "datasets (default $TVTOOL_DATA)."),
    device: Optional[str] = typer.Option(None, "--device", help="Data-aware methods: cuda or cpu (default: cuda "
                                                                "when available)."),
    list_: bool = typer.Option(False, "--list", help="Describe every method, its options and its paper, and exit."),
    as_json: bool = typer.Option(False, "--json", help="With --list: print the methods as JSON on stdout."),
):
    from .. import merge as merging

    if as_json and not list_:
        ctx.fail("--json goes with --list (the merged vector itself is written with -o).")
    if list_ and as_json:
        typer.echo(json.dumps([m.describe() for m in merging.list_methods()], indent=1))
        return
    if list_:
        typer.echo("\n\n".join(merging.describe_method(m) for m in merging.list_methods()))
        return
    if method is None:
        raise TVToolError("no --method given; choose one of " + ", ".join(merging.REGISTRY) +
                          " (`tvtool merge --list` describes them)")
    m = merging.get_method(method)
    if not vectors:
        raise TVToolError("no task vectors given; pass the .st files to merge")
    options = merging.parse_option_strings(option or [])
    if m.collect is not None:
        from ..data_merge import merge_with_data

        task_list = [t.strip() for t in tasks.split(",")] if tasks else None
        with destination(output, merge_name(m.name, vectors, alpha)) as target:
            fp = merge_with_data(m.name, vectors, target.path, options, tasks=task_list, data_root=data_root,
                                 device=device, alpha=alpha, seed=seed, dtype=dtype, force=force,
                                 progress=lambda line: typer.echo(line, err=True))
        wrote(target, fp)
        return
    given = [flag for flag, value in (("--tasks", tasks), ("--data-root", data_root), ("--device", device))
             if value is not None]
    if given:
        raise TVToolError(f"{given[0]} is for data-aware methods (regmean, fisher); {m.name} merges the files alone")
    with destination(output, merge_name(m.name, vectors, alpha)) as target:
        fp = merging.merge_files(m.name, vectors, target.path, options, alpha=alpha, seed=seed, dtype=dtype,
                                 force=force, union=union)
    wrote(target, fp)
