"""Evaluation: accuracy, alpha searches, negation threshold, in-place weights, disentanglement, CLI."""
import copy
import json
import zlib

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from tvtool import evaluate as ev
from tvtool.errors import TVToolError
from tvtool.taskvector import new_meta, open_vector, write_vector

BASE = {"model": "tiny", "pretrained": "none", "fingerprint": None}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest single-threaded, and 2 shared cores are oversubscribed by intra-op threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ tiny parts
def _linear_visual(weight):
    """visual(x) = W @ flatten(x): logits we can predict by hand."""
    m = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        m[1].weight.copy_(weight)
    return m


def _write(path, tensors, task, metrics=None):
    meta = new_meta(BASE, tasks=[task], mode="full", fingerprint=f"fp:{path.name}")
    if metrics is not None:
        meta["metrics"] = metrics
    write_vector(path, tensors, meta)
    return open_vector(path)


def _random_parts(seed=0, n=40, classes=3, dim=4, tasks=("t1", "t2")):
    g = torch.Generator().manual_seed(seed)
    visual = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 8), nn.Tanh(), nn.Linear(8, dim))
    with torch.no_grad():
        for p in visual.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    heads = {t: torch.randn(classes, dim, generator=g) * 10 for t in tasks}
    inputs = {(t, s): (torch.randint(0, 256, (n, 3, 2, 2), generator=g, dtype=torch.uint8),
                       torch.randint(0, classes, (n,), generator=g)) for t in tasks for s in ("val", "test")}
    taus = {t: {"visual." + k: torch.randn(p.shape, generator=g) for k, p in visual.named_parameters()}
            for t in tasks}
    return visual, heads, inputs, taus


def _direct_preds(visual, params, head, x, mean=0.0, std=1.0):
    """Independent forward: functional_call with explicit weights, normalization written out."""
    xn = (x.float() / 255 - mean) / std
    feats = functional_call(visual, params, (xn,))
    return (torch.nn.functional.normalize(feats, dim=-1) @ head.T).argmax(-1)


def _combined(visual, terms):
    base = dict(visual.named_parameters())
    return {k: base[k].detach() + sum(c * tau["visual." + k] for tau, c in terms) for k in base}


# ------------------------------------------------------------------------------------------------ accuracy
def test_accuracy_hand_computed():
    # 2x2 single-channel-ish images; W picks pixel (0,0,0) and (0,0,1): class = which of the two is brighter.
    w = torch.zeros(2, 12)
    w[0, 0], w[1, 1] = 1.0, 1.0
    x = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.tensor([200, 10, 200, 10], dtype=torch.uint8)
    x[:, 0, 0, 1] = torch.tensor([10, 200, 10, 200], dtype=torch.uint8)
    y = torch.tensor([0, 1, 1, 1])  # predictions are [0, 1, 0, 1]: 3 of 4 correct
    e = ev.Evaluator.from_parts(_linear_visual(w), {"t": torch.eye(2)}, {("t", "test"): (x, y)},
                                mean=(0, 0, 0), std=(1, 1, 1), batch_size=3)
    assert e.accuracy("t", "test") == pytest.approx(0.75)
    # tau swaps the two rows at alpha=1 (W + tau = swapped W): predictions flip, 1 of 4 correct
    tau = {"visual.1.weight": w.flip(0) - w}
    e.set_weights(tau, 1.0)
    assert e.accuracy("t", "test") == pytest.approx(0.25)
    e.set_weights(tau, 0.0)
    assert e.accuracy("t", "test") == pytest.approx(0.75)


def test_predictions_match_direct_forward_and_batching():
    visual, heads, inputs, taus = _random_parts()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    ref = copy.deepcopy(visual)
    e = ev.Evaluator.from_parts(visual, heads, inputs, mean=mean, std=std, batch_size=7)
    e.set_weights(taus["t1"], 0.3)
    x, y = inputs[("t1", "test")]
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    direct = _direct_preds(ref, _combined(ref, [(taus["t1"], 0.3)]), heads["t1"], x, m, s)
    assert torch.equal(e.predict("t1", "test"), direct)
    assert e.accuracy("t1", "test") == pytest.approx(direct.eq(y).float().mean().item())


