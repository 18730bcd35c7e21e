"""transformers CLIP folders (``CLIPModel`` / ``CLIPVisionModel``: ``openai/clip-vit-*``, FusionBench) <-> open_clip.

tvtool names tensors the open_clip way; transformers is only an I/O format. The mapping (docs/CHECKPOINTS.md):
per layer q/k/v projections are fused, in that order, into ``attn.in_proj_*``; ``fc1``/``fc2`` are ``mlp.c_fc``/
``mlp.c_proj``; ``layer_norm1/2`` are ``ln_1/ln_2``; ``visual_projection.weight`` and ``text_projection.weight`` are
the transposes of ``visual.proj`` and ``text_projection``. Reading is lazy: each open_clip tensor is built from its
transformers tensors only when asked for. The activation is not in the weights: ``hidden_act: quick_gelu`` (every
OpenAI-trained model) needs the ``-quickgelu`` open_clip architecture, and the matching name is recorded.

transformers itself is needed only to read and write the folder's config.json (its defaults fill what the file
leaves out): ``pip install 'tvtool[hf]'``.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Mapping

import torch

from ..errors import TVToolError, brief
from ..fileio import atomic_path, check_output
from ..safetensors_io import write_safetensors
from ..weight_source import ModelConfig, WeightSource
from ..weights_spec import folder_weights, transformers_model_type
from . import sharded
from .arch import match_config, register_config
from .safe_pickle import load_pickle

INSTALL_HINT = "reading or writing transformers CLIP folders needs transformers: pip install 'tvtool[hf]'"

# transformers name <-> open_clip name, outside the transformer layers ("T": transposed).
_TOP = [
    ("logit_scale", "logit_scale", None),
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight", None),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding", None),
    ("text_model.final_layer_norm.weight", "ln_final.weight", None),
    ("text_model.final_layer_norm.bias", "ln_final.bias", None),
    ("text_projection.weight", "text_projection", "T"),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding", None),
    ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight", None),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding", None),
    ("vision_model.pre_layrnorm.weight", "visual.ln_pre.weight", None),
    ("vision_model.pre_layrnorm.bias", "visual.ln_pre.bias", None),
    ("vision_model.post_layernorm.weight", "visual.ln_post.weight", None),
    ("vision_model.post_layernorm.bias", "visual.ln_post.bias", None),
    ("visual_projection.weight", "visual.proj", "T"),
]
_LAYER = [
    ("self_attn.out_proj.weight", "attn.out_proj.weight"), ("self_attn.out_proj.bias", "attn.out_proj.bias"),
    ("layer_norm1.weight", "ln_1.weight"), ("layer_norm1.bias", "ln_1.bias"),
    ("layer_norm2.weight", "ln_2.weight"), ("layer_norm2.bias", "ln_2.bias"),
    ("mlp.fc1.weight", "mlp.c_fc.weight"), ("mlp.fc1.bias", "mlp.c_fc.bias"),
    ("mlp.fc2.weight", "mlp.c_proj.weight"), ("mlp.fc2.bias", "mlp.c_proj.bias"),
]
_TOWERS = [("vision_model.encoder.layers.", "visual.transformer.resblocks."),
           ("text_model.encoder.layers.", "transformer.resblocks.")]
_QKV = ("q_proj", "k_proj", "v_proj")
_IGNORED_HF = re.compile(r"(^|\.)position_ids$")  # a buffer (persistent in old transformers): not a weight


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise TVToolError(INSTALL_HINT) from None
    return transformers


# ------------------------------------------------------------------------------------------------ key mapping
# A plan maps each output key to (op, input keys): op "copy", "T" (transpose) or "cat" (q;k;v) or ("chunk", i).
def hf_to_open_clip_plan(hf_keys, vision_only: bool = False) -> dict[str, tuple]:
    top = {hf: (oc, op) for hf, oc, op in _TOP}
    plan: dict[str, tuple] = {}
    qkv: dict[str, dict[str, str]] = {}
    for k in hf_keys:
        if _IGNORED_HF.search(k):
            continue
        # transformers 5 saves CLIPVisionModel without the "vision_model." prefix that 4.x (FusionBench) wrote.
        name = k if not vision_only or k.startswith(("vision_model.", "visual_projection.")) else "vision_model." + k
        if name in top:
            oc, op = top[name]
            plan[oc] = (op or "copy", [k])
            continue
        for hf_pre, oc_pre in _TOWERS:
            if name.startswith(hf_pre):
                idx, _, rest = name[len(hf_pre):].partition(".")
                m = re.fullmatch(r"self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)", rest)
                if m:
                    qkv.setdefault(f"{oc_pre}{idx}.attn.in_proj_{m.group(2)}", {})[m.group(1)] = k
                    break
                sub = dict(_LAYER).get(rest)
                if sub is None:
                    raise TVToolError(f"unexpected tensor {k} in a transformers CLIP checkpoint")
                plan[f"{oc_pre}{idx}.{sub}"] = ("copy", [k])
                break
        else:
            raise TVToolError(f"unexpected tensor {k} in a transformers CLIP checkpoint")
    for oc, parts in qkv.items():
        if set(parts) != set(_QKV):
            raise TVToolError(f"{oc}: the transformers checkpoint lacks some of q_proj/k_proj/v_proj")
        plan[oc] = ("cat", [parts[p] for p in _QKV])
    return plan


def open_clip_to_hf_plan(oc_keys) -> dict[str, tuple]:
    top = {oc: (hf, op) for hf, oc, op in _TOP}
    plan: dict[str, tuple] = {}
    for k in oc_keys:
        if k in top:
            hf, op = top[k]
            plan[hf] = (op or "copy", [k])
            continue
        for hf_pre, oc_pre in _TOWERS:
            if k.startswith(oc_pre):
                idx, _, rest = k[len(oc_pre):].partition(".")
                m = re.fullmatch(r"attn\.in_proj_(weight|bias)", rest)
                if m:
                    for i, p in enumerate(_QKV):
                        plan[f"{hf_pre}{idx}.self_attn.{p}.{m.group(1)}"] = (("chunk", i), [k])
                    break
                sub = {oc: hf for hf, oc in _LAYER}.get(rest)
                if sub is None:
                    raise TVToolError(f"open_clip tensor {k} has no transformers CLIP counterpart (only ViT CLIP "
                                      "models with the standard blocks convert)")
                plan[f"{hf_pre}{idx}.{sub}"] = ("copy", [k])
                break
        else:
            if k == "attn_mask" or k.endswith(".attn_mask"):
                continue  # a causal-mask buffer, rebuilt by both libraries
            raise TVToolError(f"open_clip tensor {k} has no transformers CLIP counterpart (only ViT CLIP models "
                              "with the standard blocks convert)")
    return plan


def apply_plan(op, tensors: list[torch.Tensor]) -> torch.Tensor:
    if op == "copy":
        return tensors[0]
    if op == "T":
        return tensors[0].t().contiguous()
    if op == "cat":
        return torch.cat(tensors, 0)
    if isinstance(op, tuple) and op[0] == "chunk":
        return tensors[0].chunk(3, 0)[op[1]].contiguous()
    raise ValueError(op)


def planned_shape(op, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    if op == "copy":
        return tuple(shapes[0])
    if op == "T":
        return tuple(reversed(shapes[0]))
    if op == "cat":
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return (shapes[0][0] // 3, *shapes[0][1:])


def mapped_source(source, plan: Mapping[str, tuple], describe: dict,
                  config: ModelConfig | None = None) -> WeightSource:
    """A WeightSource whose tensors are computed from ``source`` by ``plan``, lazily."""

    def get(key):
        op, ins = plan[key]
        return apply_plan(op, [source.get(k) for k in ins])

    def shape(key):
        op, ins = plan[key]
        return planned_shape(op, [tuple(source.shape(k)) for k in ins])

    def release(key):
        for k in plan[key][1]:
            source.release(k)

    return WeightSource(list(plan), get, describe, shape=shape, dtype=lambda k: source.dtype(plan[k][1][0]),
                        release=release, config=config)


# ---------------------------------------------------------------------------------------------------- configs
def load_config(folder: str | os.PathLike):
    transformers = require_transformers()
    kind = transformers_model_type(folder)
    cls = transformers.CLIPConfig if kind == "clip" else transformers.CLIPVisionConfig
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a bad config.json
        raise TVToolError(f"{folder}: unreadable config.json ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:160]})") from None


# what a CLIP tower's config fields may be: positive integers no real model comes near (read from a user's file,
# they size divisions and, later, a model's allocation)
_FIELD_BOUND = 1 << 24


def _check_fields(c, names, where: str) -> None:
    for name in names:
        value = getattr(c, name, None)
        if not (isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _FIELD_BOUND):
            raise TVToolError(f"{where}: {name} is {brief(value)}, not a positive integer; the config is damaged")


def _tower_cfg(c, text: bool, where: str = "config.json") -> dict:
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    _check_fields(c, fields + (("max_position_embeddings", "vocab_size") if text else ("image_size", "patch_size")),
                  f"{where}: the {'text' if text else 'vision'} tower's config")
    out = {"width": c.hidden_size, "layers": c.num_hidden_layers}
    if c.intermediate_size != 4 * c.hidden_size:
        out["mlp_ratio"] = c.intermediate_size / c.hidden_size
    if text:
        out.update(context_length=c.max_position_embeddings, vocab_size=c.vocab_size, heads=c.num_attention_heads)
    else:
        out.update(image_size=c.image_size, patch_size=c.patch_size)
        if c.hidden_size // c.num_attention_heads != 64:
            out["head_width"] = c.hidden_size // c.num_attention_heads
    return out


def open_clip_config(config, where: str = "config.json") -> dict:
    """The open_clip model config (``model_cfg``) of a transformers CLIP config; vision-only has no text_cfg."""
    vision = getattr(config, "vision_config", config)
    text = getattr(config, "text_config", None)
    acts = {vision.hidden_act} | ({text.hidden_act} if text is not None else set())
    unsupported = acts - {"quick_gelu", "gelu"}
    if unsupported or len(acts) > 1:
        raise TVToolError(f"transformers CLIP with activation {sorted(acts)}: open_clip has QuickGELU or GELU for "
                          "both towers only")
    _check_fields(config, ("projection_dim",), where)
    cfg = {"embed_dim": config.projection_dim, "vision_cfg": _tower_cfg(vision, False, where)}
    if text is not None:
        cfg["text_cfg"] = _tower_cfg(text, True, where)
    if acts == {"quick_gelu"}:
        cfg["quick_gelu"] = True
    return cfg


def hf_config(model_cfg: dict, vision_only: bool = False):
    """A transformers ``CLIPConfig`` (or ``CLIPVisionConfig``) for an open_clip model config."""
    transformers = require_transformers()
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    v = model_cfg["vision_cfg"]
    width = v["width"]
    vision = dict(hidden_size=width, intermediate_size=int(width * v.get("mlp_ratio", 4.0)),
                  num_hidden_layers=v["layers"], num_attention_heads=width // v.get("head_width", 64),
                  image_size=v["image_size"], patch_size=v["patch_size"], hidden_act=act,
                  projection_dim=model_cfg["embed_dim"])
    for key in ("timm_model_name", "hf_model_name"):
        if v.get(key) or model_cfg.get("text_cfg", {}).get(key):
            raise TVToolError(f"open_clip models with {key} towers have no transformers CLIP counterpart")
    if vision_only:
        return transformers.CLIPVisionConfig(**vision)
    t = model_cfg["text_cfg"]
    text = dict(hidden_size=t["width"], intermediate_size=int(t["width"] * t.get("mlp_ratio", 4.0)),
                num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                max_position_embeddings=t["context_length"], vocab_size=t["vocab_size"], hidden_act=act,
                projection_dim=model_cfg["embed_dim"])
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=model_cfg["embed_dim"])


# ------------------------------------------------------------------------------------------------ read / write
def _raw_weights(folder: Path, trust_pickle: bool) -> WeightSource:
    """The folder's transformers-named tensors, from the file :func:`tvtool.weights_spec.folder_weights` chose."""
    chosen = folder_weights(folder)
    if chosen.kind != "transformers":
        raise TVToolError(f"{folder}: not a transformers CLIP folder (its weights are open_clip's {chosen.file.name})")
    path, kind = chosen.file, chosen.file_kind
    describe = {"model": None, "pretrained": str(path)}
    if kind == "index":
        return sharded.open_index(path, describe)
    if kind == "pickle":
        return WeightSource.from_state_dict(load_pickle(path, trust_pickle, strip_prefixes=False), describe)
    return WeightSource.from_safetensors(path, describe)


