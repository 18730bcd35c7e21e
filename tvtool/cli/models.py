"""`tvtool models`: which architectures and pretrained tags can be named."""
from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ._app import app


@app.command()
def models(
    name: Optional[str] = typer.Argument(None, help="Only architectures whose name contains this, e.g. ViT-B."),
):
    """List open_clip architectures (and tvtool-mini) with their pretrained tags.

    Pass one as --model NAME --pretrained TAG, or ARCH:TAG wherever a weights spec is asked for.
    """
    import open_clip

    from .. import models as tv_models

    t = Table(title="models (pretrained tags download when online; or pass a local .safetensors file)")
    t.add_column("architecture", no_wrap=True)
    t.add_column("pretrained tags")
    for arch in tv_models.list_models():
        if name and name.lower() not in arch.lower():
            continue
        tags = ["builtin"] if arch == "tvtool-mini" else open_clip.list_pretrained_tags_by_model(arch)
        t.add_row(arch, ", ".join(tags) or "-")
    Console().print(t)
