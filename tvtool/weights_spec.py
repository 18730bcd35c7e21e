"""What a weights spec names, decided in one place (as open_clip's factory parses its model names).

A *weights spec* is one of
- a safetensors file (``.safetensors``, ``.st``, or any other file not named below);
- a torch pickle (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.pkl``), read without running code;
- a sharded safetensors index (``*.safetensors.index.json``);
- a folder: an open_clip folder, a transformers CLIP folder or a folder holding a sharded index
  (:func:`folder_weights` chooses its weights file), or a PEFT LoRA adapter folder (``adapter_config.json``: the
  fine-tuned model is its base plus the adapter's update, ``tvtool.formats.peft_lora``);
- ``hf-hub:ORG/NAME``: an open_clip model on the Hugging Face hub (open_clip downloads and builds it);
- ``ORG/NAME`` or ``ORG/NAME@REVISION`` (a hub id, :func:`hub_id`) that names no local file or folder: a transformers
  model on the Hugging Face hub, read from the local hub cache or downloaded (``tvtool.formats.hf_hub``); a local path
  of the same name wins (``./ORG/NAME`` always names the path);
- ``ARCH``, ``ARCH:TAG`` or ``ARCH:PATH``: an open_clip architecture with a pretrained tag (``random``: a random
  initialisation; none: the architecture's default) or a local file or folder; ``tvtool-mini`` (``:builtin``) is
  the bundled model, its weights shipped in tvtool/data.
Where a command takes ``--model`` and ``--pretrained`` apart, :func:`parse_pretrained` reads the pair as
``MODEL:PRETRAINED``.

Parsing only looks at the text and the file system (no torch, no open_clip); whether an architecture or tag exists is
checked where the spec is opened (``tvtool.checkpoints.open_weights`` for weight sources, ``tvtool.models.load_clip``
for built models). A new kind of spec (a hub id ``ORG/NAME``, an adapter folder) is one recognizer in
:data:`RECOGNIZERS`, placed before the ones it must win over, plus its reader in ``tvtool.checkpoints.OPENERS`` (and
its case in ``load_clip`` if models are built from it).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import TVToolError
from .fileio import check_input, read_json

PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt", ".pkl"})
INDEX_SUFFIX = ".safetensors.index.json"
RANDOM_TAGS = ("random", "none")  # an explicit random initialisation (tests, timing)
# The bundled model: its open_clip architecture (config in tvtool/data, registered by tvtool.formats.arch) and the
# tag of its shipped weights, also its default.
MINI_NAME = "tvtool-mini"
MINI_TAG = "builtin"
HF_HUB_PREFIX = "hf-hub:"
# A hub repository id as huggingface_hub spells them (one slash; letters, digits, "-", "_", ".") and a revision
# (a branch, tag or commit; "refs/pr/1" has slashes).
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.-]+(?:/[\w.-]+)*))?")
# Names that end like a weights file are files that are missing, not hub ids.
FILE_SUFFIXES = PICKLE_SUFFIXES | {".safetensors", ".st", ".json", ".npz", ".npy"}

# Weight files looked for in an open_clip folder, safest first (safetensors before pickles), then sharded indexes.
FOLDER_FILES = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "model.safetensors",
    "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "pytorch_model.bin", "model.pth",
)
FOLDER_INDEXES = ("open_clip_model" + INDEX_SUFFIX, "model" + INDEX_SUFFIX)
# A transformers CLIP folder's weights; the generic names (model.safetensors, ...) are transformers-named there.
TRANSFORMERS_FILES = ("model.safetensors", "model" + INDEX_SUFFIX, "pytorch_model.bin")
CLIP_MODEL_TYPES = ("clip", "clip_vision_model")
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter folder
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # safetensors first: a .bin is a pickle
OPEN_CLIP_CONFIG = "open_clip_config.json"

# kinds of spec naming a local path (``path`` is set)
PATH_KINDS = ("safetensors", "pickle", "index", "folder")


@dataclass(frozen=True)
class WeightsSpec:
    """A parsed weights spec.

    ``kind``: "safetensors" | "pickle" | "index" | "folder" (``path`` set), "hf-hub" (``arch`` is the
    ``hf-hub:ORG/NAME`` name), "hf-repo" (``pretrained`` is a hub id ``ORG/NAME[@REVISION]`` of a transformers
    model), "tag" (``pretrained`` is an open_clip registry tag), "random", "builtin" (the bundled
    model's shipped weights) or "default" (no weights named: an error for every architecture but the bundled one). ``arch``: the open_clip architecture the spec names (the model is built by
    open_clip), None when the weights alone say what they are. ``pretrained``: the part after ``ARCH:`` (or the
    ``--pretrained`` value) as written.
    """

    text: str
    kind: str
    path: Path | None = None
    arch: str | None = None
    pretrained: str | None = None

    @property
    def builds_model(self) -> bool:
        """True when open_clip builds the model (an architecture is named), False for weights read as they are."""
        return self.arch is not None


def looks_like_path(text: str) -> bool:
    """Whether a spec that names nothing known was meant as a file (so "no such file" is the right error)."""
    return bool(Path(text).suffix) or os.sep in text


def file_kind(path: Path) -> str:
    """What a weights file holds, by its name: "index", "pickle" or "safetensors"."""
    if path.name.endswith(".index.json"):
        return "index"
    return "pickle" if path.suffix.lower() in PICKLE_SUFFIXES else "safetensors"


def _path_spec(text: str, arch: str | None = None, pretrained: str | None = None) -> WeightsSpec | None:
    """A spec naming an existing local file or folder, by what the name says it holds."""
    path = Path(text).expanduser()
    if path.is_dir():
        kind = "folder"
    elif path.is_file():
        kind = file_kind(path)
    elif path.exists():
        check_input(path, "a weights file or folder")  # a FIFO or device would block or never end: refused
        return None
    else:
        return None
    return WeightsSpec(text if pretrained is None else f"{arch}:{pretrained}", kind, path, arch, pretrained)


def _hf_hub_spec(text: str) -> WeightsSpec | None:
    if text.startswith(HF_HUB_PREFIX):
        return WeightsSpec(text, "hf-hub", arch=text, pretrained=None)
    return None


def hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo, revision or None) when ``text`` reads as a Hugging Face hub id ``ORG/NAME[@REVISION]``, else None.

    Only the text is looked at: callers try local paths first (:data:`RECOGNIZERS` order), so a folder ``ORG/NAME``
    that exists is the folder. A name ending like a weights file (``runs/cars.safetensors``) or written as a path
    (``./x/y``, ``/x/y``, ``~/x``) is never a hub id: when missing, "no such file" is the right error.
    """
    m = HUB_ID.fullmatch(text)
    if m is None:
        return None
    repo = m.group("repo")
    if "--" in repo or ".." in repo or repo.endswith(".") or Path(repo).suffix.lower() in FILE_SUFFIXES:
        return None
    return repo, m.group("revision")


