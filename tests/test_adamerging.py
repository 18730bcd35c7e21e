"""AdaMerging (tvtool/adamerging.py, `tvtool eval adamerging`): the entropy objective and the coefficient handling
against FusionBench 0.2.33's code, the gradient against finite differences, the CLI end to end on tvtool-mini, and
the one-line refusals."""
from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from cli_helpers import REPO, run_tvtool
from peer_helpers import load_by_path, sys_modules_restored
from tvtool import adamerging as ada
from tvtool import taskvector as tv

MINI_BASE = REPO / "tvtool" / "data" / "tvtool-mini.safetensors"


# --------------------------------------------------------------------------------------------------- FusionBench
@pytest.fixture(scope="module")
def fusionbench(fusionbench_src):
    """FusionBench's entropy_loss and its task-/layer-wise merged-model wrappers, loaded by path from the wheel (the
    few FusionBench modules they import are loaded the same way or stubbed; nothing is installed)."""
    root = fusionbench_src / "fusion_bench"
    names = ["fusion_bench", "fusion_bench.utils", "fusion_bench.utils.dict", "fusion_bench.utils.type",
             "fusion_bench.models", "fusion_bench.models.utils"]
    with sys_modules_restored(names):
        for pkg in ("fusion_bench", "fusion_bench.utils", "fusion_bench.models"):
            mod = types.ModuleType(pkg)
            mod.__path__ = []
            sys.modules[pkg] = mod
        sys.modules["fusion_bench.utils.dict"] = types.ModuleType("fusion_bench.utils.dict")
        sys.modules["fusion_bench.utils.dict"].dict_merge = lambda *a, **k: None  # not part of the merge maths
        load_by_path("fusion_bench.utils.type", root / "utils" / "type.py")
        load_by_path("fusion_bench.models.utils", root / "models" / "utils.py")
        return {"entropy": load_by_path("_fb_entropy", root / "method" / "adamerging" / "entropy_loss.py"),
                "layer": load_by_path("_fb_layer_wise", root / "models" / "wrappers" / "layer_wise_fusion.py"),
                "task": load_by_path("_fb_task_wise", root / "models" / "wrappers" / "task_wise_fusion.py")}


def test_entropy_equals_fusionbench_entropy_loss(fusionbench):
    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 3.0, 40.0):
        logits = torch.randn(37, 11, generator=g) * scale
        theirs = fusionbench["entropy"].entropy_loss(logits)  # eps 1e-8 inside the log
        assert torch.allclose(ada.entropy(logits, eps=1e-8), theirs, rtol=1e-6, atol=1e-7)
        exact = -(logits.double().softmax(-1) * logits.double().log_softmax(-1)).sum(-1).mean()
        assert abs(float(ada.entropy(logits)) - float(exact)) <= 1e-6 * max(1.0, float(exact))
    # the authors' exact entropy differs from FusionBench's only where p is tiny: never by more than C * eps
    assert abs(float(ada.entropy(logits)) - float(theirs)) < 11 * 1e-8 * 10


def _tiny_models(t_count=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pre = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.GELU(), torch.nn.Linear(5, 4))
    fts = []
    for _ in range(t_count):
        m = copy.deepcopy(pre)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
        fts.append(m)
    return pre, fts


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_merge_and_gradient_equal_fusionbench_wrappers(fusionbench, granularity):
    """The merged parameters, the entropy and its gradient in the coefficients (clipped to [0, 1], some outside)
    equal FusionBench's Layer-/TaskWiseMergedModel."""
    pre, fts = _tiny_models()
    names = [n for n, _ in pre.named_parameters()]
    theta0 = {n: p.detach().clone() for n, p in pre.named_parameters()}
    stacked = {n: torch.stack([dict(m.named_parameters())[n].detach() - theta0[n] for m in fts]) for n in names}
    groups, _ = ada.layer_groups(names, granularity)
    g = torch.Generator().manual_seed(1)
    raw0 = torch.rand(len(fts), len(set(groups.values())), generator=g) * 0.8 + 0.1
    raw0[0, 0], raw0[1, -1] = -0.2, 1.3  # one below 0, one above 1
    if granularity == "layer":
        theirs = fusionbench["layer"].LayerWiseMergedModel(raw0.clone(), copy.deepcopy(pre), copy.deepcopy(fts),
                                                           clamp_weights=True, tie_weights=True, strict=False)
    else:
        theirs = fusionbench["task"].TaskWiseMergedModel(raw0[:, 0].clone(), copy.deepcopy(pre), copy.deepcopy(fts),
                                                         clamp_weights=True, tie_weights=True, strict=False)
    x = torch.randn(13, 6, generator=g)
    their_state = theirs.merge_weights()
    raw = raw0.clone().requires_grad_()
    ours = ada.merged_parameters(theta0, stacked, ada.coefficients(raw, True), groups)
    for n in names:
        assert torch.allclose(ours[n], their_state[n], rtol=1e-6, atol=1e-6), n
    their_loss = fusionbench["entropy"].entropy_loss(theirs(x))
    their_loss.backward()
    our_loss = ada.entropy(torch.func.functional_call(pre, ours, (x,)), eps=1e-8)
    our_loss.backward()
    assert torch.allclose(our_loss, their_loss, rtol=1e-6)
    their_grad = theirs.merge_weight.grad.reshape(raw.shape)
    assert torch.allclose(raw.grad, their_grad, rtol=1e-5, atol=1e-7)
    outside = (raw0 < 0) | (raw0 > 1)
    assert outside.any() and not raw.grad[outside].any()  # the clip passes no gradient outside [0, 1]


