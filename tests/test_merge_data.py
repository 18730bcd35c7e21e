"""The data-aware merge methods (issue 24): RegMean and Fisher merging.

- against FusionBench 0.2.33's own code (the wheel fetched from the package registry, its pure modules loaded by
  path, as tests/test_merge_peers.py does): its merge functions on random weights and statistics, and its whole
  statistics loops (`regmean_merging`, `fisher_merging`) on a tiny model, with the same images in the same order;
- the attention handling that FusionBench's HF CLIP does not need (open_clip's fused in_proj, out_proj not called as
  a module) against the attention module itself;
- the paper's exact Fisher against an independent jacobian computation;
- end to end through the installed `tvtool merge` on the mini world, with hand-computed results.
"""
from __future__ import annotations

import copy
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cli_helpers import REPO, run_tvtool
from peer_helpers import load_by_path, sys_modules_restored
from tvtool.errors import TVToolError
from tvtool.evaluate import Evaluator
from tvtool.merge import REGISTRY, get_method, merge_files, merge_tensors, resolve_options
from tvtool.data_merge import StatsContext
from tvtool.merge.data import collect, complete, linear_inputs, linear_keys, merge_stats, task_rows
from tvtool.merge.methods import fisher as fisher_method, regmean as regmean_method

TASKS = ("ta", "tb", "tc")


# ------------------------------------------------------------------------------------------ FusionBench's code
@pytest.fixture(scope="module")
def fusionbench(fusionbench_src):
    """FusionBench's regmean.py and fisher_merging.py, loaded by path with inert stand-ins for their imports."""
    root = fusionbench_src / "fusion_bench" / "method"

    class _Base:
        def __init__(self, *args, **kwargs):
            pass

    def _mod(name, path=None, **attrs):
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)] if path else []
        mod.__dict__.update(attrs)
        return mod

    quiet = lambda iterable=None, **kwargs: iterable  # noqa: E731  (no progress bars in the test log)
    stubs = {m.__name__: m for m in (
        _mod("fusion_bench", BaseAlgorithm=_Base, BaseModelPool=_Base, auto_register_config=lambda c: c),
        _mod("fusion_bench.method", BaseAlgorithm=_Base),
        _mod("fusion_bench.mixins", SimpleProfilerMixin=type("P", (), {}), auto_register_config=lambda c: c),
        _mod("fusion_bench.modelpool", BaseModelPool=_Base),
        _mod("tqdm"), _mod("tqdm.autonotebook", tqdm=quiet),
        # a package over the real folder, so regmean.py's `from .utils import ...` finds FusionBench's utils.py
        _mod("_fb_regmean", root / "regmean"),
    )}
    files = {"regmean": ("_fb_regmean.regmean", root / "regmean" / "regmean.py"),
             "fisher": ("_fb_fisher", root / "fisher_merging" / "fisher_merging.py")}
    with sys_modules_restored(stubs):
        sys.modules.update(stubs)
        return {short: load_by_path(name, path) for short, (name, path) in files.items()}


def _close(ours: torch.Tensor, theirs: torch.Tensor, rel: float = 2e-5) -> None:
    ours, theirs = ours.detach(), theirs.detach()
    scale = float(theirs.abs().max()) or 1.0
    err = float((ours.double() - theirs.double()).abs().max())
    assert err <= rel * scale, (err, scale)


def _psd(n, rows, g):
    x = torch.randn(rows, n, generator=g) * (1 + torch.rand(n, generator=g))
    return x.T @ x / rows


