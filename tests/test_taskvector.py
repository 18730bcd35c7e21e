"""Task-vector files: arithmetic against plain torch, round trips, metadata, and every bad input."""
import json
import math
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from tvtool import taskvector as tv
from tvtool.checkpoints import open_weights
from tvtool.safetensors_io import fingerprint
from tvtool.errors import TVToolError


def _state(seed, with_text=True):
    g = torch.Generator().manual_seed(seed)
    s = {
        "visual.conv1.weight": torch.randn(8, 3, 4, 4, generator=g),
        "visual.transformer.resblocks.0.attn.in_proj_weight": torch.randn(48, 16, generator=g),
        "visual.transformer.resblocks.0.attn.in_proj_bias": torch.randn(48, generator=g),
        "visual.proj": torch.randn(16, 8, generator=g),
        "logit_scale": torch.tensor(4.6),
    }
    if with_text:
        s["token_embedding.weight"] = torch.randn(20, 8, generator=g)
    return s


@pytest.fixture
def files(tmp_path):
    base = _state(0)
    fts = []
    for i in range(3):
        g = torch.Generator().manual_seed(100 + i)
        ft = {k: (v + 0.1 * torch.randn(v.shape, generator=g) if k.startswith("visual.") else v.clone())
              for k, v in base.items()}
        fts.append(ft)
    save_file(base, tmp_path / "base.safetensors")
    vecs = []
    for i, ft in enumerate(fts):
        save_file(ft, tmp_path / f"ft{i}.safetensors")
        out = tmp_path / f"t{i}.st"
        tv.extract(str(tmp_path / "base.safetensors"), str(tmp_path / f"ft{i}.safetensors"), out, tasks=[f"task{i}"])
        vecs.append(out)
    return tmp_path, base, fts, vecs


def test_extract_matches_difference_and_skips_unchanged(files):
    tmp, base, fts, vecs = files
    got = load_file(vecs[0])
    expected_keys = {k for k in base if k.startswith("visual.")}
    assert set(got) == expected_keys  # logit_scale and text are unchanged, so not stored
    for k in expected_keys:
        torch.testing.assert_close(got[k], fts[0][k] - base[k], rtol=0, atol=0)


def test_extract_all_keeps_every_shared_tensor(files, tmp_path):
    tmp, base, fts, _ = files
    out = tmp / "all.st"
    tv.extract(str(tmp / "base.safetensors"), str(tmp / "ft0.safetensors"), out, keep_all=True)
    assert set(load_file(out)) == set(base)
    assert torch.count_nonzero(load_file(out)["logit_scale"]) == 0


def test_add_negate_scale_against_plain_torch(files):
    tmp, base, fts, vecs = files
    plain = [load_file(v) for v in vecs]
    tv.add(vecs, tmp / "sum.st", alpha=0.3)
    tv.add(vecs, tmp / "w.st", weights=[0.3, -0.5, 2.0])
    tv.negate(vecs[1], tmp / "neg.st", alpha=0.7)
    s, w, n = load_file(tmp / "sum.st"), load_file(tmp / "w.st"), load_file(tmp / "neg.st")
    for k in plain[0]:
        torch.testing.assert_close(s[k], 0.3 * (plain[0][k] + plain[1][k] + plain[2][k]))
        torch.testing.assert_close(w[k], 0.3 * plain[0][k] - 0.5 * plain[1][k] + 2.0 * plain[2][k])
        torch.testing.assert_close(n[k], -0.7 * plain[1][k])


def test_apply_then_extract_round_trip(files):
    tmp, base, fts, vecs = files
    tv.apply(str(tmp / "base.safetensors"), [vecs[0]], tmp / "model.safetensors", alpha=1.0)
    model = load_file(tmp / "model.safetensors")
    assert set(model) == set(base)  # a full state dict, loadable as a model
    for k in base:
        torch.testing.assert_close(model[k], fts[0][k], rtol=0, atol=1e-6)
    tv.extract(str(tmp / "base.safetensors"), str(tmp / "model.safetensors"), tmp / "again.st")
    again, orig = load_file(tmp / "again.st"), load_file(vecs[0])
    for k in orig:
        torch.testing.assert_close(again[k], orig[k], rtol=0, atol=1e-6)


def test_apply_alpha_sum(files):
    tmp, base, fts, vecs = files
    tv.apply(str(tmp / "base.safetensors"), vecs[:2], tmp / "m.safetensors", alpha=0.5)
    m = load_file(tmp / "m.safetensors")
    k = "visual.proj"
    torch.testing.assert_close(m[k], base[k] + 0.5 * ((fts[0][k] - base[k]) + (fts[1][k] - base[k])))


