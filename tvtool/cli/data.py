"""`tvtool data list | check | prepare`: what datasets exist, what is on disk, and how to get the rest."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import TVToolError
from ..fileio import recording_creations, remove_created
from ._app import app

data_app = typer.Typer(
    help="Datasets: list the registry, check a data root, download or arrange one dataset.\n\n"
         "Example: tvtool data check --data-root ~/data",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")

DATA_ROOT_HELP = "Folder holding the datasets in the conventional layout (default: $TVTOOL_DATA)."


def _console():
    from rich.console import Console

    return Console(highlight=False)


@data_app.command("list")
def list_cmd(
    kind: Optional[str] = typer.Option(None, "--kind", help="Only 'real' or only 'mini' datasets."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout instead of a table."),
) -> None:
    """List every registered dataset: kind, number of classes, templates and the protocol's epochs.

    Example: tvtool data list --kind mini --json
    """
    from ..datasets import get_dataset, list_datasets

    if kind not in (None, "real", "mini"):
        raise TVToolError(f"unknown --kind {kind!r}; use 'real' or 'mini'")
    rows = []
    for name in list_datasets(kind):
        spec = get_dataset(name)
        try:
            classes, templates = len(spec.classnames), len(spec.templates)
        except TVToolError:  # class-name file missing or broken: still list the dataset
            classes = templates = None
        rows.append(
            {"name": name, "kind": spec.kind, "classes": classes, "templates": templates, "epochs": spec.epochs,
             "native_val": spec.native_val, "control": spec.control}
        )
    if as_json:
        typer.echo(json.dumps(rows))
        return
    from rich.table import Table

    table = Table("dataset", "kind", "classes", "templates", "epochs", "notes")
    for r in rows:
        notes = ", ".join(n for n, on in (("own val split", r["native_val"]), ("control task", r["control"])) if on)
        table.add_row(r["name"], r["kind"], str(r["classes"] or "?"), str(r["templates"] or "?"), str(r["epochs"]), notes)
    _console().print(table)


def check_dataset(name: str, root: Path) -> dict:
    """{'name', 'present', 'counts' (protocol splits), 'problems': [...], 'how': layout help, 'source': where the
    data was found (the folder layout or a Hugging Face snapshot)} for one dataset."""
    from ..datasets import get_dataset
    from ..datasets.hf import fetch_help
    from ..datasets.sources import protocol_sizes

    spec = get_dataset(name)
    if spec.kind == "mini" or spec.listing is None:
        return {"name": name, "present": True, "counts": None, "problems": [], "how": "built in", "source": None}
    counts, source, problems = None, None, []
    try:
        counts, source = protocol_sizes(spec, root)
    except TVToolError as exc:  # say what is wrong with every split, not only the first one listed
        from ..datasets.sources import native_problem

        problems = [f"{split}: {why}" for split in (("train", "val", "test") if spec.native_val else ("train", "test"))
                    if (why := native_problem(spec, split, root))] or [str(exc)]
    if counts is not None and min(counts.values()) == 0:
        problems.append("a split is empty: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    how = "; ".join(h for h in (spec.layout_help, fetch_help(name, str(root))) if h)
    return {"name": name, "present": not problems, "counts": counts, "problems": problems, "how": how,
            "source": source}


@data_app.command("check")
def check_cmd(
    names: Optional[List[str]] = typer.Argument(None, help="Datasets to check (default: every real dataset)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help=DATA_ROOT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout instead of a table."),
) -> None:
    """Say which datasets are present under the data root, their protocol split sizes, and how to get the rest.

    Exits with status 1 when a dataset asked for (or, without names, any real dataset) is missing.

    Example: tvtool data check eurosat dtd --data-root ~/data
    """
    from ..datasets import get_dataset, list_datasets
    from ..datasets.base import resolve_data_root

    names = [get_dataset(n).name for n in names or []]  # unknown names fail before any work; aliases resolved
    wanted = names or list_datasets("real")
    # the built-in mini tasks need no data root: only real datasets ask for one
    root = resolve_data_root(data_root) if any(get_dataset(n).needs_data_root for n in wanted) else None
    results = [check_dataset(n, root) for n in wanted]
    if as_json:
        typer.echo(json.dumps({"data_root": None if root is None else str(root), "datasets": results}))
    else:
        from rich.table import Table

        table = Table("dataset", "status", "train", "val", "test",
                      title=f"data root {root}" if root is not None else "built-in datasets (no data root needed)")
        for r in results:
            c = r["counts"] or {}
            status = "built in" if r["how"] == "built in" else "ok" if r["present"] else "MISSING"
            if r["present"] and (r.get("source") or "").startswith("Hugging Face snapshot"):
                status = "ok (HF snapshot)"
            table.add_row(r["name"], status, *(str(c.get(s, "-")) for s in ("train", "val", "test")))
        _console().print(table)
        for r in results:
            if not r["present"]:
                typer.echo(f"{r['name']}:", err=False)
                for p in r["problems"]:
                    typer.echo(f"  {p}")
                typer.echo(f"  how to get it: {r['how']}")
    if not all(r["present"] for r in results):
        raise typer.Exit(1)


@data_app.command("prepare")
def prepare_cmd(
    name: str = typer.Argument(..., help="Dataset to download or arrange (see `tvtool data list`)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help=DATA_ROOT_HELP),
) -> None:
    """Download a dataset into the conventional layout where torchvision can (MNIST, SVHN, GTSRB, DTD, EuroSAT and
    the 14/20-task additions except FER2013), arrange manually downloaded files where possible (SUN397), otherwise print the exact manual steps (exit 1).
    When it fails, what this command created under the data root is removed again, and nothing else.

    Example: tvtool data prepare mnist --data-root ~/data
    """
    from ..datasets import get_dataset
    from ..datasets.base import resolve_data_root

    spec = get_dataset(name)
    if spec.kind == "mini":
        typer.echo(f"{name}: built in (generated offline); nothing to prepare")
        return
    if data_root is None:
        data_root = resolve_data_root(None, name=name)
    root = Path(data_root).expanduser()
    created = [p for p in (root, *root.parents) if not p.exists()]
    root.mkdir(parents=True, exist_ok=True)
    with recording_creations(root) as made:
        try:
            _prepare(spec, name, root)
        except (TVToolError, typer.Exit, KeyboardInterrupt):
            # No partial output: remove what this command created under the root, and nothing else (another
            # process may be writing there too), then the folders it made for the root, if empty by now.
            remove_created(made)
            for folder in created:  # innermost first
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise


def _prepare(spec, name: str, root: Path) -> None:
    before = check_dataset(name, root)
    if before["present"]:
        typer.echo(f"{name}: already present under {root} ({_fmt(before['counts'])})")
        return
    from ..datasets.hf import fetch_help

    snapshot = fetch_help(name, str(root))
    if spec.prepare is None:
        typer.echo(f"{name}: cannot be downloaded automatically. Manual steps:\n  {spec.layout_help}")
        if snapshot:
            typer.echo(f"  {snapshot[0].upper()}{snapshot[1:]}")
        typer.echo(f"then check with: tvtool data check {name} --data-root {root}")
        raise typer.Exit(1)
    try:
        spec.prepare(root, typer.echo)
    except TVToolError as exc:
        if snapshot:
            raise TVToolError(f"{exc}; {snapshot}") from None
        raise
    after = check_dataset(name, root)
    if not after["present"]:
        raise TVToolError(f"{name}: prepared files are incomplete ({'; '.join(after['problems'])})")
    typer.echo(f"{name}: ready under {root} ({_fmt(after['counts'])})")


def _fmt(counts) -> str:
    return ", ".join(f"{k} {v}" for k, v in (counts or {}).items())
