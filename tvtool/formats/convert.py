"""``tvtool convert``: which conversion a (source, output) pair asks for, and doing it streaming and atomically.

- a tangent_task_arithmetic linearized pickle -> a linear-mode task vector (``tangent``);
- anything -> ``FILE.safetensors``: an open_clip state dict, its architecture recorded in the metadata
  (``open_clip_model``; a transformers source also records its full ``open_clip_config``);
- a transformers folder -> a folder: an open_clip folder (open_clip_config.json + open_clip_model.safetensors);
- a PEFT LoRA adapter -> its merged model (base + update; the base is ``pretrained`` or the adapter's
  ``base_model_name_or_path``): to FILE.safetensors as above, to a folder of its base's kind when that is a
  transformers folder (config and processor files copied), else as below;
- anything else -> a folder: a transformers CLIP folder (``CLIPVisionModel`` when the source has no text tower or
  with ``vision_only``).

A hub id (``ORG/NAME``) converts the folder it resolves to (``tvtool.formats.hf_hub``).
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from ..checkpoints import open_weights
from ..errors import TVToolError
from ..fileio import atomic_path, check_not_input, check_output, parse_json, read_json
from ..safetensors_io import META_KEY, SafetensorsFile, fingerprint, write_safetensors
from ..taskvector import FORMAT, history_entry, new_meta, write_vector
from ..weights_spec import WeightsSpec, folder_weights, parse_weights
from . import hf_hub
from .arch import infer, register_builtin


def _specs(source) -> dict:
    return {k: (source.dtype(k), tuple(source.shape(k))) for k in source.keys()}


def _arch_config(source, model: str | None, src_path: Path, open_clip_config: Path | None) -> tuple[str | None, dict]:
    """(architecture name, open_clip model config) of an open_clip-named source; ``open_clip_config``: the source
    folder's config file, if it has one."""
    open_clip = register_builtin()
    name = model or source.describe.get("model")
    if name:
        cfg = open_clip.get_model_config(name)
        if not cfg:
            raise TVToolError(f"unknown open_clip architecture {name!r}; see `tvtool models`")
        return name, cfg
    if open_clip_config is not None:
        doc = read_json(open_clip_config, "an open_clip_config.json")
        cfg = doc.get("model_cfg") if isinstance(doc, dict) else None
        if not (isinstance(cfg, dict) and isinstance(cfg.get("vision_cfg"), dict)
                and isinstance(cfg.get("text_cfg", {}), dict)):
            raise TVToolError(f"{open_clip_config}: no open_clip model config (a \"model_cfg\" object with a "
                              "\"vision_cfg\" object); pass --model")
        return None, cfg
    name, why = infer(source.keys(), source.shape)
    if name is None:
        raise TVToolError(f"{src_path}: cannot tell its open_clip architecture ({why}); pass --model")
    return name, open_clip.get_model_config(name)


def _linearized(obj, src: Path, out: Path, model: str | None, force: bool) -> str:
    from . import tangent  # torch

    arch, theta0, tau = tangent.read(obj, str(src), model)
    base = {"model": arch, "pretrained": None, "fingerprint": fingerprint(theta0)}
    meta = new_meta(base, mode="linear",
                    history=[history_entry("convert", source=str(src.resolve()), format="tangent_task_arithmetic")])
    write_vector(out, tau, meta, force=force)
    return f"linear-mode task vector, {len(tau)} tensors, base {arch} {base['fingerprint']}"


