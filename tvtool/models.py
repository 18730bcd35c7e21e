"""open_clip models: loading any architecture from a tag, a local file or folder, and the built-in ``tvtool-mini``.

What a ``--model`` / ``--pretrained`` pair names is decided by ``tvtool.weights_spec`` (the one spec parser, and the
one chooser of a folder's weights file); this module builds the model it names.

Only the visual tower is ever tuned; the text tower is used once per dataset to build the zero-shot heads
(``tvtool.heads``). Loading never hangs on the network: a registry tag is looked up in the local caches first, and
when it is not there and the machine is offline (``HF_HUB_OFFLINE=1`` / ``TVTOOL_OFFLINE=1`` or the host is
unreachable) the user gets one line that says how to pass a local file instead.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import torch

from .defaults import default_device
from .errors import TVToolError
from .formats import hf_hub, sharded, transformers_clip
from .formats.arch import register_builtin, register_config
from .formats.safe_pickle import load_pickle
from .safetensors_io import fingerprint
from .weights_spec import (
    HF_HUB_PREFIX, MINI_NAME, FolderWeights, WeightsSpec, folder_weights, looks_like_path, parse_pretrained,
)

DATA_DIR = Path(__file__).resolve().parent / "data"
MINI_WEIGHTS = DATA_DIR / f"{MINI_NAME}.safetensors"

_LOCAL_HINT = "pass a local file instead: --pretrained path/to/open_clip_model.safetensors (or an open_clip folder)"


@dataclass
class ClipBundle:
    """A loaded CLIP model (eval mode) with what is needed to feed it and to identify it."""

    model: torch.nn.Module
    tokenizer: object
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    pretrained: str
    fingerprint: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def list_models() -> list[str]:
    """Every open_clip architecture name (``tvtool-mini`` included)."""
    return register_builtin().list_models()


def _unknown_model(name: str) -> TVToolError:
    names = list_models()
    lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), list(lower), n=5, cutoff=0.5)
    close = [lower[c] for c in close]
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {MINI_NAME}, ViT-B-32, ViT-B-16, ViT-L-14, ..."
    return TVToolError(f"unknown model architecture {name!r}; {hint} (open_clip.list_models() has all {len(names)})")


def _cached_tag_file(cfg: dict, cache_dir: str | None) -> str | None:
    """The local copy of a registry tag's weights, if any cache already holds it (no network)."""
    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo_id, filename = os.path.split(hub)
            filename = filename or "open_clip_pytorch_model.bin"
            candidates = [filename]
            if filename.endswith((".bin", ".pth")):  # open_clip prefers the safetensors twin
                candidates.insert(0, "open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin"
                                  else filename[:-4] + ".safetensors")
            for fn in candidates:
                found = try_to_load_from_cache(repo_id, fn, cache_dir=cache_dir)
                if isinstance(found, str) and os.path.isfile(found):
                    return found
    url = cfg.get("url", "")
    if url:
        path = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(urlparse(url).path)
        if path.is_file():
            return str(path)
    return None


def _download_tag(name: str, tag: str, cfg: dict, cache_dir: str | None) -> str:
    from open_clip.pretrained import download_pretrained

    what = f"pretrained weights {name}:{tag} are not in the local cache"
    if hf_hub.is_offline():
        raise TVToolError(f"{what} and downloads are disabled (offline mode); {_LOCAL_HINT}")
    host = "huggingface.co" if cfg.get("hf_hub") else urlparse(cfg.get("url", "")).hostname or "huggingface.co"
    if not hf_hub.reachable(host):
        raise TVToolError(f"{what} and {host} is unreachable (offline?); {_LOCAL_HINT}")
    try:
        path = download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as exc:  # hub / HTTP errors come in many types; all mean "could not download"
        raise TVToolError(f"{what} and the download failed ({type(exc).__name__}); {_LOCAL_HINT}") from None
    if not path or not os.path.isfile(path):
        raise TVToolError(f"{what} and the download gave no file; {_LOCAL_HINT}")
    return path


def _weights_file(path: Path, kind: str, trust_pickle: bool) -> Path | dict:
    """A weights file as ``_load_weights`` takes it: safetensors by path; a pickle read by tvtool's restricted
    unpickler (runs no code; ``trust_pickle`` only as its announced fallback), as ``open_weights`` reads it; a
    sharded index as one state dict."""
    if kind == "pickle":
        return load_pickle(path, trust_pickle)
    if kind == "index":
        source = sharded.open_index(path, {"model": None, "pretrained": str(path)})
        return {k: source.get(k) for k in source.keys()}
    return path


