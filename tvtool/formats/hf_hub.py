"""Models named by their Hugging Face hub id (``ORG/NAME``, ``ORG/NAME@REVISION``): the local cache, then a download.

The cache has huggingface_hub's layout: ``$HF_HUB_CACHE`` (else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``) holds ``models--ORG--NAME/snapshots/COMMIT/`` folders and ``refs/BRANCH`` files naming
the commit a branch points to (``main`` when no revision is given). A cached snapshot is used as it is, without
asking the hub whether the branch moved: looking it up needs neither a library nor the network. Only a download
imports huggingface_hub (installed with transformers and open_clip); it fetches config.json and the weights, nothing
else, into the same cache, so that the next run finds them offline.

Which text is a hub id is decided by ``tvtool.weights_spec.hub_id`` (an existing local path always wins); this module
turns one into a local folder, read like any other (``tvtool.weights_spec.folder_weights``).
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from ..errors import TVToolError
from ..fileio import read_bytes
from ..weights_spec import folder_weights, hub_id, transformers_model_type

OFFLINE_ENV = ("TVTOOL_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
HUB_HOST = "huggingface.co"
# What a download asks for: the config and the weights of a transformers folder (single file or sharded), never
# the tokenizer, the processor or the other frameworks' weights.
WEIGHT_PATTERNS = ("config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
PICKLE_PATTERNS = ("config.json", "pytorch_model.bin")  # old repos without safetensors: read by the safe unpickler
INSTALL_HINT = "downloading from the Hugging Face hub needs huggingface_hub: pip install huggingface_hub"
_COMMIT = re.compile(r"[0-9a-f]{40}")


def is_offline() -> bool:
    """Whether the user turned downloads off (``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``, ``TVTOOL_OFFLINE=1``)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_ENV)


def reachable(host: str = HUB_HOST, timeout: float = 5.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub finds it from the environment."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def _has_weights(folder: Path) -> bool:
    try:
        folder_weights(folder)
    except TVToolError:
        return False
    return True


def cached_snapshot(repo: str, revision: str | None = None) -> Path | None:
    """The cached snapshot of ``repo`` at ``revision`` (a commit, or a branch or tag that ``refs/`` names; default
    ``main``) when it holds weights, else None. Reads the file system only."""
    root = hub_cache() / ("models--" + repo.replace("/", "--"))
    revision = revision or "main"
    commit = revision if _COMMIT.fullmatch(revision) else None
    if commit is None:
        ref = root / "refs" / revision
        try:
            # a ref holds a 40-character commit: read at most a little of it, never a FIFO
            commit = read_bytes(ref, "a hub ref", 256).decode("ascii").strip() if ref.is_file() else None
        except (TVToolError, UnicodeDecodeError):
            commit = None
    if not commit or "/" in commit or commit in (".", ".."):
        return None
    snapshot = root / "snapshots" / commit
    return snapshot if snapshot.is_dir() and _has_weights(snapshot) else None


def fetch_hint(repo: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (f"fetch it where the hub is reachable with `hf download {repo}{rev} config.json model.safetensors` "
            "(into the same cache; HF_HUB_CACHE chooses it), or pass a local folder")


def resolve(text: str) -> tuple[Path, str]:
    """(local folder, label) of a hub id: the cached snapshot, else a download. The label ``ORG/NAME@COMMIT`` is what
    a task vector records as its base: it names the same weights on any machine."""
    parsed = hub_id(text)
    if parsed is None:
        raise TVToolError(f"{text}: not a Hugging Face hub id (ORG/NAME or ORG/NAME@REVISION)")
    repo, revision = parsed
    folder = cached_snapshot(repo, revision) or _download(text, repo, revision)
    return folder, f"{repo}@{folder.name}"


def check_available(text: str) -> None:
    """Fail fast (no download) when a hub id is not cached and cannot be downloaded."""
    repo, revision = hub_id(text)
    if cached_snapshot(repo, revision) is None:
        _check_can_download(text, repo, revision)


def _check_can_download(text: str, repo: str, revision: str | None) -> None:
    what = (f"{text}: neither a local file or folder nor a model in the Hugging Face cache ({hub_cache()})")
    if is_offline():
        raise TVToolError(f"{what}, and downloads are disabled (offline mode); {fetch_hint(repo, revision)}")
    if not reachable():
        raise TVToolError(f"{what}, and {HUB_HOST} is unreachable (offline?); {fetch_hint(repo, revision)}")


def _snapshot_download(repo: str, revision: str | None, patterns) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise TVToolError(INSTALL_HINT) from None
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=list(patterns)))
    except Exception as exc:  # not found, gated, HTTP and network errors come in many types
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise TVToolError(f"{repo}: no such local file or folder, and its download from the Hugging Face hub failed "
                          f"({type(exc).__name__}: {first}); check the name, and `hf auth login` for gated models"
                          ) from None


def _download(text: str, repo: str, revision: str | None) -> Path:
    _check_can_download(text, repo, revision)
    folder = _snapshot_download(repo, revision, WEIGHT_PATTERNS)
    if not (folder / "config.json").is_file():
        raise TVToolError(f"{repo}: the hub repository has no config.json, so it is no transformers model; an "
                          f"open_clip model on the hub is named hf-hub:{repo}")
    if transformers_model_type(folder) is None:
        raise TVToolError(f"{repo}: not a transformers CLIP model (config.json's model_type is neither clip nor "
                          f"clip_vision_model); an open_clip model on the hub is named hf-hub:{repo}")
    if not _has_weights(folder):
        folder = _snapshot_download(repo, revision, PICKLE_PATTERNS)
    if not _has_weights(folder):
        raise TVToolError(f"{repo}: the hub repository holds no model.safetensors(.index.json) or pytorch_model.bin")
    return folder
