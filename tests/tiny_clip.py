"""A tiny open_clip architecture for tests that need a real CLIP but no weights."""
import json
import tempfile
from pathlib import Path

TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def register_tiny(name: str) -> str:
    """Register the tiny config with open_clip under ``name`` (once) and return the name."""
    import open_clip

    if name not in open_clip.list_models():
        path = Path(tempfile.mkdtemp()) / f"{name}.json"
        path.write_text(json.dumps(TINY_CFG))
        open_clip.add_model_config(path)
    return name