def _hf_repo_spec(text: str) -> WeightsSpec | None:
    if hub_id(text) is not None:
        return WeightsSpec(text, "hf-repo", pretrained=text)
    return None


def _arch_spec(text: str) -> WeightsSpec:
    """Anything else: ``ARCH[:PRETRAINED]`` (whether ARCH exists is checked when the spec is opened)."""
    arch, _, pretrained = text.partition(":")
    return parse_pretrained(arch, pretrained or None)


# Tried in order; the first that recognizes the text wins. The last one always does.
RECOGNIZERS: tuple[Callable[[str], WeightsSpec | None], ...] = (_path_spec, _hf_hub_spec, _hf_repo_spec, _arch_spec)


def parse_weights(spec: str | os.PathLike) -> WeightsSpec:
    """Parse a weights spec (see module docstring)."""
    text = os.fspath(spec)
    for recognize in RECOGNIZERS:
        parsed = recognize(text)
        if parsed is not None:
            return parsed
    raise AssertionError("the last recognizer accepts every spec")


def parse_pretrained(model: str, pretrained: str | os.PathLike | None) -> WeightsSpec:
    """``--model MODEL --pretrained PRETRAINED``, read as the spec ``MODEL:PRETRAINED``."""
    pretrained = None if pretrained is None else os.fspath(pretrained)
    text = model if pretrained is None else f"{model}:{pretrained}"
    if pretrained is None:
        if model == MINI_NAME:
            return WeightsSpec(text, "builtin", arch=model, pretrained=MINI_TAG)
        return WeightsSpec(text, "hf-hub" if model.startswith(HF_HUB_PREFIX) else "default", arch=model)
    # the reserved names come before the file system: a folder named "random" in the working directory changes nothing
    if pretrained.lower() in RANDOM_TAGS:
        return WeightsSpec(text, "random", arch=model, pretrained=pretrained)
    if model == MINI_NAME and pretrained == MINI_TAG:
        return WeightsSpec(text, "builtin", arch=model, pretrained=pretrained)
    local = _path_spec(pretrained, model, pretrained)
    if local is not None:
        return local
    if model.startswith(HF_HUB_PREFIX):  # the hub model's own weights; a tag means nothing there
        return WeightsSpec(text, "hf-hub", arch=model, pretrained=pretrained)
    if hub_id(pretrained) is not None:  # open_clip tags have no slash: ORG/NAME is a hub id
        return WeightsSpec(text, "hf-repo", arch=model, pretrained=pretrained)
    return WeightsSpec(text, "tag", arch=model, pretrained=pretrained)