def _transformers_weights(folder: Path, trust_pickle: bool) -> tuple[str, dict]:
    """(open_clip architecture, state dict) of a transformers CLIP folder; its architecture comes from config.json."""
    source = transformers_clip.open_folder(folder, trust_pickle=trust_pickle)
    cfg = source.config.open_clip
    if "text_cfg" not in cfg:
        raise TVToolError(f"{folder}: a vision-only transformers folder (CLIPVisionModel) has no text tower for the "
                          "zero-shot heads; pass the full base model here and use this folder as a fine-tuned model")
    arch = source.describe["model"] or register_config(cfg)
    return arch, {k: v.contiguous() for k, v in source.items()}


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_warning():
    """open_clip warns "initialized randomly" because tvtool loads the weights itself, right after creation."""
    root = logging.getLogger()
    filt = _DropRandomInitWarning()
    root.addFilter(filt)
    try:
        yield
    finally:
        root.removeFilter(filt)


def _load_weights(model: torch.nn.Module, path: str | Path | dict, arch: str) -> None:
    from open_clip import load_checkpoint

    try:
        if isinstance(path, dict):  # already converted (transformers folder, whole-module pickle)
            model.load_state_dict(path, strict=True)
            path = "the converted weights"
        else:
            # weights_only=True: even a trusted pickle is read with torch's restricted unpickler.
            load_checkpoint(model, str(path), strict=True, weights_only=True)
    except Exception as exc:  # key/shape mismatches (RuntimeError, open_clip's asserts), unreadable files, ...
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        detail = " ".join(line.strip() for line in lines[:2])[:200]
        raise TVToolError(f"{path}: cannot load these weights into {arch} ({type(exc).__name__}: {detail}); "
                          "check that --model matches the weights") from None


