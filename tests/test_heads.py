"""Zero-shot heads against an independent per-prompt computation, the head cache, and ImageClassifier."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tvtool import defaults, heads, models
from tvtool.errors import TVToolError

from tiny_clip import register_tiny

TINY = "tvtool-test-tiny-heads"

@pytest.fixture(scope="module")
def bundle():
    register_tiny(TINY)
    torch.manual_seed(0)
    b = models.load_clip(TINY, "random", device="cpu")
    with torch.no_grad():
        b.model.logit_scale.fill_(math.log(37.0))  # not the init value, so a wrong scale cannot pass
    return b


def spec(templates=("a photo of a {c}.", "a drawing of the {c}", "{c}!"), classnames=("cat", "dog", "red car")):
    return SimpleNamespace(name="toy", classnames=list(classnames), templates=list(templates))


def reference_head(b, s):
    """Class by class, prompt by prompt, with plain torch ops."""
    rows = []
    with torch.no_grad():
        for c in s.classnames:
            embs = []
            for t in s.templates:
                tok = b.tokenizer([t.replace("{c}", c)])
                e = b.model.encode_text(tok)[0].double()
                embs.append(e / torch.sqrt((e * e).sum()))
            m = torch.stack(embs).mean(0)
            rows.append(m / torch.sqrt((m * m).sum()) * 37.0)
    return torch.stack(rows)


def test_head_matches_independent_computation(bundle):
    s = spec()
    head = heads.zero_shot_head(bundle, s, cache=False)
    assert head.shape == (3, 16) and head.dtype == torch.float32
    torch.testing.assert_close(head.double(), reference_head(bundle, s), rtol=1e-5, atol=1e-5)
    # rows have norm logit_scale.exp(); no bias anywhere
    torch.testing.assert_close(head.norm(dim=1), torch.full((3,), 37.0), rtol=1e-5, atol=1e-5)


def test_head_cache_hit_and_invalidation(bundle, monkeypatch):
    s = spec()
    first = heads.zero_shot_head(bundle, s)
    files = list((defaults.cache_root() / "heads").glob("toy-*.safetensors"))
    assert len(files) == 1

    calls = []
    real = models.encode_texts
    monkeypatch.setattr(models, "encode_texts", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = heads.zero_shot_head(bundle, s)
    assert calls == [] and torch.equal(again, first)  # served from the cache, no text encoding

    changed = spec(templates=("a photo of a {c}.", "a sketch of a {c}."))
    other = heads.zero_shot_head(bundle, changed)
    assert calls == [1]  # a template change is a cache miss
    torch.testing.assert_close(other.double(), reference_head(bundle, changed), rtol=1e-5, atol=1e-5)
    assert len(list((defaults.cache_root() / "heads").glob("toy-*.safetensors"))) == 2

    # a different text tower (same image tower fingerprint) must not reuse the cached head
    with torch.no_grad():
        bundle.model.text_projection.mul_(-1.0)
    try:
        flipped = heads.zero_shot_head(bundle, s)
        assert calls == [1, 1]
        torch.testing.assert_close(flipped, -first, rtol=1e-5, atol=1e-5)
    finally:
        with torch.no_grad():
            bundle.model.text_projection.mul_(-1.0)

    # a corrupt cache file is rebuilt, not trusted
    files[0].write_bytes(b"garbage")
    rebuilt = heads.zero_shot_head(bundle, s)
    assert calls == [1, 1, 1]
    torch.testing.assert_close(rebuilt, first)


def test_bad_templates_are_user_errors(bundle):
    with pytest.raises(TVToolError, match="placeholder"):
        heads.zero_shot_head(bundle, spec(templates=("a photo of a thing",)), cache=False)
    with pytest.raises(TVToolError, match="class name"):
        heads.zero_shot_head(bundle, spec(classnames=()), cache=False)
    with pytest.raises(TVToolError, match="brace"):
        heads.zero_shot_head(bundle, spec(templates=("a {c} in {place}",)), cache=False)


def test_image_classifier_logits_match_manual_formula(bundle):
    torch.manual_seed(2)
    head = torch.randn(5, 16)
    clf = heads.ImageClassifier(bundle.model.visual, head).eval()
    assert [n for n, _ in clf.named_parameters() if n.startswith("head")] == []  # frozen: a buffer
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        logits = clf(x)
        f = bundle.model.visual(x).double().numpy()
    f = f / np.sqrt((f ** 2).sum(axis=1, keepdims=True))
    ref = f @ head.double().numpy().T
    np.testing.assert_allclose(logits.numpy(), ref, rtol=1e-5, atol=1e-5)
    head[0, 0] = 123.0  # the classifier keeps its own copy
    assert clf.head[0, 0] != 123.0