def test_metadata_round_trip_and_history(files):
    tmp, base, fts, vecs = files
    tv.add(vecs[:2], tmp / "ab.st", alpha=0.4)
    tv.negate(tmp / "ab.st", tmp / "nab.st")
    v = tv.open_vector(tmp / "nab.st")
    meta = v.meta
    assert meta["format"] == "tvtool.taskvector" and meta["format_version"] == 1
    assert meta["base"]["fingerprint"] == fingerprint(open_weights(str(tmp / "base.safetensors")))
    assert meta["tasks"] == ["task0", "task1"]
    (neg,) = meta["history"]
    assert neg["op"] == "negate" and neg["coefficients"] == [-1.0]
    (inner,) = neg["inputs"]
    assert inner["history"][0]["op"] == "add" and inner["history"][0]["alpha"] == 0.4
    assert [i["fingerprint"] for i in inner["history"][0]["inputs"]] == [
        tv.open_vector(p).fingerprint for p in vecs[:2]]
    # the stored fingerprint is the content fingerprint computed independently from the tensors
    assert v.fingerprint == fingerprint(load_file(tmp / "nab.st"), visual_only=False)


def test_write_vector_custom_meta_round_trip(tmp_path):
    t = {"visual.w": torch.randn(3, 4)}
    meta = tv.new_meta({"model": "ViT-B-32", "pretrained": "openai", "fingerprint": "fp1:x"}, tasks=["cars"],
                       mode="attn", orthoreg={"lambda": 1e-4, "form": "squared"}, metrics={"test_acc": 0.9})
    tv.write_vector(tmp_path / "v.st", t, meta)
    v = tv.open_vector(tmp_path / "v.st")
    for key in ("base", "tasks", "mode", "orthoreg", "metrics"):
        assert v.meta[key] == meta[key]


