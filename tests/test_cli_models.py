"""`tvtool models` lists what open_clip would, without importing it; the shipped tag table is fresh."""
import json
import subprocess
import sys

import open_clip

import tvtool.models
from cli_helpers import run_tvtool
from tvtool.cli import models as models_cli


def _shipped_open_clip_models() -> list[str]:
    """open_clip.list_models() in a fresh interpreter: other tests in this worker register tiny models with it."""
    listed = subprocess.run([sys.executable, "-c", "import json, open_clip; print(json.dumps(open_clip.list_models()))"],
                            capture_output=True, text=True, check=True).stdout
    return [m for m in json.loads(listed) if m != tvtool.models.MINI_NAME]


def test_architectures_match_open_clip():
    assert models_cli.openclip_architectures() == _shipped_open_clip_models()


def test_shipped_pretrained_tags_are_fresh():
    """Fails after an open_clip upgrade changes its tags: regenerate with
    python -c "from tvtool.cli.models import write_pretrained_tags as w; w()" """
    shipped = json.loads(models_cli.PRETRAINED_TAGS_FILE.read_text())
    live: dict = {}
    for arch, tag in open_clip.list_pretrained():
        live.setdefault(arch, []).append(tag)
    assert shipped["tags"] == live, "stale tvtool/data/openclip_pretrained.json (see this test's docstring)"


def test_models_json_through_the_entry_point():
    r = run_tvtool("models", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["architecture"]: row["pretrained"] for row in json.loads(r.stdout)}
    assert rows["tvtool-mini"] == ["builtin"]
    assert rows["ViT-B-32"] == open_clip.list_pretrained_tags_by_model("ViT-B-32")
    shipped = _shipped_open_clip_models()
    assert len(rows) == len(shipped) + 1  # + tvtool-mini
    r = run_tvtool("models", "vit-l-14", "--json")
    assert {row["architecture"] for row in json.loads(r.stdout)} == {m for m in shipped if "vit-l-14" in m.lower()}