def load_clip(model_name: str, pretrained: str | os.PathLike | None = None, device: str | None = None,
              cache_dir: str | None = None, *, trust_pickle: bool = False) -> ClipBundle:
    """Build an open_clip model and load its weights; returns a :class:`ClipBundle` in eval mode.

    ``pretrained``: an open_clip tag (``openai``, ``laion2b_s34b_b79k``, ...), a ``.safetensors`` state dict, an
    open_clip folder (``open_clip_config.json`` + weights), a transformers CLIP folder or its Hugging Face hub id
    (``ORG/NAME[@REVISION]``, from the local hub cache or downloaded), a pickle (read without running code),
    ``random`` for a random initialisation, or None: ``builtin`` for ``tvtool-mini``; any other architecture needs it.
    """
    open_clip = register_builtin()
    device = device or default_device()
    spec = parse_pretrained(model_name, pretrained)
    hub_label = None
    if spec.kind == "hf-repo":  # a hub id is the folder it resolves to, recorded by its id
        folder_path, hub_label = hf_hub.resolve(spec.pretrained)
        spec = replace(spec, kind="folder", path=folder_path)
    folder = folder_weights(spec.path) if spec.kind == "folder" else None
    if folder is not None and folder.kind == "peft":
        raise TVToolError(f"{spec.path}: a PEFT adapter holds weight updates, not a model; pass its base model "
                          f"here, or merge it first: tvtool convert {spec.path} -o merged.safetensors")
    create = {"pretrained": None, "device": "cpu"}
    converted = folder is not None and folder.kind == "transformers"
    if converted:  # the folder's config.json names the architecture
        model_name, state = _transformers_weights(spec.path, trust_pickle)
    arch = model_name  # what open_clip builds
    if model_name.startswith(HF_HUB_PREFIX):  # open_clip reads the config (and maybe weights) from the hub
        _check_hub_reachable(model_name)
    elif folder is not None and folder.kind == "open_clip" and folder.open_clip_config:
        arch = "local-dir:" + str(spec.path)  # the folder's own config describes its weights
        create["load_weights"] = False
    elif model_name not in open_clip.list_models():
        raise _unknown_model(model_name)
    if converted:
        ckpt, label = state, str(spec.path.resolve())
    else:
        ckpt, label = _weights(open_clip, spec, folder, create, cache_dir, trust_pickle)
    label = hub_label or label

    try:
        with _quiet_random_init_warning():
            model = open_clip.create_model(arch, **create)
    except Exception as exc:  # RuntimeError/ValueError/FileNotFoundError, and for hf-hub: any download error
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise TVToolError(f"cannot build {model_name}: {first[:200]}") from None
    if ckpt is not None:
        _load_weights(model, ckpt, model_name)
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(arch)

    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return ClipBundle(
        model=model, tokenizer=tokenizer, image_size=int(size),
        mean=tuple(float(x) for x in pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(float(x) for x in pp.get("std", open_clip.OPENAI_DATASET_STD)),
        name=model_name, pretrained=label, fingerprint=fingerprint(model.state_dict()),
    )


def _weights(open_clip, spec: WeightsSpec, folder: FolderWeights | None, create: dict, cache_dir: str | None,
             trust_pickle: bool) -> tuple[str | Path | dict | None, str]:
    """(what to load into the created model, the label recorded as its pretrained weights) of a spec; ``create``
    (open_clip.create_model's keywords) is completed where the weights need it."""
    model_name = spec.arch
    if spec.kind == "hf-hub":
        create["load_weights"] = True  # open_clip fetches the hub model's own weights
        return None, model_name
    if spec.kind == "default":  # a real architecture never silently evaluates or trains a random initialisation
        raise _no_weights(open_clip, model_name)
    if spec.kind == "random":
        return None, "random"
    if spec.kind == "builtin":
        if not MINI_WEIGHTS.is_file():
            raise TVToolError(f"{MINI_WEIGHTS} is missing; rebuild it with `python scripts/pretrain_mini.py`")
        return MINI_WEIGHTS, spec.pretrained
    if folder is not None:
        return _weights_file(folder.file, folder.file_kind, trust_pickle), spec.pretrained
    if spec.path is not None:
        label = str(spec.path.resolve()) if spec.kind == "pickle" else spec.pretrained
        return _weights_file(spec.path, spec.kind, trust_pickle), label
    # a registry tag
    cfg = _pretrained_cfg(open_clip, model_name, spec.pretrained)
    ckpt = _cached_tag_file(cfg, cache_dir) or _download_tag(model_name, spec.pretrained, cfg, cache_dir)
    # The tag knows how its weights were trained: QuickGELU (OpenAI) and the normalisation statistics.
    create["force_quick_gelu"] = bool(cfg.get("quick_gelu", False))
    pp = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    if pp:
        create["force_preprocess_cfg"] = pp
    return ckpt, spec.pretrained


def _no_weights(open_clip, model_name: str) -> TVToolError:
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    known = f"one of its pretrained tags ({', '.join(tags)})" if tags else "a weights file"
    return TVToolError(f"{model_name}: no pretrained weights given; name {known}, a local open_clip .safetensors "
                       f"file or folder, or `random` for a random initialisation (--pretrained X, or {model_name}:X "
                       "where a weights spec is asked for)")


def _pretrained_cfg(open_clip, model_name: str, tag: str) -> dict:
    """open_clip's registry entry of ``model_name:tag``; a one-line error naming the known tags (or "no such file"
    for what was meant as a path) when there is none."""
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        if looks_like_path(tag):
            raise TVToolError(f"{tag}: no such file")
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        known = ", ".join(tags) if tags else "none (pass a local weights file)"
        raise TVToolError(f"unknown pretrained tag {tag!r} for {model_name}; known tags: {known}")
    return cfg


def check_pretrained(model: str, pretrained: str | os.PathLike | None) -> None:
    """Fail before any model is built when ``pretrained`` names neither an existing file or folder nor a known tag
    of ``model`` (no download, no model built)."""
    spec = parse_pretrained(model, pretrained)
    if spec.kind in ("random", "builtin") or spec.path is not None:
        return
    if spec.kind == "hf-repo":
        hf_hub.check_available(spec.pretrained)
        return
    if spec.kind == "tag" and looks_like_path(spec.pretrained):
        raise TVToolError(f"--pretrained {spec.pretrained}: no such file")
    open_clip = register_builtin()
    if spec.kind != "hf-hub" and model not in open_clip.list_models():
        raise _unknown_model(model)
    if spec.kind == "default":
        raise _no_weights(open_clip, model)
    if spec.kind == "tag":
        _pretrained_cfg(open_clip, model, spec.pretrained)


def _check_hub_reachable(name: str) -> None:
    what = f"{name} must be downloaded from the Hugging Face hub"
    if hf_hub.is_offline():
        raise TVToolError(f"{what} and downloads are disabled (offline mode); {_LOCAL_HINT}")
    if not hf_hub.reachable("huggingface.co"):
        raise TVToolError(f"{what} and huggingface.co is unreachable (offline?); {_LOCAL_HINT}")


def visual_state_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of the image tower: the only weights tvtool tunes and stores in task vectors."""
    return [k for k in model.state_dict() if k.startswith("visual.")]


@torch.no_grad()
def encode_texts(bundle: ClipBundle, texts: list[str], batch_size: int = 512) -> torch.Tensor:
    """L2-normalised text embeddings [N, D] (fp32, on the model's device), encoded in batches without grad."""
    if not texts:
        raise TVToolError("no texts to encode; check the dataset's class names and templates")
    device = bundle.device
    tokens = bundle.tokenizer(texts)  # tokenised once for all texts: one BPE pass, no per-batch overhead
    out = []
    for start in range(0, tokens.shape[0], batch_size):
        emb = bundle.model.encode_text(tokens[start:start + batch_size].to(device)).float()
        out.append(torch.nn.functional.normalize(emb, dim=-1))
    return torch.cat(out)