# ------------------------------------------------------------------------------------------------ folders
@dataclass(frozen=True)
class FolderWeights:
    """The weights file of a folder, as :func:`folder_weights` chose it.

    ``kind``: "open_clip" (tensors named the open_clip way), "transformers" (a transformers CLIP folder, read
    through ``tvtool.formats.transformers_clip``) or "peft" (a PEFT adapter: weight updates of a base model, read
    through ``tvtool.formats.peft_lora``). ``file``: a safetensors file, a pickle or a sharded index.
    """

    folder: Path
    kind: str
    file: Path
    model_type: str | None = None  # transformers: "clip" (CLIPModel) or "clip_vision_model" (CLIPVisionModel)

    @property
    def file_kind(self) -> str:
        return file_kind(self.file)

    @property
    def open_clip_config(self) -> Path | None:
        """The folder's ``open_clip_config.json`` (the architecture of its weights), if it has one."""
        path = self.folder / OPEN_CLIP_CONFIG
        return path if path.is_file() else None


def transformers_model_type(folder: str | os.PathLike) -> str | None:
    """The CLIP ``model_type`` of a transformers folder's config.json, or None when ``folder`` is not one."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return None
    doc = read_json(cfg, "a transformers config.json")
    kind = doc.get("model_type") if isinstance(doc, dict) else None
    return kind if kind in CLIP_MODEL_TYPES else None


def folder_weights(folder: str | os.PathLike) -> FolderWeights:
    """Which file of a folder holds its weights: the one place that decides it.

    A PEFT adapter folder (``adapter_config.json``) holds updates, not weights, whatever else lies beside them. Then
    open_clip's own files (hub repos often hold both namings: open_clip's is read as is), safetensors before
    pickles; a transformers CLIP folder without them is read through its config.json; then sharded indexes.
    """
    folder = Path(folder)
    if (folder / ADAPTER_CONFIG).is_file():
        for name in ADAPTER_FILES:
            if (folder / name).is_file():
                return FolderWeights(folder, "peft", folder / name)
        raise TVToolError(f"{folder}: PEFT adapter folder without {' or '.join(ADAPTER_FILES)}")
    model_type = transformers_model_type(folder)
    native = [n for n in FOLDER_FILES if n.startswith("open_clip") and (folder / n).is_file()]
    if model_type and not native:
        for name in TRANSFORMERS_FILES:
            if (folder / name).is_file():
                return FolderWeights(folder, "transformers", folder / name, model_type)
        raise TVToolError(f"{folder}: transformers folder without model.safetensors(.index.json) or "
                          "pytorch_model.bin")
    # in a transformers folder the generic names (model.safetensors, ...) hold transformers-named tensors
    for name in native if model_type else (*FOLDER_FILES, *FOLDER_INDEXES):
        if (folder / name).is_file():
            return FolderWeights(folder, "open_clip", folder / name)
    raise TVToolError(f"{folder}: folder holds none of {', '.join(FOLDER_FILES)}")
