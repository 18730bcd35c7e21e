"""`tvtool models`: which architectures and pretrained tags can be named.

Listing must start instantly, so neither open_clip nor torch is imported: architectures are the JSON files in
open_clip's `model_configs` folder (found with `importlib.util.find_spec`, which does not run open_clip's
`__init__`), and pretrained tags come from `tvtool/data/openclip_pretrained.json`, generated from open_clip by
`write_pretrained_tags()` (tests/test_cli_models.py fails when it is stale).
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Optional

import typer

from ..weights_spec import MINI_NAME, MINI_TAG
from ._app import app

PRETRAINED_TAGS_FILE = Path(__file__).resolve().parent.parent / "data" / "openclip_pretrained.json"


def _natural_key(name: str) -> list:
    """open_clip's own ordering of architecture names (ViT-B-16 before ViT-B-32)."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name.lower())]


def openclip_architectures() -> list[str]:
    """The architectures `open_clip.list_models()` would return, read from its config folder without importing it."""
    from ..formats.arch import shipped_configs

    return sorted((n for n in shipped_configs() if n != MINI_NAME), key=_natural_key)


def pretrained_tags() -> dict[str, list[str]]:
    """{architecture: [tag, ...]} as shipped in the data file, plus the bundled model's tag."""
    data = json.loads(PRETRAINED_TAGS_FILE.read_text())
    return {**data["tags"], MINI_NAME: [MINI_TAG]}


def write_pretrained_tags(path: Path = PRETRAINED_TAGS_FILE) -> None:
    """Regenerate the data file from the installed open_clip (imports it; run after upgrading open_clip)."""
    import open_clip

    tags: dict[str, list[str]] = {}
    for arch, tag in open_clip.list_pretrained():
        tags.setdefault(arch, []).append(tag)
    path.write_text(json.dumps({"open_clip": open_clip.__version__, "tags": tags}, indent=1) + "\n")


@app.command()
def models(
    name: Optional[str] = typer.Argument(None, help="Only architectures whose name contains this, e.g. ViT-B."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout and nothing else."),
):
    """List open_clip architectures (and tvtool-mini) with their pretrained tags.

    Pass one as --model NAME --pretrained TAG, or ARCH:TAG wherever a weights spec is asked for.
    Tags download when online; offline, pass a local .safetensors file instead.

    Example: tvtool models ViT-B --json
    """
    tags = pretrained_tags()
    rows = [{"architecture": arch, "pretrained": tags.get(arch, [])}
            for arch in [MINI_NAME, *openclip_architectures()]
            if not name or name.lower() in arch.lower()]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="models (pretrained tags download when online; or pass a local .safetensors file)")
    t.add_column("architecture", no_wrap=True)
    t.add_column("pretrained tags")
    for r in rows:
        t.add_row(r["architecture"], ", ".join(r["pretrained"]) or "-")
    Console().print(t)