# --------------------------------------------------------------------------- merge functions, random statistics
@pytest.mark.parametrize("ratio", [0.95, 0.1, 1.0])
def test_regmean_equals_fusionbench_merging_with_regmean_weights(fusionbench, ratio):
    g = torch.Generator().manual_seed(0)
    shapes = {"l1.weight": (7, 5), "l2.weight": (4, 7), "l1.bias": (7,), "norm.weight": (5,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    taus = [{k: 0.1 * torch.randn(s, generator=g) * (i + 1) for k, s in shapes.items()} for i in range(3)]
    grams = [{"l1": _psd(5, 40, g), "l2": _psd(7, 40, g)} for _ in taus]
    theirs = fusionbench["regmean"].merging_with_regmean_weights(
        {k: [base[k] + t[k] for t in taus] for k in shapes}, grams, reduce_non_diagonal_ratio=ratio)
    m = get_method("regmean")
    sums = {}
    for gr, tau in zip(grams, taus):  # as the collector folds them, task by task
        for k in ("l1.weight", "l2.weight"):
            regmean_method.fold(sums, k, gr[k[:-7]], tau[k], ratio)
    done = complete(sums, len(taus))
    ours = dict(merge_stats(m, ((k, [t[k] for t in taus]) for k in shapes), lambda key: {"normal": done.get(key)},
                            resolve_options(m, {"ratio": ratio})))
    for k in shapes:
        _close(base[k] + ours[k], theirs[k])
    # the non-linear tensors are the mean, the linear ones are not
    assert torch.allclose(ours["l1.bias"], torch.stack([t["l1.bias"] for t in taus]).mean(0), atol=1e-6)
    assert not torch.allclose(ours["l1.weight"], torch.stack([t["l1.weight"] for t in taus]).mean(0), atol=1e-3)


@pytest.mark.parametrize("ratio", [0.95, 1.0])
def test_regmean_from_folded_normal_equations_equals_the_closed_form(ratio):
    """The collector folds each task's Gram matrix into sum_t G_t~ and sum_t G_t~ tau_t^T as it goes (one pair per
    layer held, not every task's matrices); the merge from those equals (sum G~)^-1 sum G~ W_t^T computed whole, in
    float64, from every task's matrix."""
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(6, 9, generator=g, dtype=torch.float64) * (i + 1) for i in range(4)]
    grams = [_psd(9, 30, g).double() for _ in taus]
    sums = {}
    for gram, tau in zip(grams, taus):
        regmean_method.fold(sums, "w", gram, tau, ratio)
    folded = regmean_method.regmean(taus, "w", normal=complete(sums, 4)["w"])
    off = torch.full((9, 9), ratio, dtype=torch.float64).fill_diagonal_(1.0)
    g_sum = torch.stack([gr * off for gr in grams]).sum(0)
    expected = (torch.linalg.inv(g_sum) @ torch.stack([(gr * off) @ t.T for gr, t in zip(grams, taus)]).sum(0)).T
    torch.testing.assert_close(folded.double(), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(folded.double(), sum(taus) / len(taus), atol=1e-2)  # not the mean
    # a key only some tasks added to has no statistics: averaged
    regmean_method.fold(sums, "v", grams[0], taus[0], ratio)
    assert "v" not in complete(sums, 4)


def test_fisher_from_folded_sums_equals_normalized_coefficients():
    """The collector folds c_t (F_t + eps) tau_t and c_t (F_t + eps) per task with c_t unnormalized (1 / its own
    norm): the normalization to sum 1 (FusionBench's) cancels, so the ratio equals the weighted mean with normalized
    coefficients, computed whole in float64."""
    g = torch.Generator().manual_seed(4)
    taus = [torch.randn(5, 3, generator=g) * (i + 1) for i in range(3)]
    fishers = [torch.rand(5, 3, generator=g) * (i + 1) for i in range(3)]
    norms, eps = [float(f.norm()) for f in fishers], 1e-6
    sums = {}
    for f, t, n in zip(fishers, taus, norms):
        fisher_method.fold(sums, "w", f, t, fisher_method.coefficient(n, 1 / 3, True, eps), eps)
    folded = fisher_method.fisher(taus, "w", folded=complete(sums, 3)["w"])
    inv = torch.tensor([1 / (n + eps) for n in norms], dtype=torch.float64)
    c = (inv / inv.sum()).view(-1, 1, 1)
    w = c * (torch.stack(fishers).double() + eps)
    expected = (w * torch.stack(taus).double()).sum(0) / w.sum(0)
    torch.testing.assert_close(folded.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(folded, sum(taus) / 3, atol=1e-2)


@pytest.mark.parametrize("normalize,scaling", [(True, None), (False, None), (True, "0.5,0.3,0.2")])
def test_fisher_equals_fusionbench_merging_with_fisher_weights(fusionbench, normalize, scaling):
    g = torch.Generator().manual_seed(1)
    shapes = {"a.weight": (6, 4), "a.bias": (6,), "b": (3, 2, 2)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    taus = [{k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(3)]
    fishers = [{k: torch.rand(s, generator=g).square() * (i + 1) for k, s in shapes.items()} for i in range(3)]
    fishers[1]["a.bias"][:2] = 0.0  # entries no task's data moves: the eps fallback
    fishers[0]["a.bias"][:2] = 0.0
    fishers[2]["a.bias"][:2] = 0.0
    coef = [float(v) for v in scaling.split(",")] if scaling else [1 / 3] * 3
    theirs = fusionbench["fisher"].merging_with_fisher_weights(
        {k: [base[k] + t[k] for t in taus] for k in shapes}, fishers, torch.tensor(coef),
        normalize_fisher_weight=normalize, minimal_fisher_weight=1e-6)
    norms = [float(torch.cat([f[k].reshape(-1) for k in shapes]).norm()) for f in fishers]
    m = get_method("fisher")
    opts = resolve_options(m, {"normalize": normalize, "scaling": scaling})
    sums = {}
    for f, tau, n, scale in zip(fishers, taus, norms, coef):  # as the collector folds them, task by task
        for k in shapes:
            fisher_method.fold(sums, k, f[k], tau[k], fisher_method.coefficient(n, scale, normalize, 1e-6), 1e-6)
    done = complete(sums, 3)
    ours = dict(merge_stats(m, ((k, [t[k] for t in taus]) for k in shapes), lambda key: {"folded": done[key]},
                            opts))
    for k in shapes:
        _close(base[k] + ours[k], theirs[k])


# ----------------------------------------------------------------------- statistics loops on a tiny model
def _tiny_world(n=24, seed=0):
    """A tiny image tower of linear layers (and a norm), a head per task, uint8 images per task."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    visual = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 16), torch.nn.GELU(),
                                 torch.nn.LayerNorm(16), torch.nn.Linear(16, 12), torch.nn.Tanh(),
                                 torch.nn.Linear(12, 8))
    heads = {t: F.normalize(torch.randn(4 + i, 8, generator=g), dim=-1) * 20 for i, t in enumerate(TASKS)}
    inputs = {(t, "train"): (torch.randint(0, 256, (n, 3, 4, 4), generator=g, dtype=torch.uint8),
                             torch.randint(0, 4, (n,), generator=g)) for t in TASKS}
    taus = [{f"visual.{k}": 0.2 * torch.randn(p.shape, generator=g) for k, p in visual.named_parameters()}
            for _ in TASKS]
    return visual, heads, inputs, taus


MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _ours(method, options, n=24, seed=0):
    visual, heads, inputs, taus = _tiny_world(n)
    theta0 = {f"visual.{k}": p.detach().clone() for k, p in visual.named_parameters()}
    ev = Evaluator.from_parts(visual, heads, inputs, MEAN, STD)
    ctx = StatsContext(ev, list(TASKS), taus, seed=seed, mean=MEAN, std=STD)
    m = get_method(method)
    opts = resolve_options(m, options)
    lookup = collect(m, ctx, opts)
    ev.reset()
    merged = dict(merge_stats(m, ((k, [t[k] for t in taus]) for k in taus[0]), lookup, opts))
    return {k: theta0[k] + v for k, v in merged.items()}, (visual, heads, inputs, taus, theta0)


class _Classifier(torch.nn.Module):
    """What FusionBench's loops call: model(**inputs).logits (CLIP: normalized features times the scaled head)."""

    def __init__(self, visual, head):
        super().__init__()
        self.visual = visual
        self.register_buffer("head", head)

    def forward(self, x):
        return SimpleNamespace(logits=F.normalize(self.visual(x), dim=-1) @ self.head.T)


def _their_models(world, n, batch, seed):
    """The fine-tuned models and 'trainers' that feed them our seed's images, in our order and batches."""
    visual, heads, inputs, taus, theta0 = world
    models, trainers = [], []
    mean, std = torch.tensor(MEAN).view(1, -1, 1, 1), torch.tensor(STD).view(1, -1, 1, 1)
    for t, tau in zip(TASKS, taus):
        model = _Classifier(copy.deepcopy(visual), heads[t])
        with torch.no_grad():
            for k, p in model.visual.named_parameters():
                p.copy_(theta0[f"visual.{k}"] + tau[f"visual.{k}"])
        x = inputs[(t, "train")][0][task_rows(n, n, seed, t)]
        x = (x.float() / 255.0 - mean) / std
        loader = [{"x": x[i:i + batch]} for i in range(0, n, batch)]
        trainers.append(SimpleNamespace(get_train_dataloader=lambda loader=loader: loader, _train_batch_size=batch,
                                        _prepare_inputs=lambda inputs: inputs))
        models.append(model)
    return models, trainers


@pytest.mark.parametrize("ratio", [0.95, 0.5])
def test_regmean_statistics_and_merge_equal_fusionbench_regmean_merging(fusionbench, ratio):
    n, batch = 24, 8
    ours, world = _ours("regmean", {"ratio": ratio, "examples": n, "batch": batch})
    models, trainers = _their_models(world, n, batch, seed=0)
    theirs = fusionbench["regmean"].regmean_merging(models, trainers, [], [n] * 3, reduce_non_diagonal_ratio=ratio)
    for k in ours:
        _close(ours[k], theirs[k])


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_statistics_and_merge_equal_fusionbench_fisher_merging(fusionbench, normalize):
    n, batch = 24, 8
    ours, world = _ours("fisher", {"normalize": normalize, "examples": n, "batch": batch})
    models, trainers = _their_models(world, n, batch, seed=0)
    theirs = fusionbench["fisher"].fisher_merging(models, trainers, [], [n] * 3, normalize_fisher_weight=normalize,
                                                  minimal_fisher_weight=1e-6)
    for k in ours:
        _close(ours[k], theirs[k], rel=1e-4)


def test_exact_fisher_is_the_expectation_over_classes_of_squared_score_gradients():
    """The paper's Fisher, sum_c p_c (d log p_c / d theta)^2 averaged over images, from a full jacobian."""
    from tvtool.merge.methods.fisher import collect_fishers

    visual, heads, inputs, taus = _tiny_world(6)
    ev = Evaluator.from_parts(visual, heads, inputs, MEAN, STD)
    ctx = StatsContext(ev, ["ta"], taus[:1], seed=3, mean=MEAN, std=STD)
    got = {}
    for est in ("exact", "batch"):
        lookup = collect_fishers(ctx, examples=6, batch=4, estimator=est, scaling=None, normalize=False, eps=1e-6)
        # one task, c = 1: the folded denominator is F + eps, the numerator (F + eps) tau
        got[est] = {k: lookup(k)["folded"][1] - 1e-6 for k in taus[0]}
        for k in taus[0]:
            num, den = lookup(k)["folded"]
            torch.testing.assert_close(num, den * taus[0][k].float())
    ev.set_weights(taus[0], 1.0)
    names = [n for n, _ in visual.named_parameters()]
    params = {n: p.detach() for n, p in visual.named_parameters()}
    x = inputs[("ta", "train")][0][task_rows(6, 6, 3, "ta")]
    x = (x.float() / 255.0 - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1)

    def logp(p, xb):
        return torch.log_softmax(F.normalize(torch.func.functional_call(visual, p, (xb,)), dim=-1)
                                 @ heads["ta"].T, -1)

    jac = torch.func.jacrev(logp)(params, x)  # name -> [N, C, *shape]
    prob = logp(params, x).exp()
    for n in names:
        j = jac[n]
        w = prob.view(*prob.shape, *([1] * (j.ndim - 2)))
        exact = (w * j.square()).sum((0, 1)) / 6
        _close(got["exact"][f"visual.{n}"], exact, rel=1e-4)
        # FusionBench's batch estimator: (sum_{i in batch} sum_c sqrt(p_ic) J_ic)^2 per batch of 4, over 6 images
        s = w.sqrt() * j
        batched = (s[:4].sum((0, 1)).square() + s[4:].sum((0, 1)).square()) / 6
        _close(got["batch"][f"visual.{n}"], batched, rel=1e-4)
    ev.reset()


# ----------------------------------------------------------------------------------- open_clip's attention
def test_attention_inputs_are_those_of_separate_qkv_and_out_projections():
    """in_proj gets the Gram of the attention's input (what HF CLIP's q/k/v layers see), out_proj that of the
    context, which the hook recomputes: out_proj(context) reproduces the attention's output."""
    import open_clip

    torch.manual_seed(0)
    visual = open_clip.CLIP(embed_dim=24, vision_cfg=dict(image_size=16, layers=2, width=32, head_width=16,
                                                          patch_size=8),
                            text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)).visual.eval()
    x = torch.randn(3, 3, 16, 16)
    block = visual.transformer.resblocks[1]
    seen = {}
    handles = [block.ln_1.register_forward_hook(lambda m, a, o: seen.__setitem__("ln_1", o)),
               block.attn.register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o[0]))]
    with torch.no_grad(), linear_inputs(visual) as rec:
        visual(x)
    for h in handles:
        h.remove()
    key = "visual.transformer.resblocks.1.attn."
    rows = seen["ln_1"].reshape(-1, 32)
    assert torch.allclose(rec.grams[key + "in_proj_weight"], rows.T @ rows, atol=1e-4)
    # the context: solve out_proj(ctx) = attn output for ctx's Gram, through the (invertible) out_proj
    w, b = block.attn.out_proj.weight, block.attn.out_proj.bias
    ctx = torch.linalg.solve(w, (seen["attn"].reshape(-1, 32) - b).T).T
    assert torch.allclose(rec.grams[key + "out_proj.weight"], ctx.T @ ctx, rtol=1e-3, atol=1e-3)
    assert set(linear_keys(visual)) == set(rec.grams)
    assert rec.rows[key + "out_proj.weight"] == 3 * 5  # every token of every image
    assert key + "out_proj.weight" in linear_keys(visual) and "visual.proj" not in linear_keys(visual)


# ------------------------------------------------------------------------------------ registry and refusals
def test_data_methods_are_listed_and_refused_by_the_file_only_driver(tmp_path):
    assert REGISTRY["regmean"].describe()["data"] and not REGISTRY["ties"].describe()["data"]
    assert resolve_options("regmean")["ratio"] == 0.95  # FusionBench's CLIP config
    assert resolve_options("fisher")["estimator"] == "batch" and resolve_options("fisher")["eps"] == 1e-6
    with pytest.raises(TVToolError, match="regmean needs the model and each task's training images"):
        merge_tensors("regmean", [{"a": torch.ones(2, 2)}])
    with pytest.raises(TVToolError, match="fisher needs the model"):
        merge_files("fisher", [tmp_path / "a.st"], tmp_path / "o.st")
    assert not (tmp_path / "o.st").exists()
    with pytest.raises(TVToolError, match="scaling needs 2 non-negative numbers"):
        REGISTRY["fisher"].check(resolve_options("fisher", {"scaling": "1,2,3"}), 2)


# ------------------------------------------------------------------------------------- the CLI, mini world
MINI_BASE = REPO / "tvtool" / "data" / "tvtool-mini.safetensors"
LAST = "visual.transformer.resblocks.3.mlp.c_proj."


def _mini_vector(path: Path, task: str, seed: int, only: str | None = None, mode: str = "full") -> dict:
    from tvtool.checkpoints import open_weights
    from tvtool.safetensors_io import fingerprint
    from tvtool.taskvector import history_entry, new_meta, write_vector

    base = open_weights(MINI_BASE)
    rng = np.random.default_rng(seed)
    keys = [k for k in base.keys() if k.startswith("visual.")]
    tensors = {k: ((0.02 * rng.standard_normal(base.shape(k))) if only is None or k.startswith(only)
                   else np.zeros(base.shape(k))).astype(np.float32) for k in keys}
    meta = new_meta({"model": "tvtool-mini", "pretrained": "builtin", "fingerprint": fingerprint(base)},
                    tasks=[task], mode=mode, history=[history_entry("finetune", task=task, mode=mode, steps=1)])
    write_vector(path, tensors, meta)
    return tensors


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    d = tmp_path_factory.mktemp("mini_data_merge")
    vecs = {"a": _mini_vector(d / "a.st", "mini-shapes", 0), "b": _mini_vector(d / "b.st", "mini-colors", 1),
            "c": _mini_vector(d / "c.st", "mini-digits", 2),
            "p": _mini_vector(d / "p.st", "mini-shapes", 3, only=LAST),
            "q": _mini_vector(d / "q.st", "mini-shapes", 4, only=LAST)}
    _mini_vector(d / "lin.st", "mini-shapes", 5, mode="linear")
    return d, vecs


def _read(path):
    from tvtool.taskvector import open_vector

    v = open_vector(path)
    return {k: v.get(k).clone() for k in v.keys()}, v.meta


def _ok(r):
    assert r.returncode == 0, r.stderr[-2000:]


def test_cli_regmean_three_tasks_and_one_task_returns_its_vector(mini):
    d, vecs = mini
    _ok(run_tvtool("merge", "-m", "regmean", "a.st", "b.st", "c.st", "-O", "examples=16", "-O", "batch=8",
                   "--device", "cpu", "-o", "r3.st", cwd=d, timeout=300))
    out, meta = _read(d / "r3.st")
    entry = meta["history"][-1]
    assert entry["method"] == "regmean" and entry["options"]["ratio"] == 0.95 and entry["seed"] == 0
    assert entry["data"]["examples"] == {"mini-shapes": 16, "mini-colors": 16, "mini-digits": 16}
    assert [i["path"] for i in entry["inputs"]] == ["a.st", "b.st", "c.st"]
    assert meta["tasks"] == ["mini-shapes", "mini-colors", "mini-digits"]
    k = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    mean = (vecs["a"][k] + vecs["b"][k] + vecs["c"][k]) / 3
    assert not np.allclose(out[k].numpy(), mean, atol=1e-4)  # a linear layer: not the mean
    bias = "visual.transformer.resblocks.0.mlp.c_fc.bias"
    np.testing.assert_allclose(out[bias].numpy(), (vecs["a"][bias] + vecs["b"][bias] + vecs["c"][bias]) / 3,
                               atol=1e-6)
    # one task: (G)^-1 G tau = tau, whatever G
    _ok(run_tvtool("merge", "-m", "regmean", "a.st", "-O", "examples=8", "--device", "cpu", "-o", "r1.st", cwd=d,
                   timeout=300))
    one, _ = _read(d / "r1.st")
    for key in ("visual.transformer.resblocks.2.attn.in_proj_weight", "visual.transformer.resblocks.2.attn."
                "out_proj.weight", k, "visual.proj"):
        np.testing.assert_allclose(one[key].numpy(), vecs["a"][key], atol=2e-4 * np.abs(vecs["a"][key]).max())


def test_cli_regmean_with_identical_grams_is_the_mean_and_eval_takes_it(mini):
    """Two vectors that move only the last c_proj, on the same task's same images: that layer's inputs, hence its
    Gram matrices, are the same for both models, so RegMean gives the plain mean."""
    d, vecs = mini
    _ok(run_tvtool("merge", "-m", "regmean", "p.st", "q.st", "--tasks", "mini-shapes,mini-shapes", "-O",
                   "examples=16", "--device", "cpu", "-o", "pq.st", cwd=d, timeout=300))
    out, _ = _read(d / "pq.st")
    w = LAST + "weight"
    mean = (vecs["p"][w] + vecs["q"][w]) / 2
    # float32 solve of a 512 x 512 system from 16 x 17 token rows: equal to ~1e-3 of the values' scale
    np.testing.assert_allclose(out[w].numpy(), mean, atol=2e-3 * np.abs(mean).max())
    assert not np.allclose(out[w].numpy(), vecs["p"][w], atol=1e-2 * np.abs(mean).max())
    r = run_tvtool("eval", "addition", "p.st", "--merged", "pq.st", "--max-examples", "8", "--device", "cpu",
                   "--json", cwd=d, timeout=300)
    _ok(r)
    import json

    assert json.loads(r.stdout)["grid"] == [1.0]  # the method's own grid (alpha 1), from the history


def test_cli_fisher_one_task_and_two_tasks(mini):
    d, vecs = mini
    _ok(run_tvtool("merge", "-m", "fisher", "a.st", "-O", "examples=8", "--device", "cpu", "-o", "f1.st", cwd=d,
                   timeout=300))
    one, _ = _read(d / "f1.st")
    for key in one:  # weights c (F + eps) / c (F + eps) = 1
        np.testing.assert_allclose(one[key].numpy(), vecs["a"][key], atol=1e-6)
    _ok(run_tvtool("merge", "-m", "fisher", "a.st", "b.st", "-O", "examples=8", "-O", "batch=4", "--seed", "3",
                   "--device", "cpu", "-o", "f2.st", cwd=d, timeout=300))
    two, meta = _read(d / "f2.st")
    assert meta["history"][-1]["seed"] == 3
    k = "visual.transformer.resblocks.1.attn.in_proj_weight"
    lo, hi = np.minimum(vecs["a"][k], vecs["b"][k]), np.maximum(vecs["a"][k], vecs["b"][k])
    assert np.all(two[k].numpy() >= lo - 1e-6) and np.all(two[k].numpy() <= hi + 1e-6)  # a convex combination
    assert not np.allclose(two[k].numpy(), (vecs["a"][k] + vecs["b"][k]) / 2, atol=1e-5)


def test_cli_refusals_are_one_line(mini):
    d, _ = mini
    r = run_tvtool("merge", "-m", "ties", "a.st", "b.st", "--data-root", str(d), "-o", "t.st", cwd=d)
    assert r.returncode != 0 and "--data-root is for data-aware methods" in r.stderr and "Traceback" not in r.stderr
    assert not (d / "t.st").exists()
    r = run_tvtool("merge", "-m", "regmean", "a.st", "lin.st", "-o", "x.st", "--device", "cpu", cwd=d)
    assert r.returncode != 0 and "linearized" in r.stderr and "Traceback" not in r.stderr
    r = run_tvtool("merge", "-m", "regmean", "a.st", "b.st", "--tasks", "mini-shapes", "-o", "x.st", cwd=d)
    assert r.returncode != 0 and "one task per vector" in r.stderr
    assert not (d / "x.st").exists()
    r = run_tvtool("merge", "--list")
    assert "regmean  [data-aware]" in r.stdout and "fisher  [data-aware]" in r.stdout and "Jin et al." in r.stdout


def test_recipe_data_aware_step_merges_from_theta0(tmp_path):
    """A recipe's regmean step after a ties step (whose addition search leaves the tower moved) gives the same
    vector as `merge_with_data` on a fresh model: the step's statistics are taken from theta_0 + tau_t."""
    import yaml

    from tvtool.data_merge import merge_with_data
    from tvtool.recipes import parse_recipe, run_recipe

    doc = {"model": "tvtool-mini", "out_dir": str(tmp_path / "runs"), "tasks": ["mini-shapes", "mini-colors"],
           "finetune": {"lr": 0.001, "max_steps": 2, "warmup_steps": 1, "batch_size": 32, "eval": False},
           "variants": [{"name": "ft", "mode": "full"}],
           "eval": {"merge": [{"method": "ties", "grid": "1"},
                              {"method": "regmean", "options": {"examples": 8}, "seed": 2, "grid": "0.5,1"}]}}
    r = parse_recipe(yaml.safe_load(yaml.safe_dump(doc)), "test")
    res = run_recipe(r, log=lambda m: None, device="cpu")["variants"]["ft"]["merge-regmean"]
    folder = tmp_path / "runs" / "ft"
    assert res["grid"] == [0.5, 1.0]
    ours, meta = _read(folder / "merge-regmean.st")
    assert meta["history"][-1]["seed"] == 2
    merge_with_data("regmean", [folder / "mini-shapes.st", folder / "mini-colors.st"], tmp_path / "alone.st",
                    {"examples": 8}, seed=2, device="cpu")
    alone, _ = _read(tmp_path / "alone.st")
    for k in alone:
        torch.testing.assert_close(ours[k], alone[k], rtol=1e-5, atol=1e-7)