def open_folder(folder: str | os.PathLike, *, trust_pickle: bool = False) -> WeightSource:
    """A transformers CLIP folder as a WeightSource with open_clip names (lazy); its ``config`` holds the
    transformers config and the open_clip model config it corresponds to."""
    folder = Path(folder).resolve()
    config = load_config(folder)
    model_cfg = open_clip_config(config, str(folder / "config.json"))
    raw = _raw_weights(folder, trust_pickle)
    plan = hf_to_open_clip_plan(raw.keys(), vision_only="text_cfg" not in model_cfg)
    # A config no open_clip architecture has (tiny test models, custom widths) is registered under a stable name.
    arch = match_config(model_cfg) or (register_config(model_cfg) if "text_cfg" in model_cfg else None)
    return mapped_source(raw, plan, {"model": arch, "pretrained": str(folder), "format": "transformers"},
                         ModelConfig(open_clip=model_cfg, transformers=config, transformers_folder=str(folder)))


def write_folder(out: str | os.PathLike, items, specs: Mapping[str, tuple], config=None, *,
                 copy_from: str | os.PathLike | None = None, force: bool = False,
                 extra_files: Mapping[str, str] | None = None) -> None:
    """Write open_clip-named ``items`` ((key, tensor) pairs, streamed; ``specs`` key -> (dtype, shape)) as a
    transformers folder (config.json + model.safetensors), atomically.

    The config is ``config`` (a transformers config) or, with ``copy_from``, that folder's own files (config.json,
    preprocessor and tokenizer files): ``apply`` onto a transformers base gives a folder of the same kind. A
    vision-only config (``CLIPVisionModel``) keeps only the image tower. ``extra_files`` (name -> text, e.g. the
    model card README.md) are written last, replacing copied files of the same name.
    """
    out = check_output(out, force, directory=True)  # before any work; atomic_path checks again at the end
    if copy_from is not None:
        kind = transformers_model_type(copy_from)
    else:
        kind = getattr(config, "model_type", "clip")
    vision_only = kind == "clip_vision_model"
    keys = [k for k in specs if not vision_only or (k.startswith("visual.") and k != "visual.proj")]
    plan = open_clip_to_hf_plan(keys)
    if vision_only:
        plan = {k: v for k, v in plan.items() if k.startswith("vision_model.")}
    by_source: dict[str, list[str]] = {}
    for hf_key, (_, ins) in plan.items():
        by_source.setdefault(ins[0], []).append(hf_key)
    hf_specs = {k: (specs[ins[0]][0], planned_shape(op, [tuple(specs[ins[0]][1])])) for k, (op, ins) in plan.items()}

    def converted():
        for key, tensor in items:
            for hf_key in by_source.get(key, ()):
                yield hf_key, apply_plan(plan[hf_key][0], [tensor])

    with atomic_path(out, force, directory=True) as tmp:
        if copy_from is not None:
            for f in Path(copy_from).iterdir():
                weights = f.name.startswith(("model.safetensors", "pytorch_model")) or f.suffix in (".bin", ".pt")
                if f.is_file() and not weights:
                    shutil.copy2(f, tmp / f.name)
        else:
            config.architectures = ["CLIPVisionModel" if vision_only else "CLIPModel"]
            config.to_json_file(str(tmp / "config.json"))
        write_safetensors(tmp / "model.safetensors", converted(), hf_specs, {"format": "pt"})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
