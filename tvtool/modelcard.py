"""The model card (README.md) `tvtool apply` writes into a transformers folder: the Hugging Face hub's YAML front
matter (``base_model``, ``library_name``, ``tags``) and, in the text, the vectors applied, their alphas and the
operations of their histories (fine-tuning, addition, negation, merging method and options)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from . import __version__

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(folder: str | Path | None) -> str | None:
    """The hub id a transformers folder came from: its config's ``_name_or_path`` when that is ``ORG/NAME``, or the
    Hugging Face cache layout it sits in (``models--ORG--NAME/snapshots/REV``); None when neither says."""
    if folder is None:
        return None
    folder = Path(folder)
    try:
        doc = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        doc = {}
    name = doc.get("_name_or_path") if isinstance(doc, dict) else None
    if isinstance(name, str) and _HUB_ID.match(name) and not Path(name).exists():
        return name
    for part in folder.resolve().parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return "/".join(part[len("models--"):].split("--", 1))
    return None


def _fields(entry: dict) -> str:
    skip = {"op", "inputs", "tvtool", "time", "coefficients"}
    shown = {k: v for k, v in entry.items() if k not in skip and v not in (None, {}, [])}
    return ", ".join(f"{k} {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in shown.items())


def _history_lines(history: list, depth: int) -> list[str]:
    lines = []
    for entry in history or []:
        if not isinstance(entry, dict):
            continue
        fields = _fields(entry)
        lines.append(f"{'  ' * depth}- `{entry.get('op', '?')}`" + (f": {fields}" if fields else ""))
        for inp in entry.get("inputs") or []:
            if not isinstance(inp, dict):
                continue
            tasks = ", ".join(inp.get("tasks") or []) or "-"
            lines.append(f"{'  ' * (depth + 1)}- input `{inp.get('path', '?')}` ({inp.get('fingerprint', '?')}, "
                         f"tasks {tasks})")
            lines += _history_lines(inp.get("history") or [], depth + 2)
    return lines


def _ops(history: list) -> set[str]:
    out = set()
    for entry in history or []:
        if isinstance(entry, dict):
            out.add(str(entry.get("op")))
            for inp in entry.get("inputs") or []:
                if isinstance(inp, dict):
                    out |= _ops(inp.get("history") or [])
    return out


def model_card(name: str, base_folder: str | Path | None, vectors, alpha: float) -> str:
    """README.md for the folder ``name``: theta_0 (the transformers folder ``base_folder``) + alpha * sum(vectors)
    (open :class:`~tvtool.taskvector.TaskVectorFile` objects)."""
    base = hub_id(base_folder)
    ops = set().union(*(_ops(v.meta.get("history") or []) for v in vectors)) if vectors else set()
    tags = ["tvtool", "task-arithmetic", "task-vectors", "clip"]
    if "merge" in ops:
        tags.append("merge")
    if any(v.meta.get("orthoreg") for v in vectors):
        tags.append("orthoreg")
    front = {**({"base_model": base} if base else {}), "library_name": "transformers", "tags": tags}
    tasks = list(dict.fromkeys(t for v in vectors for t in v.tasks))
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", "",
             f"CLIP with task vectors applied by tvtool {__version__} (`tvtool apply`): "
             f"theta = theta_0 + alpha * sum(tau), alpha = {alpha:g}.", "",
             f"- base model theta_0: `{base or base_folder or 'unknown'}`",
             f"- tasks: {', '.join(tasks) or '-'}", "", "## Task vectors", "",
             "| vector | fingerprint | tasks | mode | OrthoReg | alpha |", "|---|---|---|---|---|---|"]
    for v in vectors:
        o = v.meta.get("orthoreg")
        ortho = f"lambda {o.get('lambda')} ({o.get('form')})" if isinstance(o, dict) else "off"
        lines.append(f"| `{Path(v.path).name}` | {v.fingerprint} | {', '.join(v.tasks) or '-'} | "
                     f"{v.meta.get('mode') or '-'} | {ortho} | {alpha:g} |")
    lines += ["", "## How each vector was made", "",
              "Operations from each vector's recorded history, newest first, with their inputs (alphas, merging "
              "methods and options as recorded).", ""]
    for v in vectors:
        lines.append(f"### `{Path(v.path).name}`")
        lines.append("")
        lines += _history_lines(list(reversed(v.meta.get("history") or [])), 0) or ["- no history recorded"]
        lines.append("")
    return "\n".join(lines)
