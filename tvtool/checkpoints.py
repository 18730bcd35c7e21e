"""``open_weights``: any weights spec opened as a lazily readable :class:`~tvtool.weight_source.WeightSource`.

What a spec names is decided by ``tvtool.weights_spec`` (see there for every form); this module calls the reader
of each kind: safetensors files memory-mapped tensor by tensor (``tvtool.safetensors_io``), sharded indexes
(``formats.sharded``), pickles through the restricted unpickler (``formats.safe_pickle``, which runs nothing),
transformers CLIP folders converted to open_clip names on the fly (``formats.transformers_clip``), hub ids
resolved to a folder of the local Hugging Face cache (``formats.hf_hub``, downloading when online), PEFT LoRA
adapter folders merged onto their base (``formats.peft_lora``), and specs that name an open_clip architecture
(``ARCH:TAG``, ``hf-hub:``) built by open_clip (``tvtool.models``).

The readers that need torch (pickles, transformers folders, open_clip) are imported when a spec of their kind is
opened, so that the file commands on safetensors (extract, add, apply, inspect) start without it.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import TVToolError
from .fileio import parse_json
from .formats import hf_hub, sharded
from .safetensors_io import META_KEY
from .weight_source import WeightSource
from .weights_spec import WeightsSpec, folder_weights, looks_like_path, parse_weights


def open_weights(spec: str | os.PathLike, *, trust_pickle: bool = False, device: str = "cpu",
                 base: WeightSource | None = None) -> WeightSource:
    """Resolve a weights spec (see ``tvtool.weights_spec``) to a lazily readable :class:`WeightSource`.

    ``base``: the base model a PEFT adapter is merged onto (``extract --pretrained``); without it an adapter's own
    ``base_model_name_or_path`` is opened. Other specs ignore it."""
    parsed = parse_weights(spec)
    if parsed.builds_model:
        return _built_model(parsed, trust_pickle, device)
    return OPENERS[parsed.kind](parsed, trust_pickle, base)


def _describe(path: Path) -> dict:
    # Absolute, so that a vector's recorded base resolves from any working directory.
    return {"model": None, "pretrained": str(path.resolve())}


def _open_safetensors(spec: WeightsSpec, trust_pickle: bool, base) -> WeightSource:
    path = spec.path
    describe = _describe(path)
    source = WeightSource.from_safetensors(path, describe)
    describe["model"] = recorded_arch(source.metadata)
    return source


def _open_index(spec: WeightsSpec, trust_pickle: bool, base) -> WeightSource:
    return sharded.open_index(spec.path, _describe(spec.path))


def _open_pickle(spec: WeightsSpec, trust_pickle: bool, base) -> WeightSource:
    from .formats import safe_pickle  # torch

    return safe_pickle.open_pickle(spec.path, trust_pickle, _describe(spec.path))


def _open_folder(spec: WeightsSpec, trust_pickle: bool, base) -> WeightSource:
    chosen = folder_weights(spec.path)
    if chosen.kind == "transformers":
        from .formats import transformers_clip  # torch

        return transformers_clip.open_folder(spec.path, trust_pickle=trust_pickle)
    if chosen.kind == "peft":
        from .formats import peft_lora  # torch

        adapter = peft_lora.read_adapter(spec.path, trust_pickle)
        if base is None:
            base = open_weights(adapter.base_spec(), trust_pickle=trust_pickle)
        return peft_lora.merged(adapter, base)
    return open_weights(chosen.file, trust_pickle=trust_pickle)


def _open_hf_repo(spec: WeightsSpec, trust_pickle: bool, base) -> WeightSource:
    """A hub id: its folder in the Hugging Face cache (downloaded when missing and online), recorded by the id."""
    folder, label = hf_hub.resolve(spec.pretrained)
    source = open_weights(folder, trust_pickle=trust_pickle, base=base)
    source.describe["pretrained"] = label
    return source


# The reader of each kind of spec that names weights on disk or on the hub (``WeightsSpec.kind`` ->
# opener(spec, trust_pickle, base)).
OPENERS = {"safetensors": _open_safetensors, "index": _open_index, "pickle": _open_pickle, "folder": _open_folder,
           "hf-repo": _open_hf_repo}


def _built_model(spec: WeightsSpec, trust_pickle: bool, device: str) -> WeightSource:
    """A spec naming an open_clip architecture: open_clip builds the model, its state dict is the source."""
    from . import models  # torch and open_clip: only for specs that build a model

    if spec.kind != "hf-hub" and spec.arch not in models.list_models():
        if looks_like_path(spec.text):
            raise TVToolError(f"{spec.text}: no such file")
        raise TVToolError(f"{spec.text}: neither a file nor a known open_clip model; see `tvtool models` for names")
    bundle = models.load_clip(spec.arch, spec.pretrained, device=device, trust_pickle=trust_pickle)
    state = {k: v.detach() for k, v in bundle.model.state_dict().items()}
    return WeightSource.from_state_dict(state, {"model": bundle.name, "pretrained": bundle.pretrained})


def recorded_arch(metadata: dict) -> str | None:
    """The open_clip architecture a safetensors file's metadata records (``tvtool convert`` writes it; task vectors
    and models written by ``apply`` record their base), if any."""
    arch = metadata.get("open_clip_model")
    if arch is None and META_KEY in metadata:
        try:
            doc = parse_json(metadata[META_KEY], "metadata", "tvtool metadata")
        except TVToolError:
            doc = None
        base = doc.get("base") if isinstance(doc, dict) else None
        arch = base.get("model") if isinstance(base, dict) else None
    return arch if isinstance(arch, str) and arch else None
