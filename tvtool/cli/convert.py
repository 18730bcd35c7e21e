"""`tvtool convert`: published checkpoints in and out (transformers CLIP folders, pickles, TTA linearized files)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import app


@app.command()
def convert(
    source: str = typer.Argument(..., help="A transformers CLIP folder or its hub id (ORG/NAME), an open_clip state "
                                           "dict / folder / ARCH:TAG, a torch pickle, a PEFT LoRA adapter folder "
                                           "(written merged), or a tangent_task_arithmetic linearized checkpoint."),
    output: Path = typer.Option(..., "-o", "--output",
                                help="FILE.safetensors: an open_clip state dict (or, from a linearized checkpoint, a "
                                     "linear-mode task vector); a folder: a transformers CLIP folder, or an open_clip "
                                     "folder when SOURCE is a transformers folder."),
    model: Optional[str] = typer.Option(None, "--model", help="open_clip architecture of SOURCE when it cannot be "
                                                              "read from it (e.g. ViT-B-32-quickgelu)."),
    vision_only: bool = typer.Option(False, "--vision-only", help="Write a transformers CLIPVisionModel (image "
                                                                  "tower only)."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="The base model a PEFT adapter SOURCE is "
                                                                        "merged onto (default: the base the adapter "
                                                                        "names, base_model_name_or_path)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Fully unpickle SOURCE if the safe reader "
                                                                    "refuses it (runs code from the file)."),
    force: bool = typer.Option(False, "--force", help="Overwrite the output if it exists."),
):
    """Convert between open_clip (tvtool's naming) and the community's checkpoint formats, without running code.

    Examples: tvtool convert clip-vit-base-patch32/ -o vitb32.safetensors;
    tvtool convert finetuned.pt -o cars.safetensors; tvtool convert vitb32.safetensors --model ViT-B-32-quickgelu -o hf/
    """
    from ..formats import convert as conv

    what = conv.convert(source, output, model=model, vision_only=vision_only, trust_pickle=trust_pickle, force=force,
                        pretrained=pretrained)
    typer.echo(f"wrote {output} ({what})")

