"""`tvtool convert`: published checkpoints in and out (transformers CLIP folders, pickles, TTA linearized files)."""
from __future__ import annotations

from typing import Optional

import typer

from ._app import app
from ._output import STDOUT, destination, stem, wrote


@app.command()
def convert(
    source: str = typer.Argument(..., help="A transformers CLIP folder or its hub id (ORG/NAME), an open_clip state "
                                           "dict / folder / ARCH:TAG, a torch pickle, a PEFT LoRA adapter folder "
                                           "(written merged), or a tangent_task_arithmetic linearized checkpoint."),
    output: Optional[str] = typer.Option(
        None, "-o", "--output",
        help="FILE.safetensors: an open_clip state dict (or, from a linearized checkpoint, a linear-mode task "
             "vector); a folder: a transformers CLIP folder, or an open_clip folder when SOURCE is a transformers "
             "folder. Default, in the current directory: NAME.safetensors from a transformers folder, a hub id, a PEFT "
             "adapter or a pickle (NAME.st from a linearized one), the transformers folder NAME-hf from anything "
             "else. '-o -' writes a file output to stdout (never a terminal)."),
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

    Examples: tvtool convert clip-vit-base-patch32/   (writes clip-vit-base-patch32.safetensors);
    tvtool convert finetuned.pt -o cars.safetensors; tvtool convert vitb32.safetensors --model ViT-B-32-quickgelu -o hf/
    """
    from ..formats import convert as conv

    name = _default_name(source, trust_pickle) if output is None or output == STDOUT else ""
    with destination(output, name, directory=bool(name) and not name.endswith((".safetensors", ".st"))) as target:
        what = conv.convert(source, target.path, model=model, vision_only=vision_only, trust_pickle=trust_pickle,
                            force=force, pretrained=pretrained)
    wrote(target, what)


def _default_name(source: str, trust_pickle: bool) -> str:
    """NAME.safetensors (open_clip state dict) from a transformers folder, a hub id, a PEFT adapter or a pickle,
    NAME.st from a linearized pickle (a task vector), the transformers folder NAME-hf from an open_clip state dict,
    folder or ARCH:TAG."""
    from ..weights_spec import folder_weights, parse_weights

    spec = parse_weights(source)
    if spec.kind == "hf-repo" and not spec.builds_model:  # a hub id ORG/NAME[@REV]: a transformers folder
        return f"{stem(spec.pretrained.split('@')[0].rsplit('/', 1)[-1])}.safetensors"
    name = stem(spec.path) if spec.path is not None else stem(source.replace(":", "_"))
    if spec.kind == "pickle" and not spec.builds_model:
        from ..formats import safe_pickle, tangent

        linearized = tangent.is_linearized(safe_pickle.read_pickle(spec.path, trust_pickle))
        return f"{name}.st" if linearized else f"{name}.safetensors"
    if spec.kind == "folder" and not spec.builds_model and folder_weights(spec.path).kind in ("transformers", "peft"):
        return f"{name}.safetensors"  # a PEFT adapter: merged onto its base
    return f"{name}-hf"