def test_in_place_update_equals_rebuilt_open_clip_model():
    from tvtool.models import load_clip

    torch.manual_seed(0)
    visual = load_clip("tvtool-mini", "random", device="cpu").model.visual
    g = torch.Generator().manual_seed(1)
    tau = {"visual." + k: 0.02 * torch.randn(p.shape, generator=g) for k, p in visual.named_parameters()
           if p.ndim == 2}
    other = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in list(tau.items())[:3]}
    x = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g)
    head = torch.randn(5, visual.output_dim, generator=g)
    rebuilt = copy.deepcopy(visual)
    theta0 = {k: v.clone() for k, v in rebuilt.state_dict().items()}
    e = ev.Evaluator.from_parts(visual, {"t": head}, {("t", "test"): (x, torch.zeros(10, dtype=torch.long))},
                                mean=(0.5,) * 3, std=(0.25,) * 3)
    e.set_weights(other, 2.0)  # something else first: set_weights must fully replace it
    e.set_weights(tau, 0.7)
    rebuilt.load_state_dict({k: v + 0.7 * tau["visual." + k] if "visual." + k in tau else v
                             for k, v in theta0.items()})
    for (k, p), (_, q) in zip(visual.named_parameters(), rebuilt.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), k
    xn = (x.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        ref = (torch.nn.functional.normalize(rebuilt(xn), dim=-1) @ head.T).argmax(-1)
    assert torch.equal(e.predict("t", "test"), ref)
    e.reset()
    for k, p in visual.named_parameters():
        assert torch.equal(p, theta0[k]), k


# ------------------------------------------------------------------------------------------------ searches
def test_addition_alpha_is_argmax_of_mean_normalized_accuracy():
    grid = ev.parse_grid("0:1:0.05")
    assert len(grid) == 21 and grid[0] == 0 and grid[-1] == 1 and grid[7] == pytest.approx(0.35)
    peaks, ft = {"a": 0.3, "b": 0.6}, {"a": 0.9, "b": 0.5}

    def fake(alpha):
        return {t: 0.8 - (alpha - p) ** 2 for t, p in peaks.items()}

    alpha, curve = ev.search_addition(grid, ["a", "b"], fake, ft)
    scores = np.array([np.mean([(0.8 - (a - peaks[t]) ** 2) / ft[t] for t in peaks]) for a in grid])
    assert alpha == grid[int(np.argmax(scores))]
    assert [c["mean_val_norm_acc"] for c in curve] == pytest.approx(scores.tolist())
    # ties -> the smallest alpha, whatever order the grid is given in
    alpha, _ = ev.search_addition([0.9, 0.2, 0.5], ["a"], lambda a: {"a": 0.5}, {"a": 1.0})
    assert alpha == 0.2


def test_negation_threshold_logic_and_no_alpha_case():
    # target falls with alpha; control falls too. zero-shot control 0.8 -> floor 0.76 at threshold 0.95
    table = {0.0: (0.9, 0.80), 0.25: (0.6, 0.79), 0.5: (0.3, 0.77), 0.75: (0.1, 0.70), 1.0: (0.05, 0.5)}
    alpha, curve = ev.search_negation(list(table), table.__getitem__, 0.8, 0.95)
    assert alpha == 0.5  # 0.75 and 1.0 reach lower target accuracy but break the control floor
    assert [c["qualifies"] for c in curve] == [True, True, True, False, False]
    alpha, _ = ev.search_negation([0.75, 1.0], table.__getitem__, 0.8, 0.95)
    assert alpha is None
    # ties in target accuracy -> smallest alpha
    alpha, _ = ev.search_negation([0.5, 0.25], lambda a: (0.3, 0.8), 0.8)
    assert alpha == 0.25


def test_parse_grid_errors_and_lists():
    assert ev.parse_grid("-2:2:0.5") == [-2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2]
    assert ev.parse_grid("0.5,0,0.5") == [0, 0.5]
    for bad in ("1:0:0.1", "0:1:0", "a:b", "0:1", ""):
        with pytest.raises(TVToolError):
            ev.parse_grid(bad)


# ------------------------------------------------------------------------------------------------ end to end
def test_addition_and_finetuned_metrics_cache(tmp_path):
    visual, heads, inputs, taus = _random_parts(seed=3)
    ref = copy.deepcopy(visual)
    v1 = _write(tmp_path / "t1.st", taus["t1"], "t1")  # no metrics: computed and cached
    v2 = _write(tmp_path / "t2.st", taus["t2"], "t2", metrics={"val_acc": 0.5, "test_acc": 0.6})
    before = (tmp_path / "t1.st").read_bytes()
    e = ev.Evaluator.from_parts(visual, heads, inputs, mean=(0, 0, 0), std=(1, 1, 1))
    grid = [0.0, 0.25, 0.5, 1.0]
    res = ev.addition(e, [v1, v2], grid)

    def acc(terms, t, s):
        x, y = inputs[(t, s)]
        return _direct_preds(ref, _combined(ref, terms), heads[t], x).eq(y).float().mean().item()

    ft_val = {"t1": acc([(taus["t1"], 1.0)], "t1", "val"), "t2": 0.5}
    assert res["finetuned_acc"]["val"]["t1"] == pytest.approx(ft_val["t1"])
    assert res["finetuned_source"] == {"t1/val": "computed", "t1/test": "computed", "t2/val": "metadata",
                                       "t2/test": "metadata"}
    scores = [np.mean([acc([(taus["t1"], a), (taus["t2"], a)], t, "val") / ft_val[t] for t in ("t1", "t2")])
              for a in grid]
    assert res["alpha"] == grid[int(np.argmax(scores))]
    a = res["alpha"]
    test = {t: acc([(taus["t1"], a), (taus["t2"], a)], t, "test") for t in ("t1", "t2")}
    assert res["abs_acc"] == pytest.approx(np.mean(list(test.values())))
    ft_test = {"t1": acc([(taus["t1"], 1.0)], "t1", "test"), "t2": 0.6}
    assert res["norm_acc"] == pytest.approx(np.mean([test[t] / ft_test[t] for t in test]))
    assert res["tvtool"] and res["grid"] == grid and res["vectors"][0]["fingerprint"] == v1.fingerprint
    # second run reads the cache; the input vector is never rewritten
    e2 = ev.Evaluator.from_parts(copy.deepcopy(ref), heads, inputs, mean=(0, 0, 0), std=(1, 1, 1))
    assert ev.finetuned_accuracy(e2, v1, "val") == (pytest.approx(ft_val["t1"]), "cache")
    assert (tmp_path / "t1.st").read_bytes() == before


def test_negation_end_to_end_and_no_alpha(tmp_path):
    visual, heads, inputs, taus = _random_parts(seed=5, tasks=("t1", "ctl"))
    ref = copy.deepcopy(visual)
    v = _write(tmp_path / "t1.st", taus["t1"], "t1")
    e = ev.Evaluator.from_parts(visual, heads, inputs, mean=(0, 0, 0), std=(1, 1, 1))
    grid = [0.0, 0.1, 0.2, 0.3]

    def acc(a, t, s):
        x, y = inputs[(t, s)]
        return _direct_preds(ref, _combined(ref, [(taus["t1"], -a)]), heads[t], x).eq(y).float().mean().item()

    res = ev.negation(e, v, "ctl", grid, threshold=0.9)
    zs = acc(0.0, "ctl", "val")
    ok = [a for a in grid if acc(a, "ctl", "val") >= 0.9 * zs]
    best = min(ok, key=lambda a: (acc(a, "t1", "val"), a))
    assert res["status"] == "ok" and res["alpha"] == best
    assert res["tar_acc"] == pytest.approx(acc(best, "t1", "test"))
    assert res["con_acc"] == pytest.approx(acc(best, "ctl", "test"))
    assert res["zeroshot"]["control_val_acc"] == pytest.approx(zs)
    res = ev.negation(e, v, "ctl", [0.2, 0.3], threshold=1.5)  # a floor above zero-shot: nothing qualifies
    assert res["status"] == ev.NO_ALPHA and res["alpha"] is None and res["tar_acc"] is None
    assert "no alpha" in res["message"]


def test_disentanglement_matches_direct_computation(tmp_path):
    visual, heads, inputs, taus = _random_parts(seed=7, n=30)
    ref = copy.deepcopy(visual)
    a = _write(tmp_path / "a.st", {k: 0.5 * v for k, v in taus["t1"].items()}, "t1")
    b = _write(tmp_path / "b.st", {k: 0.5 * v for k, v in taus["t2"].items()}, "t2")
    e = ev.Evaluator.from_parts(visual, heads, inputs, mean=(0, 0, 0), std=(1, 1, 1), batch_size=8)
    grid = [-1.0, 0.0, 1.0]
    res = ev.disentanglement(e, a, b, grid, split="test")
    t1 = {k: 0.5 * v for k, v in taus["t1"].items()}
    t2 = {k: 0.5 * v for k, v in taus["t2"].items()}
    expected = np.zeros((3, 3))
    for i, a1 in enumerate(grid):
        for j, a2 in enumerate(grid):
            for t, single in (("t1", [(t1, a1)]), ("t2", [(t2, a2)])):
                x, _ = inputs[(t, "test")]
                p_single = _direct_preds(ref, _combined(ref, single), heads[t], x)
                p_joint = _direct_preds(ref, _combined(ref, [(t1, a1), (t2, a2)]), heads[t], x)
                expected[i, j] += (p_single != p_joint).float().mean().item()
    assert np.allclose(res["error"], expected)
    assert res["error"][1][1] == 0.0  # xi(0, 0) = 0
    assert expected.max() > 0  # the case is not trivial
    ev.plot_disentanglement(res, tmp_path / "map.png")
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture
def mini_world(tmp_path, monkeypatch):
    """A random tvtool-mini saved to a file (stable fingerprint), two task vectors, fabricated data."""
    from safetensors.torch import save_file

    from tvtool.datasets import get_dataset
    from tvtool.models import load_clip

    torch.manual_seed(0)
    bundle = load_clip("tvtool-mini", "random", device="cpu")
    weights = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in bundle.model.state_dict().items()}, str(weights))
    fp = load_clip("tvtool-mini", str(weights), device="cpu").fingerprint
    g = torch.Generator().manual_seed(2)
    paths = []
    for task in ("mini-shapes", "mini-colors"):
        tau = {"visual." + k: 0.05 * torch.randn(p.shape, generator=g)
               for k, p in bundle.model.visual.named_parameters() if p.ndim == 2}
        meta = new_meta({"model": "tvtool-mini", "pretrained": str(weights), "fingerprint": fp}, tasks=[task],
                        mode="full", fingerprint=f"fp:{task}", metrics={"val_acc": 0.9, "test_acc": 0.8})
        write_vector(tmp_path / f"{task}.st", tau, meta)
        paths.append(str(tmp_path / f"{task}.st"))

    def fake_split(name, split, data_root=None, image_size=224):
        gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{split}".encode()))
        x = torch.randint(0, 256, (12, 3, image_size, image_size), dtype=torch.uint8, generator=gen)
        if name == "mini-control":  # each image under every label: accuracy is exactly 1/C for any weights
            c = get_dataset(name).num_classes
            return x[:3].repeat(c, 1, 1, 1), torch.arange(c).repeat_interleave(3)
        return x, torch.randint(0, 3, (12,), generator=gen)

    from tvtool.datasets import ImageSplit

    monkeypatch.setattr("tvtool.datasets.open_split", lambda *a, **k: ImageSplit.from_tensors(*fake_split(*a, **k)))
    return tmp_path, paths


