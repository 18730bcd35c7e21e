"""PEFT LoRA adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``) read as the model they make.

An adapter holds, per target module, two small matrices A (r x in) and B (out x r); the fine-tuned weight is
W + dW with dW = scaling * B A, scaling = lora_alpha / r (rsLoRA, ``use_rslora``: lora_alpha / sqrt(r)); r and
lora_alpha per module from ``rank_pattern`` / ``alpha_pattern`` where they name it, matched the way peft matches them
(the first pattern ``P`` with ``(.*\\.)?P$`` matching the module's name). A Conv2d target (lora_B 1x1) gives
dW[o,i,:,:] = scaling * sum_r B[o,r] A[r,i,:,:]; a ``nn.MultiheadAttention`` target (open_clip's ``attn``) updates
its fused ``in_proj_weight`` and, through the LoRA peft puts on its ``out_proj``, that too. Biases trained with
``bias: all`` / ``lora_only`` are saved whole and replace the base's.

The adapter's names are its model's: transformers CLIP (``CLIPModel`` / ``CLIPVisionModel``; q/k/v go to their third
of open_clip's fused ``in_proj``, ``visual_projection`` to the transpose of ``visual.proj``) or open_clip (as they
are, or under ``visual.`` for an adapter made on the image tower alone). The result is a lazy
:class:`~tvtool.weight_source.WeightSource` with the base's names: only the tensors an adapter touches are computed.

What is not plain LoRA is refused with one line rather than half applied: other PEFT types, DoRA, LoRA on
embeddings or with a bias on B, ``modules_to_save``, adapters whose initialisation rewrote the base (PiSSA, OLoRA,
CorDA, LoftQ, LoRA-GA), and the LoRA variants whose update is not B A. The tensors are read with tvtool's safetensors
reader; an ``adapter_model.bin`` (a pickle) only through the restricted unpickler (``formats.safe_pickle``).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TVToolError, brief
from ..fileio import read_json
from ..weight_source import WeightSource
from ..weights_spec import ADAPTER_CONFIG, folder_weights
from . import transformers_clip
from .safe_pickle import load_pickle

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.[A-Za-z0-9_-]+)?\.weight")
# config fields whose (truthy) value makes the update something other than W + scaling B A on the named weights
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save (whole modules saved beside the LoRA)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer_replication",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "velora_config": "VeLoRA (velora_config)",
}
# initialisations that also rewrite the base weights: the adapter alone is relative to that rewritten base
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_HF_ROOTS = ("vision_model.", "text_model.", "visual_projection", "text_projection", "encoder.", "embeddings.",
             "pre_layrnorm", "post_layernorm")
_OPEN_CLIP_PLACES = (("", ""), ("", "visual."), ("model.", ""), ("model.", "visual."))  # (strip, add)


@dataclass
class Adapter:
    """A PEFT LoRA adapter folder: its config and its own tensors (peft's names)."""

    folder: Path
    config: dict
    tensors: WeightSource

    def base_spec(self) -> str:
        """The base model the adapter was made on, as peft recorded it (a hub id or a local path)."""
        base = self.config.get("base_model_name_or_path")
        if not isinstance(base, str) or not base:
            raise TVToolError(f"{self.folder}: the adapter names no base model (base_model_name_or_path); pass the "
                              "model it was trained on with --pretrained BASE")
        return base


def _config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    doc = read_json(path, "a PEFT adapter config", limit=1 << 20)
    if not isinstance(doc, dict):
        raise TVToolError(f"{path}: unreadable adapter config (not a JSON object)")
    return doc


def _check_config(folder: Path, cfg: dict) -> None:
    kind = str(cfg.get("peft_type") or "").upper()
    if kind != "LORA":
        raise TVToolError(f"{folder}: a PEFT {kind or 'unknown-type'} adapter; tvtool reads LoRA adapters only "
                          "(merge it with peft's merge_and_unload() and pass the merged model)")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise TVToolError(f"{folder}: the adapter uses {what}, which tvtool does not read (plain LoRA and "
                              "rsLoRA only); merge it with peft's merge_and_unload() and pass the merged model")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise TVToolError(f"{folder}: the adapter was initialised with {init}, which rewrites the base weights too; "
                          "save it with peft's path_initial_model_for_weight_conversion (an adapter of the original "
                          "base) or pass the merged model")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        raise TVToolError(f"{folder}: unknown bias setting {cfg.get('bias')!r} in {ADAPTER_CONFIG}")
    for key in ("r", "lora_alpha"):
        if not _positive(cfg.get(key)):
            raise TVToolError(f"{folder}: {ADAPTER_CONFIG} needs a positive {key}")
    for key in ("rank_pattern", "alpha_pattern"):
        _check_patterns(folder, key, cfg.get(key))


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < float("inf")


# a quantified group that itself holds a quantifier: "(a+)+" backtracks exponentially on a near-miss
_NESTED_QUANTIFIER = re.compile(r"\([^()]*[+*}][^()]*\)\s*[+*{]")


def _check_patterns(folder: Path, key: str, patterns) -> None:
    """peft matches ``rank_pattern`` / ``alpha_pattern`` keys as regular expressions against module names: from a
    file, each must compile, be short and hold no nested quantifier (matching time stays bounded), and map to a
    positive number."""
    if patterns is None:
        return
    if not isinstance(patterns, dict):
        raise TVToolError(f"{folder}: {ADAPTER_CONFIG}'s {key} is not an object of pattern: number")
    for pattern, value in patterns.items():
        if not _positive(value):
            raise TVToolError(f"{folder}: {ADAPTER_CONFIG}'s {key} maps {brief(pattern)} to {brief(value)}, not a "
                              "positive number")
        if len(pattern) > 512 or _NESTED_QUANTIFIER.search(pattern):
            raise TVToolError(f"{folder}: {ADAPTER_CONFIG}'s {key} pattern {brief(pattern)} is too long or nests "
                              "quantifiers; name the modules plainly")
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as exc:
            raise TVToolError(f"{folder}: {ADAPTER_CONFIG}'s {key} pattern {brief(pattern)} is not a regular "
                              f"expression ({str(exc)[:80]})") from None


def read_adapter(folder: str | Path, trust_pickle: bool = False) -> Adapter:
    """An adapter folder's checked config and its tensors (safetensors memory-mapped; a .bin by the safe reader)."""
    folder = Path(folder)
    chosen = folder_weights(folder)
    cfg = _config(folder)
    _check_config(folder, cfg)
    describe = {"model": None, "pretrained": str(chosen.file)}
    if chosen.file_kind == "pickle":
        tensors = WeightSource.from_state_dict(load_pickle(chosen.file, trust_pickle, strip_prefixes=False), describe)
    else:
        tensors = WeightSource.from_safetensors(chosen.file, describe)
    return Adapter(folder, cfg, tensors)


# ------------------------------------------------------------------------------------------------ the update
def _pattern_value(patterns: dict | None, module: str, default):
    """peft's ``get_pattern_key``: the first pattern P (in the config's order) with ``(.*\\.)?P$`` matching."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


@dataclass(frozen=True)
class _Lora:
    module: str  # the module's name in its model (``base_layer`` wrappers of peft dropped)
    a: str
    b: str
    scaling: float

    def shape(self, tensors: WeightSource) -> tuple[int, ...]:
        a, b = tensors.shape(self.a), tensors.shape(self.b)
        return (b[0], a[1], *a[2:])

    def delta(self, tensors: WeightSource) -> torch.Tensor:
        a, b = tensors.get(self.a).float(), tensors.get(self.b).float()
        if a.ndim == 2:
            return (b @ a) * self.scaling
        return torch.einsum("or,rikl->oikl", b.flatten(1), a) * self.scaling  # conv: lora_B is 1x1


def _entries(adapter: Adapter) -> tuple[list[_Lora], dict[str, str]]:
    """The adapter's LoRA pairs with their scaling, and its whole tensors (trained biases) by parameter name."""
    cfg, folder = adapter.config, adapter.folder
    pairs: dict[str, dict[str, str]] = {}
    whole: dict[str, str] = {}
    for key in adapter.tensors.keys():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = _LORA_KEY.fullmatch(name)
        if m:
            pairs.setdefault(m.group("module"), {})[m.group("which")] = key
        elif "lora_" in name:
            raise TVToolError(f"{folder}: tensor {key} is not a plain LoRA matrix (LoRA on an embedding, a DoRA "
                              "magnitude or a lora_B bias); tvtool reads plain LoRA and rsLoRA adapters only")
        else:
            whole[name.replace(".base_layer", "")] = key
    loras = []
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise TVToolError(f"{folder}: module {module} has only {', '.join(ab)}; the adapter file is incomplete")
        # peft names a module by where it was targeted: the out_proj it wraps inside an nn.MultiheadAttention takes
        # the attention module's rank and alpha
        targeted = module.split(".base_layer.")[0]
        r = _pattern_value(cfg.get("rank_pattern"), targeted, cfg["r"])
        alpha = _pattern_value(cfg.get("alpha_pattern"), targeted, cfg["lora_alpha"])
        rows = adapter.tensors.shape(ab["lora_A"])[0]
        if r != rows:
            raise TVToolError(f"{folder}: {ADAPTER_CONFIG} gives module {targeted} rank {r}, but its lora_A has {rows} "
                              "rows; the config does not belong to these weights")
        ab_ndim = (len(adapter.tensors.shape(ab["lora_A"])), len(adapter.tensors.shape(ab["lora_B"])))
        if ab_ndim not in ((2, 2), (4, 4)) or (ab_ndim == (4, 4) and adapter.tensors.shape(ab["lora_B"])[2:] != (1, 1)):
            raise TVToolError(f"{folder}: module {module}: LoRA matrices of shapes "
                              f"{adapter.tensors.shape(ab['lora_A'])}, {adapter.tensors.shape(ab['lora_B'])} are neither "
                              "a linear nor a 2-D convolution LoRA")
        scaling = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        loras.append(_Lora(module.replace(".base_layer", ""), ab["lora_A"], ab["lora_B"], scaling))
    if not loras and not whole:
        raise TVToolError(f"{folder}: the adapter holds no tensors")
    return loras, whole


# An edit of one base tensor: (op, part, what) with op "copy" / "T" (transposed) / "cat" (part: which third of a
# fused q;k;v tensor) and what a _Lora (added) or the adapter key of a whole tensor (replacing).
def _transformers_edits(loras, whole, folder) -> dict[str, list[tuple]]:
    targets = {lora.module + ".weight": lora for lora in loras} | dict(whole)
    names = set(targets)
    for name in list(names):  # the plan fuses q/k/v only when all three are named
        m = re.fullmatch(r"(.*\.self_attn\.)(q_proj|k_proj|v_proj)\.(weight|bias)", name)
        if m:
            names |= {f"{m.group(1)}{p}.{m.group(3)}" for p in ("q_proj", "k_proj", "v_proj")}
    vision_only = not any(n.startswith(("text_model.", "text_projection")) for n in names)
    try:
        plan = transformers_clip.hf_to_open_clip_plan(sorted(names), vision_only=vision_only)
    except TVToolError as exc:
        raise TVToolError(f"{folder}: {exc}") from None
    where = {hf: (oc, op, i) for oc, (op, ins) in plan.items() for i, hf in enumerate(ins)}
    edits: dict[str, list[tuple]] = {}
    for name, what in targets.items():
        if name not in where:  # a position_ids buffer
            continue
        oc, op, part = where[name]
        edits.setdefault(oc, []).append((op, part, what))
    return edits


def _open_clip_edits(loras, whole, base: WeightSource, folder) -> dict[str, list[tuple]]:
    def param(name, strip, add, is_module):
        if strip and not name.startswith(strip):
            return None
        name = add + name[len(strip):]
        for candidate in ((name + ".weight", name + ".in_proj_weight") if is_module else (name,)):
            if candidate in base:  # nn.MultiheadAttention: the fused in_proj
                return candidate
        return None

    targets = [(lora.module, lora, True) for lora in loras] + [(n, k, False) for n, k in whole.items()]
    for strip, add in _OPEN_CLIP_PLACES:
        found = [param(name, strip, add, is_module) for name, _, is_module in targets]
        if all(found):
            edits: dict[str, list[tuple]] = {}
            for key, (_, what, _) in zip(found, targets):
                edits.setdefault(key, []).append(("copy", None, what))
            return edits
    name = targets[0][0]
    raise TVToolError(f"{folder}: the adapter's module {name} is not in the base model (nor under visual.); is the "
                      "base the model the adapter was made on?")


def merged(adapter: Adapter, base: WeightSource) -> WeightSource:
    """The base with the adapter's updates merged in, lazily (names and dtypes the base's)."""
    folder = adapter.folder
    loras, whole = _entries(adapter)
    names = [lora.module for lora in loras] + list(whole)
    if any(n.startswith(_HF_ROOTS) for n in names):
        edits = _transformers_edits(loras, whole, folder)
    else:
        edits = _open_clip_edits(loras, whole, base, folder)
    tensors = adapter.tensors
    for key, changes in edits.items():  # every shape, before a tensor is read
        if key not in base:
            raise TVToolError(f"{folder}: the adapter updates {key}, which the base model does not hold; is the base "
                              "the model the adapter was made on?")
        full = tuple(base.shape(key))
        for op, part, what in changes:
            shape = what.shape(tensors) if isinstance(what, _Lora) else tuple(tensors.shape(what))
            shape = tuple(reversed(shape)) if op == "T" else shape
            want = (full[0] // 3, *full[1:]) if op == "cat" else full
            if shape != want:
                raise TVToolError(f"{folder}: the adapter's update of {key} has shape {shape}, the base's is {want}; "
                                  "is the base the model the adapter was made on?")

    def get(key):
        changes = edits.get(key)
        if not changes:
            return base.get(key)
        weight = base.get(key).float().clone()
        # whole tensors first (they replace), then the LoRA updates (they add)
        for op, part, what in sorted(changes, key=lambda c: isinstance(c[2], _Lora)):
            new = what.delta(tensors) if isinstance(what, _Lora) else tensors.get(what).float()
            new = new.t() if op == "T" else new
            region = weight.narrow(0, part * new.shape[0], new.shape[0]) if op == "cat" else weight
            if isinstance(what, _Lora):
                region += new
            else:
                region.copy_(new)
        return weight.to(base.dtype(key))

    describe = {"model": base.describe.get("model"), "pretrained": str(folder.resolve()), "format": "peft-lora",
                "base": base.describe.get("pretrained")}
    return WeightSource(base.keys(), get, describe, shape=base.shape, dtype=base.dtype, release=base.release,
                        config=base.config)
