"""Tiny random-init transformers CLIP models, and a Hugging Face hub cache fabricated from them (no network)."""
from __future__ import annotations

import hashlib
from pathlib import Path

TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=16)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                   patch_size=8)


def clip_model(seed: int = 0):
    """A random transformers ``CLIPModel`` (QuickGELU, as OpenAI's) with tiny dimensions."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=16)
    cfg.text_config.hidden_act = cfg.vision_config.hidden_act = "quick_gelu"
    return transformers.CLIPModel(cfg).eval()


def vision_model(seed: int = 0):
    """A random transformers ``CLIPVisionModel`` of the same tiny image tower (what FusionBench publishes)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION, hidden_act="quick_gelu")).eval()


def commit_of(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def cache_model(cache: Path, repo: str, model, revision: str | None = None, branch: str | None = "main") -> Path:
    """Save ``model`` into ``cache`` the way huggingface_hub lays a download out: the files in blobs/ (named by their
    hash), models--ORG--NAME/snapshots/COMMIT/ holding relative links to them, refs/BRANCH naming the commit.
    ``model``: anything with ``save_pretrained`` (a transformers model, a peft model). Returns the snapshot folder."""
    root = Path(cache) / ("models--" + repo.replace("/", "--"))
    commit = revision or commit_of(f"{repo}/{len(list((root / 'snapshots').glob('*'))) if root.exists() else 0}")
    snapshot = root / "snapshots" / commit
    model.save_pretrained(snapshot)
    (root / "blobs").mkdir(exist_ok=True)
    for f in sorted(snapshot.iterdir()):
        blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        f.replace(blob)
        f.symlink_to(Path("..", "..", "blobs", blob.name))
    if branch:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / branch).write_text(commit)
    return snapshot