def test_dtype_kept_and_converted(files):
    tmp, base, fts, vecs = files
    tv.add(vecs, tmp / "bf.st", dtype=torch.bfloat16)
    tv.add([tmp / "bf.st"], tmp / "bf2.st")  # kept
    f = tv.open_vector(tmp / "bf2.st")
    assert {f.dtype(k) for k in f.keys()} == {torch.bfloat16}
    ref = sum(load_file(v)["visual.proj"] for v in vecs)
    torch.testing.assert_close(load_file(tmp / "bf.st")["visual.proj"].float(), ref, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------------------- bad input
def _no_temp_left(folder):
    return not [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_refuses_existing_output_without_force(files):
    tmp, _, _, vecs = files
    tv.add(vecs, tmp / "o.st")
    before = (tmp / "o.st").read_bytes()
    with pytest.raises(TVToolError, match="already exists"):
        tv.add(vecs, tmp / "o.st", alpha=2.0)
    assert (tmp / "o.st").read_bytes() == before
    tv.add(vecs, tmp / "o.st", alpha=2.0, force=True)
    assert (tmp / "o.st").read_bytes() != before


def test_mismatched_base_fingerprint(files, tmp_path):
    tmp, base, fts, vecs = files
    other = {k: v + 1 for k, v in base.items()}
    save_file(other, tmp / "base2.safetensors")
    tv.extract(str(tmp / "base2.safetensors"), str(tmp / "ft0.safetensors"), tmp / "x.st")
    with pytest.raises(TVToolError, match="different base"):
        tv.add([vecs[0], tmp / "x.st"], tmp / "bad.st")
    assert not (tmp / "bad.st").exists() and _no_temp_left(tmp)
    with pytest.raises(TVToolError, match="taken against base"):
        tv.apply(str(tmp / "base2.safetensors"), [vecs[0]], tmp / "bad.safetensors")


def test_different_tensor_sets_and_shapes(files):
    tmp, base, fts, vecs = files
    full = load_file(vecs[0])
    meta = tv.open_vector(vecs[0]).meta
    tv.write_vector(tmp / "fewer.st", {"visual.proj": full["visual.proj"]}, meta)
    with pytest.raises(TVToolError, match="different tensor sets"):
        tv.add([vecs[0], tmp / "fewer.st"], tmp / "bad.st")
    tv.add([vecs[0], tmp / "fewer.st"], tmp / "u.st", union=True)
    torch.testing.assert_close(load_file(tmp / "u.st")["visual.proj"], 2 * full["visual.proj"])
    torch.testing.assert_close(load_file(tmp / "u.st")["visual.conv1.weight"], full["visual.conv1.weight"])
    tv.write_vector(tmp / "shape.st", {**full, "visual.proj": torch.zeros(8, 16)}, meta)
    with pytest.raises(TVToolError, match="different shapes"):
        tv.add([vecs[0], tmp / "shape.st"], tmp / "bad.st")


def test_nan_input_refused_without_output(files):
    tmp, base, fts, vecs = files
    full = load_file(vecs[0])
    full["visual.proj"][0, 0] = float("nan")
    tv_meta = tv.open_vector(vecs[0]).meta
    with pytest.raises(TVToolError, match="NaN"):
        tv.write_vector(tmp / "nan.st", full, tv_meta)
    assert not (tmp / "nan.st").exists() and _no_temp_left(tmp)
    # a NaN that reaches a file anyway (written by another tool) is caught when combined
    save_file(full, tmp / "nan_raw.st", metadata={"tvtool": json.dumps(tv_meta)})
    with pytest.raises(TVToolError, match="NaN"):
        tv.add([vecs[0], tmp / "nan_raw.st"], tmp / "bad.st")
    assert not (tmp / "bad.st").exists() and _no_temp_left(tmp)


def test_truncated_and_foreign_files(files):
    tmp, base, fts, vecs = files
    data = vecs[0].read_bytes()
    (tmp / "trunc.st").write_bytes(data[: len(data) - 100])
    with pytest.raises(TVToolError, match="truncated"):
        tv.open_vector(tmp / "trunc.st")
    (tmp / "junk.st").write_bytes(b"hello world, not safetensors at all")
    with pytest.raises(TVToolError, match="not a safetensors"):
        tv.open_vector(tmp / "junk.st")
    (tmp / "badjson.st").write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(TVToolError, match="not JSON"):
        tv.open_vector(tmp / "badjson.st")
    with pytest.raises(TVToolError, match="not a tvtool task vector"):
        tv.open_vector(tmp / "base.safetensors")
    with pytest.raises(TVToolError, match="no such file"):
        tv.open_vector(tmp / "missing.st")


def test_pickle_is_read_without_trust(tmp_path):
    # the restricted unpickler runs nothing (tests/test_formats_pickle.py), so a plain pickle needs no opt-in
    base, ft = _state(0), _state(1)
    save_file(base, tmp_path / "base.safetensors")
    torch.save(ft, tmp_path / "ft.pt")
    tv.extract(str(tmp_path / "base.safetensors"), str(tmp_path / "ft.pt"), tmp_path / "v.st")
    torch.testing.assert_close(load_file(tmp_path / "v.st")["visual.proj"], ft["visual.proj"] - base["visual.proj"])


def test_fingerprint_ignores_dtype_and_text_tower():
    s = _state(3)
    half = {k: v.half() if v.is_floating_point() else v for k, v in s.items()}
    back = {k: v.float() for k, v in half.items()}
    no_text = {k: v for k, v in back.items() if k.startswith("visual.")}
    assert fingerprint(half) == fingerprint(back) == fingerprint(no_text)
    changed = dict(back)
    changed["visual.proj"] = changed["visual.proj"] + 1
    assert fingerprint(changed) != fingerprint(back)


def test_streaming_reads_zero_copy_views(files):
    tmp, base, fts, vecs = files
    v = tv.open_vector(vecs[0])
    t = v.get("visual.proj")
    assert v.get("visual.proj").data_ptr() == t.data_ptr()  # a view of the mapping each time, never a copy
    expected = load_file(vecs[0])["visual.proj"]
    torch.testing.assert_close(t, expected, rtol=0, atol=0)
    assert math.isclose(float(t.sum()), float(expected.sum()))


# ----------------------------------------------------------------------------------------- numpy core
def test_file_commands_need_no_torch(files):
    """add / negate / apply / extract / summary run on numpy alone (import torch costs seconds of start-up)."""
    import subprocess
    import sys
    from pathlib import Path

    tmp, base, fts, vecs = files
    script = f"""
import sys
from tvtool import taskvector as tv, inspection
tv.add({[str(v) for v in vecs]!r}, {str(tmp / 'np_sum.st')!r}, alpha=0.3, dtype="bf16")
tv.apply({str(tmp / 'base.safetensors')!r}, {[str(v) for v in vecs[:2]]!r}, {str(tmp / 'np_model.st')!r}, alpha=0.5)
tv.extract({str(tmp / 'base.safetensors')!r}, {str(tmp / 'ft1.safetensors')!r}, {str(tmp / 'np_t1.st')!r})
inspection.summary({str(tmp / 'np_sum.st')!r})
assert "torch" not in sys.modules, "torch was imported"
"""
    root = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={"PYTHONPATH": root})
    assert r.returncode == 0, r.stderr
    plain = [load_file(v) for v in vecs]
    s = load_file(tmp / "np_sum.st")
    for k in plain[0]:
        ref = (plain[0][k] * 0.3 + plain[1][k] * 0.3 + plain[2][k] * 0.3).bfloat16()
        assert torch.equal(s[k], ref)  # fp32 accumulation, then torch's rounding to bf16, bit for bit
    m = load_file(tmp / "np_model.st")
    k = "visual.proj"
    torch.testing.assert_close(m[k], base[k] + 0.5 * ((fts[0][k] - base[k]) + (fts[1][k] - base[k])))
    assert torch.equal(load_file(tmp / "np_t1.st")[k], fts[1][k] - base[k])
    assert tv.open_vector(tmp / "np_t1.st").fingerprint == tv.open_vector(vecs[1]).fingerprint


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_numpy_fingerprint_equals_torch_fingerprint(tmp_path, dtype):
    g = torch.Generator().manual_seed(5)
    state = {"visual.a": torch.randn(1000, 77, generator=g).to(dtype), "visual.b": torch.randn(5, generator=g).to(dtype),
             "visual.c": torch.randn(3, 1031, generator=g).to(dtype), "visual.i": torch.arange(4)}
    save_file(state, tmp_path / "s.safetensors")
    from_file = fingerprint(open_weights(str(tmp_path / "s.safetensors")))  # numpy views of the file
    assert from_file == fingerprint(state)  # torch tensors
    # the sample positions are torch.linspace's, so fingerprints of existing files did not change
    from tvtool.safetensors_io import FINGERPRINT_SAMPLES, _sample_indices
    for n in [1025, 1031, 3093, 77000, 768 * 3072, 4096 * 1024, 10**9 + 7]:
        ref = torch.linspace(0, n - 1, FINGERPRINT_SAMPLES, dtype=torch.float64).round().long().numpy()
        assert (_sample_indices(n) == ref).all(), n


def test_bf16_fp16_conversions_round_like_torch():
    import numpy as np

    from tvtool.safetensors_io import from_float32, tensor_to_array, to_float32

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50000, generator=g) * torch.logspace(-40, 38, 50000)
    x[:4] = torch.tensor([1.00390625, 1.01171875, -1.00390625, 65520.0])  # exact ties and fp16 overflow
    a, code = tensor_to_array(x)
    assert code == "F32"
    with np.errstate(over="ignore"):
        assert (from_float32(a, "BF16") == tensor_to_array(x.bfloat16())[0]).all()
        assert (from_float32(a, "F16") == x.half().numpy()).all()
    assert (to_float32(from_float32(a, "BF16"), "BF16") == x.bfloat16().float().numpy()).all()