# --------------------------------------------------------------------------------------------------- the learner
def _mini_learner(tmp_path, granularity="layer", scale=0.05, n=12, seed=0, **options):
    """A random tvtool-mini tower, two tasks with random heads and images, and two task vectors on every tensor."""
    import open_clip

    from tvtool.evaluate import Evaluator
    from tvtool.formats.arch import register_builtin

    register_builtin()
    torch.manual_seed(seed)
    visual = open_clip.create_model("tvtool-mini", pretrained=None).visual.float()
    g = torch.Generator().manual_seed(seed)
    dim = visual(torch.zeros(1, 3, visual.image_size[0], visual.image_size[0])).shape[-1]
    size = visual.image_size[0]
    tasks = ("ta", "tb")
    heads = {t: torch.randn(3 + i, dim, generator=g) * 20 for i, t in enumerate(tasks)}
    inputs = {(t, "test"): (torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                            torch.randint(0, 3, (n,), generator=g)) for t in tasks}
    ev = Evaluator.from_parts(visual, heads, inputs, mean=(0.48, 0.45, 0.4), std=(0.27, 0.26, 0.28))
    paths = []
    for i, t in enumerate(tasks):
        tensors = {"visual." + k: torch.randn(p.shape, generator=g) * scale for k, p in visual.named_parameters()}
        paths.append(tmp_path / f"{t}.st")
        tv.write_vector(paths[-1], tensors, tv.new_meta({"model": "tvtool-mini"}, tasks=[t], mode="full"))
    vectors = [tv.open_vector(p) for p in paths]
    learner = ada.AdaMerging(ev, vectors, {"granularity": granularity, "batch_size": n, **options})
    return learner, ev, inputs


