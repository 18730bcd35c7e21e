"""Linearized checkpoints of tangent_task_arithmetic, read as linear-mode task vectors.

``LinearizedImageEncoder.save`` writes a plain dict: ``model.params.{i}`` (fine-tuned) and ``model.params0.{i}``
(theta_0), two lists in the order of the wrapped ImageEncoder's ``named_parameters()`` (an open_clip CLIP with its
text transformer deleted), plus a string ``model_name``. Names are recovered by building that architecture on the
meta device (no memory, no weights) and listing its parameters the same way; every shape must agree, otherwise we
say which index disagrees rather than guess. The tangent task vector is params - params0; like every tvtool vector
it keeps the image tower only (``visual.*``), and its base fingerprint is theta_0's.
"""
from __future__ import annotations

import logging
import re

import torch

from ..errors import TVToolError
from .arch import register_builtin

_INDEXED = re.compile(r"^(?:.*\.)?(params0?)\.(\d{1,9})$")  # an index, not a 5000-digit int


def is_linearized(obj) -> bool:
    return isinstance(obj, dict) and any(isinstance(k, str) and _INDEXED.match(k) and k.rsplit(".", 2)[-2] == "params0"
                                         for k in obj)


def _lists(obj: dict, origin: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    found: dict[str, dict[int, torch.Tensor]] = {"params": {}, "params0": {}}
    for k, v in obj.items():
        m = _INDEXED.match(k) if isinstance(k, str) else None
        if m and isinstance(v, torch.Tensor):
            found[m.group(1)][int(m.group(2))] = v
    p, p0 = found["params"], found["params0"]
    if set(p) != set(p0) or set(p) != set(range(len(p))):
        raise TVToolError(f"{origin}: linearized checkpoint with mismatched params ({len(p)}) and params0 "
                          f"({len(p0)}) lists; the file is incomplete")
    return [p[i] for i in range(len(p))], [p0[i] for i in range(len(p0))]


def encoder_parameter_names(arch: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of an ImageEncoder around open_clip ``arch`` without its text transformer, in parameter order."""
    open_clip = register_builtin()
    if arch not in open_clip.list_models():
        raise TVToolError(f"unknown open_clip architecture {arch!r} for the linearized checkpoint; pass --model")
    logging.disable(logging.WARNING)  # open_clip warns that no pretrained weights were loaded: none are wanted
    try:
        with torch.device("meta"):
            model = open_clip.create_model(arch, device="meta")
    finally:
        logging.disable(logging.NOTSET)
    if hasattr(model, "transformer"):
        del model.transformer  # task_vectors' ImageEncoder(keep_lang=False) deletes it
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def read(obj: dict, origin: str, arch: str | None = None):
    """(arch, theta_0 visual tensors, tau visual tensors) from a linearized checkpoint dict."""
    params, params0 = _lists(obj, origin)
    recorded = obj.get("model_name") if isinstance(obj.get("model_name"), str) else None
    arch = arch or recorded
    if not arch:
        raise TVToolError(f"{origin}: linearized checkpoint records no model_name; pass --model (e.g. ViT-B-32)")
    names = encoder_parameter_names(arch)
    if len(names) != len(params):
        raise TVToolError(f"{origin}: holds {len(params)} parameters but {arch} without its text transformer has "
                          f"{len(names)}; pass the right --model")
    for i, ((name, shape), p, p0) in enumerate(zip(names, params, params0)):
        if tuple(p0.shape) != shape:
            raise TVToolError(f"{origin}: parameter {i} has shape {tuple(p0.shape)} but {arch}'s {name} is {shape}; "
                              "pass the right --model")
        # the fine-tuned list must match too: params - params0 would broadcast a [1] tensor into a wrong vector
        if tuple(p.shape) != shape:
            raise TVToolError(f"{origin}: fine-tuned parameter {i} ({name}) has shape {tuple(p.shape)} but its "
                              f"pre-trained value and {arch} have {shape}; the file is damaged")
        if not (p.is_floating_point() and p0.is_floating_point()):
            raise TVToolError(f"{origin}: parameter {i} ({name}) is {p.dtype} / {p0.dtype}, not floating point; the "
                              "file is damaged")
    theta0, tau = {}, {}
    for (name, _), p, p0 in zip(names, params, params0):
        if name.startswith("visual."):
            theta0[name] = p0
            tau[name] = p.to(torch.float32) - p0.to(torch.float32)
    return arch, theta0, tau