def test_blockwise_arithmetic_across_blocks_and_dtypes(tmp_path):
    """Tensors longer than one block, mixed input dtypes: the same numbers torch computes term by term."""
    from tvtool.taskvector import BLOCK

    g = torch.Generator().manual_seed(9)
    n = 2 * BLOCK + 12345
    base = {"visual.w": torch.randn(n, generator=g), "visual.b": torch.randn(7, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    base_fp = fingerprint(base)
    vecs = []
    for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16]):
        t = {k: (torch.randn(v.shape, generator=g) * 1e-2).to(dtype) for k, v in base.items()}
        tv.write_vector(tmp_path / f"v{i}.st", t, tv.new_meta({"fingerprint": base_fp}))
        vecs.append(t)
    w = [0.3, -1.5, 2.0]
    tv.add([tmp_path / f"v{i}.st" for i in range(3)], tmp_path / "s.st", weights=w, dtype="fp32")
    ref = vecs[0]["visual.w"].float() * w[0]
    for t, wi in zip(vecs[1:], w[1:]):
        ref = ref + t["visual.w"].float() * wi
    assert torch.equal(load_file(tmp_path / "s.st")["visual.w"], ref)
    tv.apply(str(tmp_path / "base.safetensors"), [tmp_path / f"v{i}.st" for i in range(3)], tmp_path / "m.st",
             alpha=0.5)
    total = sum(t["visual.w"].float() for t in vecs)
    torch.testing.assert_close(load_file(tmp_path / "m.st")["visual.w"], base["visual.w"] + 0.5 * total,
                               rtol=0, atol=1e-6)


def test_blockwise_sum_split_across_threads_is_bit_identical(monkeypatch):
    """Large tensors are summed by several threads on block boundaries: the result must not depend on the split."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = tv.BLOCK * 9 + 17
    terms = [(rng.standard_normal(n).astype(np.float32), "F32", w) for w in (0.3, 0.3, -1.7)]
    terms.append((rng.standard_normal(n).astype(np.float16), "F16", 2.0))
    results = {}
    for threads in (1, 3):
        monkeypatch.setattr(tv, "_COMPUTE_THREADS", threads)
        monkeypatch.setattr(tv, "_POOL", None)
        results[threads] = [tv.blockwise_sum(terms, code, factor_common=True) for code in ("F32", "BF16", "F16")]
    expected = sum(np.float32(w) * t.astype(np.float32) for t, _, w in terms)
    np.testing.assert_allclose(results[1][0], expected, rtol=1e-5, atol=1e-5)
    for one, many in zip(results[1], results[3]):
        assert one.tobytes() == many.tobytes()
