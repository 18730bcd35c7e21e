"""Which open_clip architecture a set of weights is, from its config or from its tensor shapes; and the
architectures tvtool adds to open_clip's registry (``tvtool-mini``, configs of converted models).

Shapes give the widths, layer counts, patch and image size, embedding dim and the text tower's context and vocabulary.
They cannot show the activation (QuickGELU or GELU) nor the number of attention heads: an architecture and its
``-quickgelu`` twin always tie, and then the answer is "ambiguous, pass --model" unless the file's metadata says.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

from ..errors import TVToolError
from ..weights_spec import MINI_NAME

_VISION_DEFAULTS = {"head_width": 64, "mlp_ratio": 4.0}
_TEXT_DEFAULTS = {"mlp_ratio": 4.0}
_PLAIN_VISION = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
_PLAIN_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}


MINI_CONFIG = Path(__file__).resolve().parent.parent / "data" / f"{MINI_NAME}.json"


def register_builtin():
    """Add tvtool's own architectures (``tvtool-mini``) to open_clip's registry, once; returns open_clip.

    Called by every piece of code that asks open_clip's registry for an architecture (a call, not a side effect of
    importing some module, so that no module is imported just for it)."""
    import open_clip

    if MINI_NAME not in open_clip.list_models():
        open_clip.add_model_config(MINI_CONFIG)
    return open_clip


def shipped_configs() -> dict[str, dict]:
    """{architecture: config} as open_clip ships them (its ``model_configs/*.json``) plus tvtool-mini, read without
    importing open_clip: its ``__init__`` imports torch and torchvision, seconds that `apply` and `models` must not
    pay. ``find_spec`` locates the package without running it."""
    configs: dict[str, dict] = {}
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted(Path(folder, "model_configs").glob("*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and all(k in data for k in ("embed_dim", "vision_cfg", "text_cfg")):
                configs[path.stem] = data  # the keys open_clip itself requires of a config
    configs[MINI_NAME] = json.loads(MINI_CONFIG.read_text())
    return configs


def _configs():
    if "open_clip" not in sys.modules:
        yield from shipped_configs().items()
        return
    # already imported: its registry, which also holds configs registered in this process (converted models)
    open_clip = register_builtin()
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        if cfg:
            yield name, cfg


def _agrees(known: dict, cfg: dict, defaults: dict, plain: set) -> bool:
    if set(cfg) - plain:
        return False  # timm / hf towers, custom poolings...: not a plain ViT CLIP
    full = {**defaults, **cfg}
    return all(full.get(k) == v for k, v in known.items() if v is not None)


def candidates(partial: dict) -> list[str]:
    """Architectures whose config agrees with every field of ``partial`` (an open_clip model config, maybe partial:
    unknown fields are absent or None; ``quick_gelu`` absent means unknown)."""
    out = []
    for name, cfg in _configs():
        if "embed_dim" in partial and partial["embed_dim"] is not None and cfg.get("embed_dim") != partial["embed_dim"]:
            continue
        if "quick_gelu" in partial and bool(cfg.get("quick_gelu", False)) != bool(partial["quick_gelu"]):
            continue
        if set(cfg) - {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}:
            continue
        if not _agrees(partial["vision_cfg"], cfg.get("vision_cfg", {}), _VISION_DEFAULTS, _PLAIN_VISION):
            continue
        # Without a text tower in the weights, a plain one is still required (not an hf / multilingual tower).
        if not _agrees(partial.get("text_cfg", {}), cfg.get("text_cfg", {}), _TEXT_DEFAULTS, _PLAIN_TEXT):
            continue
        out.append(name)
    return sorted(out, key=len)


def match_config(model_cfg: dict) -> str | None:
    """The one open_clip architecture with exactly this config (activation included), else None."""
    found = candidates({**model_cfg, "quick_gelu": bool(model_cfg.get("quick_gelu", False))})
    return found[0] if len(found) == 1 else None


def shapes_config(keys, shape) -> dict | None:
    """A partial open_clip config read from a state dict's shapes (``shape(key) -> tuple``), or None (no ViT)."""
    keys = set(keys)
    if "visual.conv1.weight" not in keys or "visual.positional_embedding" not in keys:
        return None
    width, _, patch, patch_w = _dims(shape, "visual.conv1.weight", 4)
    if patch != patch_w:
        _odd("visual.conv1.weight", shape, "non-square patches")
    tokens, pos_width = _dims(shape, "visual.positional_embedding", 2)
    grid = math.isqrt(tokens - 1)
    if pos_width != width:
        _odd("visual.positional_embedding", shape, f"its width is not conv1's ({width})")
    if tokens < 2 or grid * grid != tokens - 1:
        _odd("visual.positional_embedding", shape, "not a class token plus a square grid of patches")
    layers = _count_layers(keys, "visual.transformer.resblocks.")
    vision = {"width": width, "patch_size": patch, "image_size": grid * patch, "layers": layers}
    fc = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    if fc in keys:
        hidden, fc_in = _dims(shape, fc, 2)
        if fc_in != width:
            _odd(fc, shape, f"its input is not the tower's width ({width})")
        vision["mlp_ratio"] = hidden / width
    embed_dim = None
    if "visual.proj" in keys:
        proj_in, embed_dim = _dims(shape, "visual.proj", 2)
        if proj_in != width:
            _odd("visual.proj", shape, f"its input is not the tower's width ({width})")
    cfg: dict = {"vision_cfg": vision, "embed_dim": embed_dim}
    if {"token_embedding.weight", "positional_embedding"} <= keys:
        # task_vectors' ImageEncoder deletes the text transformer but keeps these: layers then stay unknown
        vocab, twidth = _dims(shape, "token_embedding.weight", 2)
        context, pos_twidth = _dims(shape, "positional_embedding", 2)
        if pos_twidth != twidth:
            _odd("positional_embedding", shape, f"its width is not token_embedding's ({twidth})")
        cfg["text_cfg"] = {"vocab_size": vocab, "width": twidth, "context_length": context,
                           "layers": _count_layers(keys, "transformer.resblocks.") or None}
    return cfg


def _odd(key: str, shape, why: str):
    raise TVToolError(f"tensor {key} has shape {list(shape(key))[:8]}: {why}; these are not the weights of an "
                      "open_clip ViT CLIP (damaged, or another model)")


def _dims(shape, key: str, ndim: int) -> tuple[int, ...]:
    """The shape of ``key``, which must have ``ndim`` dimensions, none of them empty."""
    dims = tuple(shape(key))
    if len(dims) != ndim or not all(isinstance(d, int) and d > 0 for d in dims):
        _odd(key, shape, f"a ViT CLIP's is {ndim}-D, without empty dimensions")
    return dims


def _count_layers(keys, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in keys if (m := pat.match(k))})


def infer(keys, shape, quick_gelu: bool | None = None) -> tuple[str | None, str]:
    """(architecture or None, why not) for a state dict given by its keys and a shape getter; ``quick_gelu`` when
    something other than the shapes tells the activation (a pickled module's class names)."""
    partial = shapes_config(keys, shape)
    if partial is None:
        return None, "not a ViT CLIP state dict"
    if quick_gelu is not None:
        partial["quick_gelu"] = quick_gelu
    found = candidates(partial)
    if len(found) == 1:
        return found[0], ""
    if not found:
        return None, "its shapes match no open_clip architecture"
    plain = [n for n in found if not n.endswith("-quickgelu")]
    if len(found) == 2 and len(plain) == 1 and f"{plain[0]}-quickgelu" in found:
        return None, (f"{plain[0]} or {plain[0]}-quickgelu (QuickGELU cannot be seen from shapes; OpenAI weights use "
                      "it)")
    return None, "shapes match " + ", ".join(found[:5])


def register_config(model_cfg: dict) -> str:
    """Register a converted config that matches no named architecture with open_clip; returns its name."""
    import hashlib
    import tempfile

    open_clip = register_builtin()
    text = json.dumps(model_cfg, sort_keys=True)
    name = "tvtool-converted-" + hashlib.sha256(text.encode()).hexdigest()[:10]
    if name not in open_clip.list_models():
        path = Path(tempfile.mkdtemp(prefix="tvtool-arch-")) / f"{name}.json"
        path.write_text(text)
        open_clip.add_model_config(path)
    return name