def test_cli_accuracy_addition_disentanglement(mini_world, capsys):
    from tvtool.cli import main

    tmp, paths = mini_world
    assert main(["eval", "accuracy", *paths, "--alpha", "0.5", "--json", "--device", "cpu",
                 "--max-examples", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tasks"] == ["mini-shapes", "mini-colors"] and out["alpha"] == 0.5 and out["max_examples"] == 5
    assert all(0 <= a <= 1 and (5 * a) == pytest.approx(round(5 * a)) for a in out["accuracy"].values())
    assert out["base_fingerprint"] == open_vector(paths[0]).base_fingerprint

    assert main(["eval", "addition", *paths, "--grid", "0:1:0.5", "--json-out", str(tmp / "add.json"),
                 "--device", "cpu"]) == 0
    res = json.loads((tmp / "add.json").read_text())
    assert res["grid"] == [0, 0.5, 1] and res["alpha"] in res["grid"]
    assert res["finetuned_source"]["mini-shapes/val"] == "metadata"
    assert "Abs.Acc" in capsys.readouterr().out
    assert main(["eval", "addition", *paths, "--grid", "0:1:0.5", "--json-out", str(tmp / "add.json")]) == 1
    assert "already exists" in capsys.readouterr().err

    assert main(["eval", "disentanglement", *paths, "--grid", "-1:1:1", "--plot", str(tmp / "d.png"),
                 "--json", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["grid"]["alpha1"] == [-1, 0, 1] and res["error"][1][1] == 0.0
    assert (tmp / "d.png").is_file()


def test_cli_negation_and_bad_input(mini_world, capsys):
    from tvtool.cli import main
    from tvtool.datasets import get_dataset

    tmp, paths = mini_world
    # control accuracy is 1/C at every alpha: a floor of 1.01 x zero-shot cannot be met, 1.0 x always is
    assert main(["eval", "negation", paths[0], "--grid", "0.5,1", "--threshold", "1.01", "--device", "cpu"]) == 0
    assert "no alpha" in capsys.readouterr().out
    assert main(["eval", "negation", paths[0], "--grid", "0:1:0.5", "--threshold", "1", "--json", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["control"] == "mini-control" and res["status"] == "ok"
    c = get_dataset("mini-control").num_classes
    assert res["con_acc"] == pytest.approx(1 / c) and res["zeroshot"]["control_val_acc"] == pytest.approx(1 / c)
    assert main(["eval", "addition", str(tmp / "missing.st")]) == 1
    assert "no such file" in capsys.readouterr().err
    # without vectors: the task family's model (tests/test_cli_card.py); a real task's model is not cached offline
    assert main(["eval", "accuracy", "--tasks", "mnist", "--data-root", str(tmp)]) == 1
    assert "mnist" in capsys.readouterr().err
    assert main(["eval", "accuracy", paths[0], "--model", "tvtool-mini", "--pretrained", "random"]) == 1
    assert "taken against base" in capsys.readouterr().err


def test_linearized_evaluator_matches_first_order_formula():
    """The tangent-model evaluator computes f(theta_0) + J (alpha tau): checked against a float64 central finite
    difference of the ordinary model, and its predictions against the head applied to those features."""
    import copy

    import open_clip
    import torch

    from tvtool.evaluate import Evaluator
    from tvtool.formats.arch import register_builtin

    torch.manual_seed(0)
    register_builtin()  # tvtool-mini in open_clip's registry
    model = open_clip.create_model("tvtool-mini", pretrained=None)
    visual = model.visual.eval()
    ref = copy.deepcopy(visual).double()
    head = torch.nn.functional.normalize(torch.randn(5, 96), dim=-1) * 100
    x = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 5, (12,))
    ev = Evaluator.from_parts(visual, {"t": head}, {("t", "test"): (x, y)}, [0.5] * 3, [0.25] * 3)
    ev._linearize()
    tau = {f"visual.{n}": 1e-2 * torch.randn_like(p) for n, p in visual.named_parameters()}
    ev.set_weights(tau, 2.0)
    xb = (x.float() / 255 - 0.5) / 0.25
    theta0 = {n: p.detach() for n, p in ref.named_parameters()}
    h = 1e-4
    with torch.no_grad():
        def f(sign):
            params = {n: p + sign * h * 2.0 * tau[f"visual.{n}"].double() for n, p in theta0.items()}
            return torch.func.functional_call(ref, params, (xb.double(),))
        expected = ref(xb.double()) + (f(1) - f(-1)) / (2 * h)
        got = ev.visual(xb)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got.double(), ref(xb.double()), atol=1e-3)  # tau really moved the features
    feats = torch.nn.functional.normalize(got, dim=-1)
    assert torch.equal(ev.predict("t", "test"), (feats @ head.T).argmax(-1))


def test_tangent_sweep_matches_pointwise_evaluation(monkeypatch):
    """The tangent model's grid sweep (features f0 + a * J tau from one jvp per batch) gives the same accuracies as
    applying theta_0 + a * tau and evaluating each point, with one jvp per batch for the whole grid."""
    import open_clip
    import torch

    from tvtool.evaluate import Evaluator
    from tvtool.formats.arch import register_builtin

    torch.manual_seed(0)
    register_builtin()  # tvtool-mini in open_clip's registry
    visual = open_clip.create_model("tvtool-mini", pretrained=None).visual
    heads = {t: torch.nn.functional.normalize(torch.randn(5, 96), dim=-1) * 100 for t in ("a", "b")}
    inputs = {(t, "val"): (torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 5, (40,)))
              for t in ("a", "b")}
    ev = Evaluator.from_parts(visual, heads, inputs, [0.5] * 3, [0.25] * 3, batch_size=16)
    ev._linearize()
    tau = {f"visual.{n}": 0.05 * torch.randn_like(p) for n, p in visual.named_parameters() if p.ndim == 2}
    alphas = [-1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 2.0]
    expected = []
    for a in alphas:
        ev.set_weights(tau, a)
        expected.append(ev.accuracies(["a", "b"], "val"))
    passes, real = [], ev.visual.pair
    ev.visual.pair = lambda *args: passes.append(1) or real(*args)
    monkeypatch.setattr("tvtool.evaluate.SWEEP_CHUNK", 3)  # 7 points in chunks of 3, 3 and 1
    seen = []
    got = ev.sweep(tau, alphas, ["a", "b"], "val", on_point=lambda i, a, acc: seen.append((i, a)))
    assert got == expected
    assert len({round(r["a"], 6) for r in got}) > 2  # the grid really moves the accuracy
    assert len(passes) == 2 * 3  # 2 tasks x ceil(40 / 16) batches, not x 7 alphas
    assert seen == list(enumerate(alphas))
    assert all(torch.equal(p, ev._theta0[k]) for k, p in ev._params.items())  # left at theta_0
    bad = {"visual.conv1.weight": torch.zeros(3)}
    with pytest.raises(TVToolError, match="has shape"):
        ev.sweep(bad, [1.0], ["a"], "val")


def test_tangent_disentanglement_map_matches_pointwise_evaluation(tmp_path):
    """On the tangent model the error map comes from one jvp pass per vector and batch (features affine in
    (a1, a2)); the same tower evaluated point by point gives the same map."""
    import open_clip

    from tvtool.formats.arch import register_builtin

    torch.manual_seed(1)
    register_builtin()  # tvtool-mini in open_clip's registry
    visual = open_clip.create_model("tvtool-mini", pretrained=None).visual
    heads = {t: torch.nn.functional.normalize(torch.randn(4, 96), dim=-1) * 100 for t in ("t1", "t2")}
    inputs = {(t, "test"): (torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 4, (30,)))
              for t in ("t1", "t2")}
    e = ev.Evaluator.from_parts(visual, heads, inputs, [0.5] * 3, [0.25] * 3, batch_size=16)
    e._linearize()
    taus = [{f"visual.{n}": 0.05 * torch.randn_like(p) for n, p in visual.named_parameters() if p.ndim == 2}
            for _ in range(2)]
    a, b = _write(tmp_path / "a.st", taus[0], "t1"), _write(tmp_path / "b.st", taus[1], "t2")
    grid = [-1.0, 0.0, 0.5, 1.5]
    passes, real = [], e.visual.pair
    e.visual.pair = lambda *args: passes.append(1) or real(*args)
    fast = ev.disentanglement(e, a, b, grid)
    assert len(passes) == 2 * 2 * 2  # 2 tasks x 2 batches x 2 vectors, for all 16 points
    e.linearized = False  # the same tangent tower, one evaluation per point
    slow = ev.disentanglement(e, a, b, grid)
    assert fast["error"] == slow["error"] and fast["error_task1"] == slow["error_task1"]
    assert max(map(max, fast["error"])) > 0.1 and fast["error"][1][1] == 0.0  # (0, 0) is theta_0 for both


def test_a_misshapen_vector_is_refused_before_any_weight_moves():
    visual, heads, inputs, taus = _random_parts()
    e = ev.Evaluator.from_parts(visual, heads, inputs, [0.0] * 3, [1.0] * 3)
    good = taus["t1"]
    e.set_weights(good, 0.5)
    before = {k: p.detach().clone() for k, p in e._params.items()}
    bad = dict(taus["t2"])
    last = sorted(bad)[-1]
    bad[last] = torch.zeros(3)
    with pytest.raises(TVToolError, match=f"task vector tensor {last} has shape"):
        e.set_combination([(good, 1.0), (bad, 1.0)])
    assert all(torch.equal(e._params[k], before[k]) for k in before)  # still theta_0 + 0.5 tau_1
    assert not all(torch.equal(e._params[k], e._theta0[k]) for k in before)
    e.reset()  # and it still knows what to restore
    assert all(torch.equal(e._params[k], e._theta0[k]) for k in before)


def test_zero_shot_counts_are_computed_once():
    import open_clip
    import torch

    from tvtool.evaluate import Evaluator
    from tvtool.formats.arch import register_builtin

    torch.manual_seed(0)
    register_builtin()  # tvtool-mini in open_clip's registry
    visual = open_clip.create_model("tvtool-mini", pretrained=None).visual
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    ev = Evaluator.from_parts(visual, {"t": torch.randn(4, 96)}, {("t", "val"): (x, torch.randint(0, 4, (8,)))},
                              [0.5] * 3, [0.25] * 3)
    calls = []
    real = ev.predict
    ev.predict = lambda *a: calls.append(a) or real(*a)
    tau = {f"visual.{n}": torch.randn_like(p) for n, p in visual.named_parameters()}
    zs = ev.accuracy("t", "val")
    ev.set_weights(tau, 0.0)  # alpha = 0 is theta_0: the remembered count
    assert ev.accuracy("t", "val") == zs and len(calls) == 1
    ev.set_weights(tau, 0.5)
    moved = ev.accuracy("t", "val")
    ev.reset()
    assert ev.accuracy("t", "val") == zs and len(calls) == 2
    assert isinstance(moved, float)


def test_cli_progress_lines_per_task_and_alpha_point(mini_world, capsys):
    from tvtool.cli import main

    tmp, paths = mini_world
    assert main(["eval", "addition", *paths, "--grid", "0:1:0.5", "--json", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout stays pure JSON; progress goes to stderr
    err = captured.err.splitlines()
    assert [ln for ln in err if "fine-tuned accuracy of" in ln] == [
        "addition: fine-tuned accuracy of mini-shapes (1/2)", "addition: fine-tuned accuracy of mini-colors (2/2)"]
    assert [ln.split(" mean")[0] for ln in err if ln.startswith("addition: alpha") and "(" in ln] == [
        "addition: alpha 0 (1/3)", "addition: alpha 0.5 (2/3)", "addition: alpha 1 (3/3)"]
    assert main(["eval", "negation", paths[0], "--grid", "0,1", "--device", "cpu", "--json"]) == 0
    err = capsys.readouterr().err
    assert "negation mini-shapes: alpha 0 (1/2)" in err and "negation mini-shapes: alpha 1 (2/2)" in err


@pytest.mark.parametrize("args,needle", [
    (["accuracy", "--alpha", "1e300"], "--alpha must be >= -1000 and <= 1000"),
    (["accuracy", "--alpha", "nan"], "--alpha must be a finite number"),
    (["addition", "--grid", "0,1e300"], "alpha must be >= -1000"),
    (["negation", "--threshold", "nan"], "--threshold must be a finite number"),
])
def test_cli_alpha_and_threshold_checked_before_any_model(mini_world, capsys, monkeypatch, args, needle):
    from tvtool import models
    from tvtool.cli import main

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the option was checked")

    monkeypatch.setattr(models, "load_clip", boom)
    tmp, paths = mini_world
    cmd, *opts = args
    vecs = paths[:1] if cmd == "negation" else paths
    assert main(["eval", cmd, *vecs, *opts, "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_eval_accuracy_alpha_bounded_in_the_api():
    with pytest.raises(TVToolError, match="must be >= -1000"):
        ev.eval_accuracy(None, [], alpha=1e300)
