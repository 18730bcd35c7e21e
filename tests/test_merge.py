"""Merge methods against independent re-implementations of their definitions (numpy, explicit loops, other
formulas), their edge cases, and `tvtool merge` end to end on small files."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from tvtool import merge as mg
from tvtool.errors import TVToolError

RNG = np.random.default_rng(0)


def _t(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float32)


def _randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------------------------------- references
def ref_topk_keep(v: np.ndarray, percent: float) -> np.ndarray:
    """Keep the floor(N percent/100) largest |values| (and anything tied with the smallest of them)."""
    flat = np.abs(v.ravel())
    n = int(len(flat) * percent / 100 + 1e-9)
    if n == 0:
        return np.zeros_like(v)
    cut = sorted(flat, reverse=True)[n - 1]
    return np.where(np.abs(v) >= cut, v, 0)


def ref_elect_merge(vs: list[np.ndarray], rule: str) -> np.ndarray:
    """Sign election and disjoint mean, entry by entry."""
    out = np.zeros(vs[0].shape, dtype=np.float64)
    for idx in np.ndindex(vs[0].shape):
        vals = [float(v[idx]) for v in vs]
        mass = np.sign(sum(vals))
        count = np.sign(sum(np.sign(x) for x in vals))
        first, second = (mass, count) if rule == "mass" else (count, mass)
        s = first if first != 0 else second
        chosen = [x for x in vals if x != 0 and np.sign(x) == s]
        out[idx] = sum(chosen) / len(chosen) if chosen else 0.0
    return out


def ref_ties(vs, k, rule="mass"):
    return ref_elect_merge([ref_topk_keep(v, k) for v in vs], rule)


def ref_breadcrumbs(vs, beta, gamma):
    out = np.zeros(vs[0].shape, dtype=np.float64)
    for v in vs:
        flat = v.ravel()
        n = len(flat)
        n_top, n_bot = int(n * beta / 100 + 1e-9), int(n * gamma / 100 + 1e-9)
        order = np.argsort(np.abs(flat), kind="stable")  # ascending; magnitudes below are distinct
        keep = np.zeros(n, bool)
        keep[order[n_bot:n - n_top]] = True
        out += np.where(keep, flat, 0).reshape(v.shape)
    return out


def ref_polar(a: np.ndarray) -> np.ndarray:
    """Orthogonal polar factor via the inverse square root of the Gram matrix (not an SVD of a)."""
    a = a.astype(np.float64)
    if a.shape[0] >= a.shape[1]:
        w, q = np.linalg.eigh(a.T @ a)
        return a @ (q / np.sqrt(w)) @ q.T
    return ref_polar(a.T).T


def ref_tsv(vs, fraction=None):
    t = len(vs)
    m, n = vs[0].shape
    r = max(1, int((1 / t if fraction is None else fraction) * min(m, n) + 1e-9))
    us, ss, vts = [], [], []
    for v in vs:
        u, s, vt = np.linalg.svd(v.astype(np.float64), full_matrices=False)
        us.append(u[:, :r]), ss.append(s[:r]), vts.append(vt[:r])
    u_cat, s_cat, v_cat = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vts, 0).T
    return ref_polar(u_cat) @ np.diag(s_cat) @ ref_polar(v_cat).T


# --------------------------------------------------------------------------------------------------- registry
def test_registry_lists_every_method_with_options_and_citation():
    names = [m.name for m in mg.list_methods()]
    assert names == ["sum", "mean", "ties", "dare", "dare-ties", "breadcrumbs", "breadcrumbs-ties", "della", "tsv",
                     "iso-c", "iso-cts", "consensus", "wudi", "lines", "regmean", "fisher", "adamerging"]
    assert [m.name for m in mg.list_methods() if m.kind == "data-aware"] == ["regmean", "fisher", "adamerging"]
    # a data-aware method runs through `tvtool merge` with the tasks' data (collect) or through its own command
    assert all(bool(m.command) == (m.kind == "data-aware" and m.collect is None) for m in mg.list_methods())
    for m in mg.list_methods():
        assert any(str(y) in m.doc and str(y) in m.paper for y in (2022, 2023, 2024, 2025)), m.name  # paper cited
        assert m.url.startswith("https://arxiv.org/abs/") and m.code and m.alpha_source, m.name
        assert m.kind in mg.KINDS
        grid = mg.alpha_grid(m)  # every default search parses, and is the paper's
        assert grid and all(0 < a <= 3 for a in grid if a), m.name
    assert mg.get_method("tsv").per_layer and mg.get_method("iso-c").per_layer
    assert mg.get_method("dare").random and not mg.get_method("ties").random
    # the papers' alphas: TSV-M merges at 1, WUDI and LiNeS rescale nothing, Iso-C/CTS search above 1
    assert mg.alpha_grid("tsv") == [1.0] and mg.alpha_grid("wudi") == [1.0] and mg.alpha_grid("lines") == [1.0]
    iso = mg.alpha_grid("iso-c")
    assert iso == mg.alpha_grid("iso-cts") and min(iso) == 0.1 and max(iso) == 3.0 and 1.5 in iso
    assert mg.alpha_grid("sum") == [round(0.05 * i, 10) for i in range(21)]


def test_options_have_one_default_each():
    """Issue 20: a default lives in the Option only; the function cannot carry a second, disagreeing one."""
    import inspect
    for m in mg.list_methods():
        params = dict(inspect.signature(m.fn).parameters)
        if m.collect is not None:  # data-aware: collection options are the collector's parameters
            params.update(inspect.signature(m.collect).parameters)
        for name in m.options:
            assert params[name].default is inspect.Parameter.empty, (m.name, name)
    assert mg.resolve_options("ties")["scope"] == "global"
    with pytest.raises(ValueError, match="repeat their option's default"):
        @mg.register("x-test", kind="arithmetic", paper="p", url="u", code="c", alpha_grid="1", alpha_source="s",
                     options={"k": mg.Option(float, 1.0, "k")})
        def _bad(tensors, key, *, k=2.0):
            return tensors[0]
    assert "x-test" not in mg.REGISTRY


def test_options_are_typed_defaulted_and_checked():
    assert mg.resolve_options("ties", {"k": "35"}) == {"k": 35.0, "sign": "mass", "scope": "global",
                                                       "disjoint": "mean"}
    assert mg.parse_option_strings(["k=5", "sign=count"]) == {"k": "5", "sign": "count"}
    for bad, msg in [({"kk": 1}, "unknown option 'kk'"), ({"k": "abc"}, "not a valid float"),
                     ({"k": 101}, "out of range"), ({"sign": "vote"}, "must be one of")]:
        with pytest.raises(TVToolError, match=msg):
            mg.resolve_options("ties", bad)
    with pytest.raises(TVToolError, match=r"out of range \[0.0, 1.0\)"):
        mg.resolve_options("dare", {"p": 1})
    with pytest.raises(TVToolError, match="not a valid int"):
        mg.resolve_options("consensus", {"k": "1.5"})
    with pytest.raises(TVToolError, match="KEY=VALUE"):
        mg.parse_option_strings(["k"])
    with pytest.raises(TVToolError, match="unknown merge method 'tie'; known: sum, mean, ties"):
        mg.get_method("tie")


# --------------------------------------------------------------------------------------------------- methods
def test_sum_and_mean():
    vs = [_randn(3, 4, seed=s) for s in range(3)]
    out = mg.merge_tensor("sum", [_t(v) for v in vs], alpha=0.3)
    np.testing.assert_allclose(out.numpy(), 0.3 * np.sum(vs, 0), rtol=1e-6, atol=1e-7)
    out = mg.merge_tensor("mean", [_t(v) for v in vs], alpha=2.0)
    np.testing.assert_allclose(out.numpy(), 2.0 * np.mean(vs, 0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [0, 20, 37.5, 100])
@pytest.mark.parametrize("rule", ["mass", "count"])
def test_ties_matches_loop_reference(k, rule):
    vs = [_randn(5, 6, seed=s) for s in range(4)]
    vs[1][0, :3] = vs[0][0, :3]  # magnitudes tied across vectors
    vs[2][1] = 0.0
    out = mg.merge_tensor("ties", [_t(v) for v in vs], "w", {"k": k, "sign": rule})
    np.testing.assert_allclose(out.numpy(), ref_ties(vs, k, rule), rtol=1e-6, atol=1e-7)
    if k == 0:
        assert not out.any()


def test_ties_sign_election_ties_and_edge_cases():
    a = _t([2.0, 1.0, 3.0, 1.0, 0.0])
    b = _t([-1.0, -1.0, -1.0, -1.0, 0.0])
    c = _t([-1.0, 0.0, -1.0, 0.0, 0.0])
    # entry 0: mass 0 -> count (two negatives) elects -, mean(-1,-1) = -1; entry 1: mass 0, count 0 -> 0;
    # entry 2: mass +1 -> 3; entry 3: mass and count 0 -> 0; entry 4: all zero -> 0
    out = mg.merge_tensor("ties", [a, b, c], options={"k": 100})
    assert out.tolist() == [-1.0, 0.0, 3.0, 0.0, 0.0]
    # count rule: entry 2 has count -1 -> mean(-1, -1); entry 0 likewise; count ties broken by mass
    out = mg.merge_tensor("ties", [a, b, c], options={"k": 100, "sign": "count"})
    assert out.tolist() == [-1.0, 0.0, -1.0, 0.0, 0.0]
    zeros = [torch.zeros(3, 2), torch.zeros(3, 2)]
    for name in (n for n, m in mg.REGISTRY.items() if m.kind != "data-aware"):  # tests/test_merge_data.py, test_adamerging.py
        assert not mg.merge_tensor(name, zeros, "z", {"k": 1} if name == "consensus" else None).any(), name
    single = _t(_randn(4, 5))
    assert torch.equal(mg.merge_tensor("ties", [single], options={"k": 100}), single)
    np.testing.assert_allclose(mg.merge_tensor("ties", [single], options={"k": 25}).numpy(),
                               ref_topk_keep(single.numpy(), 25))


def test_global_threshold_is_exact_kth_largest():
    gen = np.random.default_rng(1)
    # heavy duplication, zeros, mixed scales and a bf16 tensor: the radix select must still be exact
    vecs = []
    for i in range(3):
        v = {"a": torch.tensor(gen.integers(-5, 6, (40, 7)).astype(np.float32) * 0.25),
             "b": torch.tensor(gen.standard_normal(333).astype(np.float32) * 10.0 ** gen.integers(-6, 3)),
             "c": torch.tensor(gen.standard_normal((3, 11)), dtype=torch.bfloat16)}
        vecs.append(v)
    vecs.append({k: torch.zeros_like(t) for k, t in vecs[0].items()})
    keys = ["a", "b", "c"]
    for pct in (0, 0.1, 5, 20, 50, 99.9, 100):
        got = mg.global_magnitude_thresholds(vecs, keys, pct)
        for v, thr in zip(vecs, got):
            mags = np.sort(np.concatenate([v[k].float().abs().numpy().ravel() for k in keys]))[::-1]
            n = int(len(mags) * pct / 100 + 1e-9)
            expect = np.inf if n == 0 else (0.0 if n == len(mags) else float(mags[n - 1]))
            assert thr == expect, (pct, thr, expect)


def test_ties_global_scope_trims_over_the_whole_vector():
    vecs = [{"w": torch.tensor(_randn(6, 5, seed=s) * (1 + s)), "b": torch.tensor(_randn(7, seed=10 + s) * 3)}
            for s in range(3)]
    got = mg.merge_tensors("ties", vecs, {"k": 30, "scope": "global"})
    # reference: flatten each whole vector, trim there, split back
    flat = [np.concatenate([v["w"].numpy().ravel(), v["b"].numpy().ravel()]) for v in vecs]
    expect = ref_ties(flat, 30)
    np.testing.assert_allclose(got["w"].numpy().ravel(), expect[:30], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["b"].numpy(), expect[30:], rtol=1e-6, atol=1e-7)
    per_tensor = mg.merge_tensors("ties", vecs, {"k": 30, "scope": "tensor"})
    assert not torch.equal(per_tensor["b"], got["b"])  # the scales differ, so the scopes must disagree


def test_dare_is_seeded_per_key_and_rescales():
    x = _t(_randn(200, 500))
    out = mg.merge_tensor("dare", [x], "k1", {"p": 0.3}, seed=7)
    assert torch.equal(out, mg.merge_tensor("dare", [x], "k1", {"p": 0.3}, seed=7))
    assert not torch.equal(out, mg.merge_tensor("dare", [x], "k1", {"p": 0.3}, seed=8))
    assert not torch.equal(out, mg.merge_tensor("dare", [x], "k2", {"p": 0.3}, seed=7))
    kept = out != 0
    np.testing.assert_allclose(out[kept].numpy(), x[kept].numpy() / 0.7, rtol=1e-6)
    assert abs(1 - kept.float().mean().item() - 0.3) < 0.01  # 100k Bernoulli draws: sd ~ 0.0015
    # a key's draw does not depend on which other keys are merged
    a = {"k1": x, "k2": x[:3]}
    assert torch.equal(mg.merge_tensors("dare", [a], {"p": 0.3}, seed=7)["k1"], out)


def test_dare_p0_is_sum_and_dare_ties_p0_is_ties_without_trim():
    vs = [_t(_randn(4, 6, seed=s)) for s in range(3)]
    assert torch.equal(mg.merge_tensor("dare", vs, "w", {"p": 0}), mg.merge_tensor("sum", vs))
    np.testing.assert_allclose(mg.merge_tensor("dare-ties", vs, "w", {"p": 0}).numpy(),
                               ref_elect_merge([v.numpy() for v in vs], "mass"), rtol=1e-6, atol=1e-7)
    # dare-ties on one input: what survives is rescaled and unchanged in sign
    out = mg.merge_tensor("dare-ties", vs[:1], "w", {"p": 0.5}, seed=3)
    kept = out != 0
    np.testing.assert_allclose(out[kept].numpy(), 2 * vs[0][kept].numpy(), rtol=1e-6)


@pytest.mark.parametrize("beta,gamma", [(0, 0), (10, 30), (25, 0), (0, 50), (60, 40)])
def test_breadcrumbs_matches_rank_reference(beta, gamma):
    vs = [_randn(4, 5, seed=s) for s in range(3)]
    out = mg.merge_tensor("breadcrumbs", [_t(v) for v in vs], "w", {"beta": beta, "gamma": gamma})
    np.testing.assert_allclose(out.numpy(), ref_breadcrumbs(vs, beta, gamma), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape,t,fraction", [((12, 8), 2, None), ((6, 15), 3, None), ((10, 10), 4, 0.2),
                                              ((9, 7), 3, 1.0)])
def test_tsv_matches_reference(shape, t, fraction):
    vs = [_randn(*shape, seed=s) for s in range(t)]
    out = mg.merge_tensor("tsv", [_t(v) for v in vs], "w", {"fraction": fraction})
    np.testing.assert_allclose(out.numpy(), ref_tsv(vs, fraction), rtol=1e-4, atol=1e-4)


def test_tsv_keeps_already_orthogonal_tasks_intact():
    # two rank-3 updates on disjoint rows and columns: nothing to decorrelate, so TSV (default rank 6/2 = 3 per
    # task) returns their sum
    a = np.zeros((6, 6), np.float32)
    b = np.zeros((6, 6), np.float32)
    a[:3, :3], b[3:, 3:] = _randn(3, 3, seed=1), _randn(3, 3, seed=2)
    out = mg.merge_tensor("tsv", [_t(a), _t(b)])
    np.testing.assert_allclose(out.numpy(), a + b, atol=1e-5)


def test_iso_c_flattens_the_spectrum_of_the_sum():
    vs = [_randn(9, 6, seed=s) for s in range(3)]
    out = mg.merge_tensor("iso-c", [_t(v) for v in vs], "w").numpy()
    total = np.sum(vs, 0).astype(np.float64)
    s_mean = np.linalg.svd(total, compute_uv=False).mean()
    np.testing.assert_allclose(out, s_mean * ref_polar(total), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.svd(out, compute_uv=False), s_mean, rtol=1e-4)


@pytest.mark.parametrize("name", ["tsv", "iso-c", "iso-cts", "wudi"])
def test_per_layer_methods_fall_back_on_non_matrices(name):
    # the authors' code (TSV-M, Iso-C/CTS, FusionBench's WUDI) averages biases, norms and the class token
    for shape in [(7,), (2, 3, 4), ()]:
        vs = [_t(_randn(*shape, seed=s)) for s in range(3)]
        np.testing.assert_allclose(mg.merge_tensor(name, vs).numpy(), np.mean([v.numpy() for v in vs], 0),
                                   rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(mg.merge_tensor(name, vs, options={"fallback": "sum"}).numpy(),
                                   np.sum([v.numpy() for v in vs], 0), rtol=1e-6)


@pytest.mark.parametrize("k,lam", [(0, 0.4), (1, 0.4), (2, 0.4), (2, 1.0), (3, 0.2)])
def test_consensus_matches_loop_reference(k, lam):
    vs = [_randn(3, 4, seed=s) for s in range(4)]
    out = mg.merge_tensor("consensus", [_t(v) for v in vs], "w", {"k": k, "lam": lam}).numpy()
    expect = np.zeros((3, 4))
    for i, j in itertools.product(range(3), range(4)):
        total = sum(float(v[i, j]) for v in vs)
        votes = sum(abs(float(v[i, j])) >= lam * abs(total - float(v[i, j])) for v in vs)
        expect[i, j] = total if votes >= k else 0.0
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-6)
    single = _t(_randn(3, 3))
    assert torch.equal(mg.merge_tensor("consensus", [single], options={"k": 1}), single)
    with pytest.raises(TVToolError, match="only 1 vector"):
        mg.merge_tensors("consensus", [{"w": single}], {"k": 2})


def test_single_input_identities():
    x = _t(_randn(5, 4))
    for name, opts in [("sum", None), ("mean", None), ("ties", {"k": 100}), ("dare", {"p": 0}),
                       ("breadcrumbs", {"beta": 0, "gamma": 0}), ("tsv", {"fraction": 1.0}), ("consensus", {"k": 1})]:
        np.testing.assert_allclose(mg.merge_tensor(name, [x], "w", opts).numpy(), x.numpy(), rtol=1e-4,
                                   atol=1e-5, err_msg=name)


# --------------------------------------------------------------------------------------------------- files and CLI
BASE = {"model": "tiny", "pretrained": None, "fingerprint": "fp1:0123456789abcdef"}


@pytest.fixture
def files(tmp_path):
    tv = pytest.importorskip("tvtool.taskvector")
    paths = []
    for s in range(3):
        tensors = {"visual.w": torch.tensor(_randn(8, 6, seed=s)), "visual.b": torch.tensor(_randn(6, seed=20 + s)),
                   "visual.conv": torch.tensor(_randn(2, 3, 2, seed=40 + s))}
        p = tmp_path / f"t{s}.st"
        tv.write_vector(p, tensors, tv.new_meta(BASE, tasks=[f"task{s}"], mode="full"))
        paths.append(p)
    return paths


def _load(path):
    from tvtool.taskvector import open_vector
    v = open_vector(path)
    return v.to_dict(), v.meta


def test_merge_sum_equals_add_bit_for_bit(files, tmp_path):
    from tvtool.cli import main
    assert main(["add", *map(str, files), "--alpha", "0.3", "-o", str(tmp_path / "add.st")]) == 0
    assert main(["merge", "-m", "sum", *map(str, files), "--alpha", "0.3", "-o", str(tmp_path / "sum.st")]) == 0
    a, _ = _load(tmp_path / "add.st")
    b, meta = _load(tmp_path / "sum.st")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta["history"][-1]["method"] == "sum" and meta["tasks"] == ["task0", "task1", "task2"]


def test_merge_files_match_in_memory_and_record_provenance(files, tmp_path, capsys):
    from tvtool.cli import main
    out = tmp_path / "dare.st"
    rc = main(["merge", "--method", "dare-ties", "-O", "p=0.5", "-O", "sign=count", *map(str, files),
               "--seed", "11", "--alpha", "0.5", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    got, meta = _load(out)
    inputs = [_load(p)[0] for p in files]
    expect = mg.merge_tensors("dare-ties", inputs, {"p": 0.5, "sign": "count"}, alpha=0.5, seed=11)
    assert all(torch.equal(got[k], expect[k]) for k in expect)
    entry = meta["history"][-1]
    assert entry["op"] == "merge" and entry["method"] == "dare-ties" and entry["seed"] == 11
    assert entry["options"] == {"p": 0.5, "sign": "count", "disjoint": "mean"} and entry["alpha"] == 0.5
    assert [i["fingerprint"] for i in entry["inputs"]] == [_load(p)[1]["fingerprint"] for p in files]
    json.dumps(meta)  # provenance is plain JSON
    # global TIES through files: the prepass streams from the memory-mapped inputs
    assert main(["merge", "-m", "ties", "-O", "k=40", *map(str, files), "-o", str(tmp_path / "t.st"),
                 "--dtype", "bf16"]) == 0
    got, _ = _load(tmp_path / "t.st")
    expect = mg.merge_tensors("ties", inputs, {"k": 40})
    assert all(torch.equal(got[k], expect[k].to(torch.bfloat16).float()) for k in expect)


def test_merge_cli_errors(files, tmp_path, capsys):
    from tvtool.cli import main
    out = str(tmp_path / "o.st")
    cases = [
        (["merge", "-m", "nope", *map(str, files), "-o", out], "unknown merge method"),
        (["merge", "-m", "ties", "-O", "q=1", *map(str, files), "-o", out], "unknown option 'q'"),
        (["merge", *map(str, files), "-o", out], "no --method"),
        (["merge", "-m", "ties", "-o", out], "no task vectors"),
        (["merge", "-m", "ties", *map(str, files), "-o", str(files[0])], "already exists"),
        (["merge", "-m", "consensus", str(files[0]), "-o", out], "only 1 vector"),
        (["merge", "-m", "sum", str(files[0]), str(tmp_path / "missing.st"), "-o", out], "missing.st"),
    ]
    for argv, msg in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error:") and msg in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "o.st").exists()
    assert main(["merge", "-m", "mean", *map(str, files), "-o", str(files[0]), "--force"]) == 0
    assert _load(files[0])[1]["history"][-1]["method"] == "mean"
    assert main(["merge", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in mg.REGISTRY) and "NeurIPS 2023" in listing


def test_union_treats_missing_tensors_as_zero(files, tmp_path):
    from tvtool import taskvector as tv
    from tvtool.cli import main
    extra = tmp_path / "extra.st"
    tv.write_vector(extra, {"visual.w": torch.ones(8, 6), "visual.other": torch.ones(4)},
                    tv.new_meta(BASE, tasks=["x"]))
    out = tmp_path / "u.st"
    assert main(["merge", "-m", "ties", "-O", "k=100", "-O", "scope=tensor", str(files[0]), str(extra),
                 "-o", str(out)]) == 1  # different tensor sets need --union
    assert main(["merge", "-m", "ties", "-O", "k=100", str(files[0]), str(extra), "-o", str(out), "--union"]) == 0
    got, _ = _load(out)
    a, _ = _load(files[0])
    assert torch.equal(got["visual.other"], torch.ones(4))  # only one vector holds it: kept as is
    assert torch.equal(got["visual.b"], a["visual.b"])
    np.testing.assert_allclose(got["visual.w"].numpy(),
                               ref_elect_merge([a["visual.w"].numpy(), np.ones((8, 6), np.float32)], "mass"))


# --------------------------------------------------------------------------------------------------- rank-deficient
def _old_tsv(tensors, fraction=None):
    """tsv as it was before the rank cut (the paper's formula taken literally): the full-rank reference."""
    t_count, (m, n) = len(tensors), tensors[0].shape
    r = max(1, int((1 / t_count if fraction is None else fraction) * min(m, n) + 1e-9))
    u, s, vh = torch.linalg.svd(torch.stack(tensors), full_matrices=False)
    u_cat = u[:, :, :r].permute(1, 0, 2).reshape(m, t_count * r)
    s_cat, vh_cat = s[:, :r].reshape(-1), vh[:, :r, :].reshape(t_count * r, n)

    def polar(a):
        p, _, qh = torch.linalg.svd(a, full_matrices=False)
        return p @ qh

    return (polar(u_cat) * s_cat) @ polar(vh_cat)


def _old_iso_c(tensors):
    u, s, vh = torch.linalg.svd(torch.stack(tensors).sum(0), full_matrices=False)
    return (u * s.mean()) @ vh


def _lora_like(m, n, rank, t, seed):
    """t exactly rank-`rank` updates B @ A (as LoRA vectors are), float64 so the clean spans are exact."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, rank, generator=g, dtype=torch.float64) * 0.05)
            @ torch.randn(rank, n, generator=g, dtype=torch.float64) * 0.05 for _ in range(t)]


def _noisy(clean, seed, scale=1e-9):
    g = torch.Generator().manual_seed(seed)
    return [(c + scale * torch.randn(c.shape, generator=g, dtype=torch.float64)).float() for c in clean]


def _outside_span(out, spanning):
    """Relative norm of out's part outside the column space of `spanning` (float64, exact-rank basis)."""
    u, s, _ = torch.linalg.svd(spanning, full_matrices=False)
    q = u[:, s > 1e-10 * s[0]]
    out = out.double()
    return float(torch.linalg.norm(out - q @ (q.T @ out)) / torch.linalg.norm(out))


@pytest.mark.parametrize("name", ["tsv", "iso-c"])
def test_rank_deficient_inputs_merge_deterministically_inside_their_span(name):
    # 4 rank-2 updates of a 48 x 40 layer: TSV keeps r = 10 triplets per task and Iso-C flattens 40 singular
    # values, most of them zero; before the rank cut 1e-9 noise moved the result by tens of percent
    clean = _lora_like(48, 40, 2, 4, seed=0)
    a = mg.merge_tensor(name, _noisy(clean, 1), "w")
    b = mg.merge_tensor(name, _noisy(clean, 2), "w")
    assert float(torch.linalg.norm(a - b) / torch.linalg.norm(a)) < 1e-5
    cols = torch.cat(clean, 1) if name == "tsv" else sum(clean)  # tsv: the tasks' joint span; iso-c: the sum's
    rows = torch.cat([c.T for c in clean], 1) if name == "tsv" else sum(clean).T
    assert _outside_span(a, cols) < 1e-5 and _outside_span(a.T, rows) < 1e-5
    old = (_old_tsv if name == "tsv" else _old_iso_c)
    drift = old(_noisy(clean, 1)) - old(_noisy(clean, 2))
    assert float(torch.linalg.norm(drift) / torch.linalg.norm(old(_noisy(clean, 1)))) > 1e-2  # the defect


def test_iso_c_on_a_low_rank_sum_flattens_only_the_non_zero_spectrum():
    clean = _lora_like(30, 20, 3, 2, seed=3)  # the sum has rank 6
    out = mg.merge_tensor("iso-c", _noisy(clean, 4), "w").double()
    s_sum = torch.linalg.svdvals(sum(clean))[:6]
    s_out = torch.linalg.svdvals(out)
    torch.testing.assert_close(s_out[:6], s_sum.mean().expand(6), rtol=1e-5, atol=0)  # nuclear norm kept
    assert float(s_out[6:].max()) < 1e-6 * float(s_out[0])  # rank 6, no invented directions


def test_tsv_and_iso_c_of_zero_matrices_are_zero():
    zeros = [torch.zeros(5, 4) for _ in range(3)]
    for name in ("tsv", "iso-c"):
        out = mg.merge_tensor(name, zeros, "w")
        assert out.shape == (5, 4) and torch.count_nonzero(out) == 0


@pytest.mark.parametrize("shape,t,fraction", [((24, 16), 3, None), ((16, 30), 4, None), ((20, 20), 2, 0.5),
                                              ((9, 7), 3, 1.0)])
def test_full_rank_inputs_merge_as_before_the_rank_cut(shape, t, fraction):
    g = torch.Generator().manual_seed(7)
    vs = [torch.randn(*shape, generator=g) * 0.01 for _ in range(t)]
    tsv_out = mg.merge_tensor("tsv", vs, "w", {"fraction": fraction})
    torch.testing.assert_close(tsv_out, _old_tsv(vs, fraction), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mg.merge_tensor("iso-c", vs, "w"), _old_iso_c(vs), rtol=1e-4, atol=1e-6)


def test_rtol_option_is_checked_and_widens_the_cut():
    assert mg.resolve_options("iso-c", {"rtol": "1e-3"})["rtol"] == 1e-3
    with pytest.raises(TVToolError):
        mg.resolve_options("tsv", {"rtol": "2"})
    # a rank-1 sum plus a 1e-4 relative second direction: the default keeps both, rtol=1e-3 only the first
    u = torch.eye(6)[:, :2]
    v = torch.eye(4)[:, :2]
    x = u @ torch.diag(torch.tensor([1.0, 1e-4])) @ v.T
    assert torch.linalg.matrix_rank(mg.merge_tensor("iso-c", [x], "w")) == 2
    out = mg.merge_tensor("iso-c", [x], "w", {"rtol": 1e-3})
    torch.testing.assert_close(out, u[:, :1] @ v[:, :1].T, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------- composed methods
def test_generalized_parts_compose_the_sparse_family():
    """ties / dare / breadcrumbs with sign consensus come from the same parts: checked against loop references."""
    vs = [_randn(6, 5, seed=s) for s in range(4)]
    tv = [_t(v) for v in vs]
    # breadcrumbs-ties = breadcrumbs' drop, then election and disjoint mean
    kept = [ref_breadcrumbs([v], 10, 30) for v in vs]
    np.testing.assert_allclose(mg.merge_tensor("breadcrumbs-ties", tv, "w", {"beta": 10, "gamma": 30}).numpy(),
                               ref_elect_merge(kept, "mass"), rtol=1e-6, atol=1e-7)
    # disjoint=sum: the agreeing entries summed instead of averaged (FusionBench's merge_func=sum)
    trimmed = [ref_topk_keep(v, 40) for v in vs]
    mean_ref = ref_elect_merge(trimmed, "mass")
    counts = np.zeros_like(mean_ref)
    for idx in np.ndindex(mean_ref.shape):
        s = np.sign(sum(float(v[idx]) for v in trimmed))
        counts[idx] = sum(1 for v in trimmed if v[idx] != 0 and np.sign(v[idx]) == s)
    got = mg.merge_tensor("ties", tv, "w", {"k": 40, "disjoint": "sum"}).numpy()
    np.testing.assert_allclose(got, mean_ref * np.maximum(counts, 1), rtol=1e-5, atol=1e-6)


def _della_reference_drop(v: np.ndarray, p: float, eps: float) -> np.ndarray:
    """Per row: drop probability p + eps - 2 eps (rank-1)/(n-1), rank 1 = smallest |value| (a loop)."""
    rows = v.reshape(v.shape[0], -1) if v.ndim >= 2 else v.reshape(1, -1)
    out = np.zeros(rows.shape)
    for i, row in enumerate(rows):
        order = sorted(range(len(row)), key=lambda j: (abs(row[j]), j))
        for rank, j in enumerate(order):
            out[i, j] = p + eps - 2 * eps * rank / (len(row) - 1)
    return out.reshape(v.shape)


def test_della_keeps_by_magnitude_rank_and_rescales_each_survivor():
    x = _randn(40, 250, seed=3)
    out = mg.merge_tensor("della", [_t(x)], "w", {"p": 0.5, "eps": 0.3}, seed=9).numpy()
    drop = _della_reference_drop(x, 0.5, 0.3)
    kept = out != 0
    np.testing.assert_allclose(out[kept], x[kept] / (1 - drop[kept]), rtol=1e-5)  # each by its own probability
    # keep rates follow the ranks: 0.2-0.25 for each row's smallest 8%, 0.75-0.8 for its largest 8%
    for group in (drop > 0.75, drop < 0.25, drop == drop):
        expect, draws = float((1 - drop[group]).mean()), int(group.sum())
        assert abs(kept[group].mean() - expect) < 4 * np.sqrt(0.25 / draws), (expect, draws)  # 4 sd
    assert np.array_equal(out, mg.merge_tensor("della", [_t(x)], "w", {"p": 0.5, "eps": 0.3}, seed=9).numpy())
    # eps = 0: every entry dropped with probability p by the same draws as dare-ties
    vs = [_t(_randn(8, 9, seed=s)) for s in range(3)]
    a = mg.merge_tensor("della", vs, "w", {"p": 0.4, "eps": 0.0}, seed=4)
    b = mg.merge_tensor("dare-ties", vs, "w", {"p": 0.4}, seed=4)
    assert torch.equal(a != 0, b != 0)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    with pytest.raises(TVToolError, match="keep probabilities"):
        mg.merge_tensor("della", vs, "w", {"p": 0.9, "eps": 0.2})


def test_iso_cts_flat_spectrum_and_iso_c_limit():
    vs = [torch.tensor(_randn(14, 10, seed=s)) for s in range(3)]
    out = mg.merge_tensor("iso-cts", vs, "w")
    sv = torch.linalg.svdvals(out.double())
    torch.testing.assert_close(sv, sv.mean().expand(10), rtol=1e-4, atol=0)  # isotropic, full rank
    # the common subspace alone (fraction 1) is Iso-C
    torch.testing.assert_close(mg.merge_tensor("iso-cts", vs, "w", {"fraction": 1.0}), mg.merge_tensor("iso-c", vs),
                               rtol=1e-4, atol=1e-5)
    # the sizes follow the authors' rounding: task part a multiple of T, half to even
    from tvtool.merge.methods.iso_cts import subspace_sizes
    assert subspace_sizes(768, 8, 0.8) == (616, 19) and subspace_sizes(10, 4, 0.8) == (10, 0)
    assert subspace_sizes(12, 4, 0.8) == (8, 1)


def test_iso_cts_rank_deficient_inputs_stay_in_their_span():
    clean = _lora_like(40, 32, 2, 4, seed=5)
    a = mg.merge_tensor("iso-cts", _noisy(clean, 1), "w")
    b = mg.merge_tensor("iso-cts", _noisy(clean, 2), "w")
    assert float(torch.linalg.norm(a - b) / torch.linalg.norm(a)) < 1e-4
    assert _outside_span(a, torch.cat(clean, 1)) < 1e-4
    assert torch.count_nonzero(mg.merge_tensor("iso-cts", [torch.zeros(5, 4)] * 3, "w")) == 0


def _wudi_loss(m, taus):
    return sum(float(torch.linalg.norm((m - t) @ t.T) ** 2 / torch.linalg.norm(t) ** 2) for t in taus)


def test_wudi_gradient_and_descent():
    taus = [torch.tensor(_randn(12, 7, seed=s)) * 1e-3 for s in range(4)]
    # the closed-form gradient 2 (M S - B) is autograd's gradient of the loss
    m = (sum(taus) + 1e-4 * torch.randn(12, 7, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    loss = sum(torch.linalg.norm((m - t) @ t.T) ** 2 / torch.linalg.norm(t) ** 2 for t in taus)
    loss.backward()
    s_mat = sum(t.T @ t / torch.linalg.norm(t) ** 2 for t in taus)
    b_mat = sum(t @ t.T @ t / torch.linalg.norm(t) ** 2 for t in taus)
    torch.testing.assert_close(m.grad, 2 * (m.detach() @ s_mat - b_mat), rtol=1e-4, atol=1e-9)
    out = mg.merge_tensor("wudi", taus, "w")
    assert _wudi_loss(out, taus) < 0.5 * _wudi_loss(sum(taus), taus)
    assert torch.equal(mg.merge_tensor("wudi", taus, "w", {"iters": 0}), mg.merge_tensor("sum", taus))
    # a task whose update is zero in this layer adds nothing (no division by zero)
    with_zero = mg.merge_tensor("wudi", taus + [torch.zeros(12, 7)], "w")
    torch.testing.assert_close(with_zero, out, rtol=1e-6, atol=1e-9)


def test_lines_scales_the_base_merge_by_block_depth():
    blocks = 4
    gen = np.random.default_rng(7)
    keys = [f"visual.transformer.resblocks.{i}.mlp.c_fc.weight" for i in range(blocks)] + ["visual.proj",
                                                                                         "visual.ln_post.bias"]
    vecs = [{k: torch.tensor(gen.standard_normal((6, 5) if "weight" in k or "proj" in k else (5,)),
                             dtype=torch.float32) for k in keys} for _ in range(3)]
    base = mg.merge_tensors("ties", vecs, {"k": 30})
    got = mg.merge_tensors("lines", vecs, {"base": "ties", "base.k": 30, "beta": 0.6})
    l1_sum = sum(float(sum(v[k] for v in vecs).abs().sum()) for k in keys)
    l1_base = sum(float(base[k].abs().sum()) for k in keys)
    floor = l1_sum / (3 * l1_base)  # the authors' multi-task floor
    for k in keys:
        depth = next((i for i in range(blocks) if f".{i}." in k), None)
        expect = floor + (0.6 * depth / (blocks - 1) if depth is not None else 0.0)
        torch.testing.assert_close(got[k], base[k] * expect, rtol=1e-5, atol=1e-7)
    fixed = mg.merge_tensors("lines", vecs, {"floor": 0.25, "beta": 1.0, "blocks": 8})  # base sum
    torch.testing.assert_close(fixed[keys[2]], sum(v[keys[2]] for v in vecs) * (0.25 + 2 / 7), rtol=1e-6, atol=0)
    with pytest.raises(TVToolError, match="unknown option 'base.q'"):
        mg.resolve_options("lines", {"base": "ties", "base.q": 1})
    with pytest.raises(TVToolError, match="must be one of"):
        mg.resolve_options("lines", {"base": "lines"})
    assert mg.get_method("lines").is_random(mg.resolve_options("lines", {"base": "dare"}))
    assert not mg.get_method("lines").is_random(mg.resolve_options("lines", {"base": "ties"}))


def test_lines_through_files_records_base_options_and_seed(files, tmp_path):
    from tvtool.cli import main
    out = tmp_path / "lines.st"
    assert main(["merge", "-m", "lines", "-O", "base=dare", "-O", "base.p=0.5", "-O", "beta=0.3", *map(str, files),
                 "--seed", "3", "-o", str(out)]) == 0
    got, meta = _load(out)
    expect = mg.merge_tensors("lines", [_load(p)[0] for p in files], {"base": "dare", "base.p": 0.5, "beta": 0.3},
                              seed=3)
    assert all(torch.equal(got[k], expect[k]) for k in expect)
    entry = meta["history"][-1]
    assert entry["options"]["base"] == "dare" and entry["options"]["base.p"] == 0.5 and entry["seed"] == 3


def test_on_device_pins_where_the_heavy_steps_run():
    default = mg.compute_device()
    with mg.on_device("cpu"):
        assert mg.compute_device() == torch.device("cpu")
        with mg.on_device("meta"):
            assert mg.compute_device() == torch.device("meta")
        assert mg.compute_device() == torch.device("cpu")
    assert mg.compute_device() == default


def test_every_method_merges_a_vit_shaped_vector_through_files(tmp_path):
    """All methods at their defaults on the tensors a ViT image tower holds (conv, class token, positional
    embedding, 2 blocks, projection), streamed from files: finite, right shapes, and each method's own result."""
    from tvtool import taskvector as tv

    w = 16
    shapes = {"visual.class_embedding": (w,), "visual.positional_embedding": (5, w), "visual.conv1.weight": (w, 3, 2, 2),
              "visual.proj": (w, 8), "visual.ln_post.weight": (w,)}
    for i in range(2):
        p = f"visual.transformer.resblocks.{i}."
        shapes.update({p + "attn.in_proj_weight": (3 * w, w), p + "attn.in_proj_bias": (3 * w,),
                       p + "attn.out_proj.weight": (w, w), p + "mlp.c_fc.weight": (4 * w, w),
                       p + "mlp.c_proj.weight": (w, 4 * w)})
    gen = torch.Generator().manual_seed(11)
    paths = []
    for t in range(3):
        p = tmp_path / f"v{t}.st"
        tv.write_vector(p, {k: torch.randn(s, generator=gen) * 1e-3 for k, s in shapes.items()},
                        tv.new_meta(BASE, tasks=[f"task{t}"], mode="full"))
        paths.append(p)
    inputs = [_load(p)[0] for p in paths]
    for name in (n for n, m in mg.REGISTRY.items() if m.kind != "data-aware"):  # tests/test_merge_data.py, test_adamerging.py
        out = tmp_path / f"{name}.st"
        mg.merge_files(name, paths, out, seed=1)
        got, meta = _load(out)
        assert meta["history"][-1]["method"] == name
        for k, s in shapes.items():
            assert tuple(got[k].shape) == s and bool(torch.isfinite(got[k]).all()), (name, k)
        expect = mg.merge_tensors(name, inputs, seed=1)
        assert all(torch.equal(got[k], expect[k]) for k in shapes), name
        assert any(bool(got[k].any()) for k in shapes), name