def test_gradient_equals_finite_differences_and_the_step_gradient(tmp_path):
    learner, ev, inputs = _mini_learner(tmp_path)
    batches = {t: x for (t, _), (x, _) in inputs.items()}
    raw = learner.raw.detach().clone()
    g = torch.Generator().manual_seed(3)
    raw += torch.rand(raw.shape, generator=g) * 0.2  # away from the clip's edges, coefficients differ
    with torch.no_grad():
        for p in ev.visual.parameters():
            p.requires_grad_(False)
    r = raw.clone().requires_grad_()
    learner.objective(r, batches).backward()
    grad = r.grad
    coords = [(0, 0), (1, 0), (0, raw.shape[1] - 1), (1, raw.shape[1] // 2), (1, raw.shape[1] - 5)]
    h = 1e-2
    for i, j in coords:
        plus, minus = raw.clone(), raw.clone()
        plus[i, j] += h
        minus[i, j] -= h
        with torch.no_grad():
            fd = (learner.objective(plus, batches) - learner.objective(minus, batches)) / (2 * h)
        assert abs(float(fd) - float(grad[i, j])) <= 2e-2 * abs(float(grad[i, j])) + 2e-4, (i, j, fd, grad[i, j])
    assert grad.abs().max() > 1e-3  # the check is not vacuous

    # one training step computes the same gradient in two stages (per-task backward, then one merge backward)
    class Recorder:
        def zero_grad(self, set_to_none=True):
            learner.raw.grad = None

        def step(self):
            self.grad = learner.raw.grad.clone()

    with torch.no_grad():
        learner.raw.copy_(raw)
    rec = Recorder()
    learner.step(rec)  # batch_size = n: every step sees each whole split (in a shuffled order)
    assert torch.allclose(rec.grad, grad, rtol=1e-4, atol=1e-6)


def test_task_wise_fit_lowers_the_entropy_and_the_merged_vector_is_the_weighted_sum(tmp_path):
    learner, ev, inputs = _mini_learner(tmp_path, granularity="task", lr=0.005, steps=4)
    assert learner.raw.shape == (2, 1)
    before = sum(learner.split_entropy(learner.lambdas()).values())
    curve = learner.fit()
    after = sum(learner.split_entropy(learner.lambdas()).values())
    assert len(curve) == 4 and after < before
    lam = learner.lambdas()
    assert not torch.allclose(lam, torch.full_like(lam, 0.3))
    merged = learner.merged()
    for k in learner.keys:
        expect = sum(float(lam[t, 0]) * learner.vectors[t].get(k) for t in range(2))
        assert torch.allclose(merged[k], expect, rtol=1e-6, atol=1e-8), k


# --------------------------------------------------------------------------------------------------- the CLI
def _mini_vector(path: Path, task: str, seed: int, mode: str = "full", scale: float = 0.05) -> dict:
    from tvtool.checkpoints import open_weights
    from tvtool.safetensors_io import fingerprint

    base = open_weights(MINI_BASE)
    rng = np.random.default_rng(seed)
    tensors = {k: (scale * rng.standard_normal(base.shape(k))).astype(np.float32) for k in base.keys()
               if k.startswith("visual.")}
    meta = tv.new_meta({"model": "tvtool-mini", "pretrained": "builtin", "fingerprint": fingerprint(base)},
                       tasks=[task], mode=mode, history=[tv.history_entry("finetune", task=task, mode=mode, steps=1)])
    tv.write_vector(path, tensors, meta)
    return tensors


@pytest.fixture(scope="module")
def mini_vectors(tmp_path_factory):
    d = tmp_path_factory.mktemp("ada")
    taus = [_mini_vector(d / "shapes.st", "mini-shapes", 0), _mini_vector(d / "colors.st", "mini-colors", 1)]
    _mini_vector(d / "lin.st", "mini-shapes", 2, mode="linear")
    return d, taus


def test_cli_writes_the_learned_weighted_sum_and_lowers_the_entropy(mini_vectors, tmp_path):
    d, taus = mini_vectors
    out = tmp_path / "ada.st"
    args = ["eval", "adamerging", d / "shapes.st", d / "colors.st", "--steps", "5", "--lr", "0.02",
            "--max-examples", "16", "--adapt-batch-size", "16", "--device", "cpu", "--json", "-o", out]
    r = run_tvtool(*args, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["kind"] == "adamerging" and result["tasks"] == ["mini-shapes", "mini-colors"]
    assert result["options"]["granularity"] == "layer" and result["options"]["steps"] == 5
    assert result["entropy"]["final_sum"] < result["entropy"]["init_sum"]
    assert len(result["loss_curve"]) == 5 and set(result["test_acc"]) == {"mini-shapes", "mini-colors"}
    assert result["abs_acc"] == pytest.approx(sum(result["test_acc"].values()) / 2)
    norm = [result["test_acc"][t] / result["finetuned_acc"]["test"][t] for t in result["tasks"]]
    assert result["norm_acc"] == pytest.approx(sum(norm) / 2)
    assert f"wrote {out}" in r.stderr

    got = load_file(out)
    entry = tv.open_vector(out).meta["history"][-1]
    assert entry["op"] == "merge" and entry["method"] == "adamerging" and entry["options"]["lr"] == 0.02
    lambdas = entry["lambdas"]
    assert lambdas == result["lambdas"] and lambdas["granularity"] == "layer" and lambdas["clamped"]
    values = lambdas["values"]
    assert set(got) == set(taus[0])
    moved = 0
    for k in got:
        lam = [values["mini-shapes"][k], values["mini-colors"][k]]
        assert all(0.0 <= x <= 1.0 for x in lam)
        moved += any(abs(x - 0.3) > 1e-4 for x in lam)
        np.testing.assert_allclose(got[k], lam[0] * taus[0][k] + lam[1] * taus[1][k], rtol=1e-5, atol=1e-7)
    assert moved > len(got) // 2  # the coefficients were learned per tensor
    assert tv.open_vector(out).tasks == ["mini-shapes", "mini-colors"]

    again = run_tvtool(*args[:-2], "-o", out)  # an existing output is refused before any work, left as it was
    assert again.returncode == 1 and "already exists" in again.stderr and again.stderr.count("\n") == 1
    assert load_file(out).keys() == got.keys()


@pytest.mark.parametrize("extra, needle", [
    (["--steps", "0"], "--steps 0 is out of range"),
    (["--lr", "0"], "--lr 0.0 is out of range"),
    (["--lr", "nan"], "--lr must be finite"),
    (["--adapt-batch-size", "0"], "--adapt-batch-size 0 is out of range"),
    (["--entropy-eps", "-1"], "--entropy-eps -1.0 is out of range"),
    (["-o", "-"], "-o -: stdout carries this command's table or JSON"),
])
def test_bad_options_fail_in_one_line_before_any_work(mini_vectors, tmp_path, extra, needle):
    d, _ = mini_vectors
    r = run_tvtool("eval", "adamerging", d / "shapes.st", d / "colors.st", *extra, cwd=tmp_path)
    assert r.returncode == 1 and needle in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())  # no default-named output left behind


def test_linear_vectors_and_the_file_only_merge_are_refused(mini_vectors, tmp_path):
    d, _ = mini_vectors
    r = run_tvtool("eval", "adamerging", d / "lin.st", d / "colors.st", cwd=tmp_path)
    assert r.returncode == 1 and "linear-mode (tangent) vectors are not supported" in r.stderr
    assert r.stderr.count("\n") == 1
    m = run_tvtool("merge", "-m", "adamerging", d / "shapes.st", d / "colors.st", cwd=tmp_path)
    assert m.returncode == 1 and m.stderr.count("\n") == 1 and "Traceback" not in m.stderr
    assert "needs the model and the tasks' data" in m.stderr and "run `tvtool eval adamerging" in m.stderr
    assert not list(tmp_path.iterdir())
    listing = run_tvtool("merge", "--list")
    assert "adamerging  [data-aware]" in listing.stdout and "run with: tvtool eval adamerging" in listing.stdout
