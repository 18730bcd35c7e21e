"""Zero-shot classification heads (PROTOCOL.md "Classification heads") and the classifier that uses them.

A head is built once per (text tower, dataset, class names + templates) and cached as safetensors under
``$TVTOOL_CACHE/heads/``; fine-tuning and evaluation only ever touch the image tower, so the cache stays valid
across every task vector applied to the same base model.
"""
from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .defaults import cache_root
from .errors import TVToolError
from .safetensors_io import fingerprint, write_safetensors

HEAD_FORMAT = "tvtool-head-1"
PLACEHOLDER = "{c}"


def fill_templates(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """All prompts, class-major: [c0 t0, c0 t1, ..., c1 t0, ...]."""
    if not classnames or not templates:
        raise TVToolError("a zero-shot head needs at least one class name and one template; check the dataset's "
                          "templates file")
    bad = [t for t in templates if PLACEHOLDER not in t]
    if bad:
        raise TVToolError(f"template {bad[0]!r} has no {PLACEHOLDER} placeholder for the class name; add one")
    try:  # the data layer's contract: template.format(c=name) (literal braces are written {{ }})
        return [t.format(c=c) for c in classnames for t in templates]
    except (KeyError, IndexError, ValueError) as exc:
        raise TVToolError(f"a template has a stray brace field ({exc}); only {PLACEHOLDER} is allowed, write literal "
                          "braces as {{ }}") from None


def text_fingerprint(model: nn.Module) -> str:
    """Identity of everything but the image tower: the head depends on the text tower and logit_scale only."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
    return fingerprint(state, visual_only=False)


def _cache_key(bundle, name: str, classnames: Sequence[str], templates: Sequence[str], text_fp: str) -> dict:
    content = hashlib.sha256(json.dumps([list(classnames), list(templates)]).encode()).hexdigest()[:16]
    return {"format": HEAD_FORMAT, "model": bundle.name, "fingerprint": bundle.fingerprint, "text": text_fp,
            "dataset": name, "content": content}


def _cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in key["dataset"])
    return cache_root() / "heads" / f"{safe}-{digest}.safetensors"


def _read_cached(path: Path, key: dict, n_classes: int) -> torch.Tensor | None:
    from safetensors import safe_open

    if not path.is_file():  # missing, or a FIFO someone left there (opening it would block)
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            head = f.get_tensor("head")
    except Exception:  # missing, truncated or foreign file: rebuild it
        return None
    if meta.get("key") != json.dumps(key, sort_keys=True) or head.ndim != 2 or head.shape[0] != n_classes:
        return None
    return head


_DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _write_cached(path: Path, key: dict, head: torch.Tensor) -> None:
    """Cache a head (streamed and atomic: the temp is removed on any failure). A read-only cache is tolerated (the
    head is simply rebuilt next time); a full disk is one line naming the file, as it would fail the run later."""
    head = head.detach().to("cpu", torch.float32).contiguous()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, [("head", head)], {"head": ("F32", tuple(head.shape))},
                          {"key": json.dumps(key, sort_keys=True)}, force=True, check_finite=False)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise TVToolError(f"{exc}; free some space there or point TVTOOL_CACHE at another disk") from None


@torch.no_grad()
def build_head(bundle, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 512) -> torch.Tensor:
    """The protocol's head, uncached: [C, D] fp32 on the model's device, times logit_scale.exp(), no bias."""
    from .models import encode_texts

    texts = fill_templates(classnames, templates)
    emb = encode_texts(bundle, texts, batch_size=batch_size)  # each prompt embedding L2-normalised
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)
    emb = F.normalize(emb, dim=-1)
    return emb * bundle.model.logit_scale.exp().float()


def zero_shot_head(bundle, dataset_spec, cache: bool = True) -> torch.Tensor:
    """Zero-shot head for ``dataset_spec`` (``.name``, ``.classnames``, ``.templates`` with ``{c}``); cached."""
    name = getattr(dataset_spec, "name", "dataset")
    classnames, templates = list(dataset_spec.classnames), list(dataset_spec.templates)
    device = bundle.device
    if not cache:
        return build_head(bundle, classnames, templates)
    key = _cache_key(bundle, name, classnames, templates, text_fingerprint(bundle.model))
    path = _cache_path(key)
    head = _read_cached(path, key, len(classnames))
    if head is not None:
        return head.to(device)
    head = build_head(bundle, classnames, templates)
    _write_cached(path, key, head)
    return head


class ImageClassifier(nn.Module):
    """The image tower plus a frozen zero-shot head: logits = normalize(visual(x)) @ head.T."""

    def __init__(self, visual: nn.Module, head: torch.Tensor):
        super().__init__()
        self.visual = visual
        # a buffer, not a parameter: never trained, never in an optimizer, moves with .to()
        self.register_buffer("head", head.detach().clone().float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.visual(images)
        if isinstance(feats, tuple):  # towers built with output_tokens return (pooled, tokens)
            feats = feats[0]
        feats = F.normalize(feats.float(), dim=-1)
        return feats @ self.head.T