def _open_clip_folder(out: Path, source, force: bool) -> str:
    import open_clip

    cfg = source.config.open_clip
    if "text_cfg" not in cfg:
        raise TVToolError("a vision-only transformers folder has no text tower for an open_clip folder; write a "
                          "FILE.safetensors instead (and use a full base for the heads)")
    with atomic_path(out, force, directory=True) as tmp:
        doc = {"model_cfg": cfg, "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                                                    "std": list(open_clip.OPENAI_DATASET_STD)}}
        (tmp / "open_clip_config.json").write_text(json.dumps(doc, indent=2))
        write_safetensors(tmp / "open_clip_model.safetensors", source.items(), _specs(source),
                          {"open_clip_model": source.describe.get("model") or ""})
    return f"open_clip folder, architecture {source.describe.get('model') or 'in open_clip_config.json'}"


def _refuse_task_vector(spec: WeightsSpec) -> None:
    """A task vector holds weight differences, not weights: converting it would give a model of deltas. (A model
    written by `apply` records its own tvtool document, of another format: it converts.)"""
    if spec.kind != "safetensors" or spec.builds_model:
        return
    path = spec.path
    with SafetensorsFile(path) as f:
        doc = (f.metadata or {}).get(META_KEY)
    try:
        parsed = parse_json(doc, str(path), "tvtool metadata") if doc is not None else None
    except TVToolError:
        parsed = None
    is_vector = isinstance(parsed, dict) and parsed.get("format") == FORMAT
    if is_vector:
        raise TVToolError(f"{path} is a tvtool task vector (weight differences), not model weights; make a model "
                          f"first with `tvtool apply {path} --pretrained BASE -o model.safetensors`, then convert that")


def convert(source: str, output: str | os.PathLike, *, model: str | None = None, vision_only: bool = False,
            trust_pickle: bool = False, force: bool = False, pretrained: str | None = None) -> str:
    """Convert ``source`` to ``output`` (see module docstring); returns a short description of what was written.

    ``pretrained``: the base a PEFT adapter source is merged onto (default: the one the adapter names)."""
    out = Path(output)
    spec = parse_weights(source)
    label = None
    if spec.kind == "hf-repo" and not spec.builds_model:
        folder_path, label = hf_hub.resolve(spec.pretrained)
        spec, source = replace(spec, text=str(folder_path), kind="folder", path=folder_path), str(folder_path)
    src_path = Path(source)
    _refuse_task_vector(spec)
    if out.suffix.lower() not in (".safetensors", ".st"):  # a folder output: checked before any work
        check_not_input(out, [spec.path])  # never the folder being read
        check_output(out, force, directory=True)
    if spec.kind == "pickle" and not spec.builds_model:
        from . import safe_pickle, tangent  # torch

        obj = safe_pickle.read_pickle(spec.path, trust_pickle)
        if tangent.is_linearized(obj):
            return _linearized(obj, spec.path, out, model, force)
    folder = folder_weights(spec.path) if spec.kind == "folder" and not spec.builds_model else None
    is_hf = folder is not None and folder.kind == "transformers"
    is_adapter = folder is not None and folder.kind == "peft"
    if pretrained is not None and not is_adapter:
        raise TVToolError(f"--pretrained is the base of a PEFT adapter; {source} is no adapter folder (drop it)")
    base = open_weights(pretrained, trust_pickle=trust_pickle) if pretrained is not None else None
    if out.suffix.lower() in (".safetensors", ".st"):
        src = open_weights(source, trust_pickle=trust_pickle, base=base)
        arch = model or src.describe.get("model") or infer(src.keys(), src.shape)[0]
        meta = {"open_clip_model": arch or "", "source": label or str(src.describe.get("pretrained") or source)}
        if src.config.open_clip:  # a transformers folder (or an adapter on one) states its whole config
            meta["open_clip_config"] = json.dumps(src.config.open_clip)
        write_safetensors(out, src.items(), _specs(src), meta, force=force)
        return f"open_clip state dict, architecture {arch or 'not recorded (pass --model)'}"
    if is_hf:
        return _open_clip_folder(out, open_weights(source, trust_pickle=trust_pickle), force)
    src = open_weights(source, trust_pickle=trust_pickle, base=base)
    if is_adapter and src.config.transformers_folder:  # merged, in its base's own format
        from . import transformers_clip  # torch

        transformers_clip.write_folder(out, src.items(), _specs(src), copy_from=src.config.transformers_folder,
                                       force=force)
        return f"transformers folder of the merged adapter (config of {src.config.transformers_folder})"
    arch, cfg = _arch_config(src, model, src_path, folder.open_clip_config if folder is not None else None)
    has_text = "transformer.resblocks.0.ln_1.weight" in src
    if not has_text and not vision_only:
        vision_only = True  # e.g. task_vectors checkpoints, which drop the text transformer
    from . import transformers_clip  # torch

    try:
        config = transformers_clip.hf_config(cfg, vision_only=vision_only)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:  # from open_clip_config.json
        raise TVToolError(f"{src_path}: its open_clip config is not a ViT CLIP's ({type(exc).__name__}: "
                          f"{str(exc)[:80]}); pass --model") from None
    transformers_clip.write_folder(out, src.items(), _specs(src), config, force=force)
    kind = "CLIPVisionModel" if vision_only else "CLIPModel"
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    return f"transformers {kind} folder from {arch or 'the folder config'}, hidden_act {act}"
