"""OrthoReg against direct formulas computed independently in float64 with torch.linalg and autograd."""
import math

import open_clip
import pytest
import torch

from tvtool.errors import TVToolError
from tvtool.orthoreg import OrthoReg, select_names
from tvtool.variants import prepare

torch.set_num_threads(1)

# tall (m > n), wide (m < n), square, and two layers of one shape to exercise the batched groups
SHAPES = {"tall.a": (12, 5), "tall.b": (12, 5), "wide": (4, 9), "square": (6, 6)}


def direct(dw: torch.Tensor, form: str) -> torch.Tensor:
    """The paper's term from its definition (n x n Gram) or the reference code's (smaller Gram, plain norm)."""
    dw = dw.double()
    if form == "squared":
        n = dw.shape[1]
        return torch.linalg.matrix_norm(dw.T @ dw - torch.eye(n, dtype=dw.dtype)) ** 2
    g = dw @ dw.T if dw.shape[0] < dw.shape[1] else dw.T @ dw
    return torch.linalg.matrix_norm(g - torch.eye(g.shape[0], dtype=dw.dtype))


def make_params(seed=0, scale=0.4):
    gen = torch.Generator().manual_seed(seed)
    theta0 = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    params = {k: torch.nn.Parameter(v + scale * torch.randn(v.shape, generator=gen)) for k, v in theta0.items()}
    return params, theta0


@pytest.mark.parametrize("form", ["squared", "plain"])
@pytest.mark.parametrize("batched", [True, False])
def test_value_and_gradient_match_direct_formula(form, batched):
    params, theta0 = make_params()
    reg = OrthoReg.from_model(params, list(SHAPES), theta0=theta0, form=form, lam=2.5, batched=batched)
    pen = reg.penalty()
    pen.backward()

    ref_params = {k: p.detach().double().requires_grad_(True) for k, p in params.items()}
    ref = sum(direct(ref_params[k] - theta0[k].double(), form) for k in SHAPES)
    ref.backward()
    assert pen.dtype == torch.float32
    assert pen.item() == pytest.approx(ref.item(), rel=1e-5)
    assert reg().item() == pytest.approx(2.5 * ref.item(), rel=1e-5)  # forward() is the scaled term
    for k in SHAPES:
        torch.testing.assert_close(params[k].grad.double(), ref_params[k].grad, rtol=1e-4, atol=1e-4)


def test_squared_from_small_gram_equals_column_gram_for_wide_layers():
    # the wide layer's paper term uses the n x n Gram; ours the m x m one plus (n - m): check on one layer alone
    gen = torch.Generator().manual_seed(3)
    dw = torch.randn(4, 9, generator=gen)
    reg = OrthoReg({"w": (4, 9)})
    assert reg.penalty({"w": dw}).item() == pytest.approx(direct(dw, "squared").item(), rel=1e-5)


def test_batched_equals_loop_and_deltas_path():
    params, theta0 = make_params(seed=1)
    grouped = OrthoReg.from_model(params, list(SHAPES), theta0=theta0)
    loop = OrthoReg.from_model(params, list(SHAPES), theta0=theta0, batched=False)
    assert len(grouped.groups) == 3  # the two tall layers share one batched kernel
    a, b = grouped.penalty(), loop.penalty()
    deltas = {k: (params[k] - theta0[k]) for k in SHAPES}
    c = OrthoReg({k: v.shape for k, v in deltas.items()}).penalty(deltas)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("form", ["squared", "plain"])
def test_penalty_at_zero_and_zero_gradient(form):
    params, _ = make_params(seed=2)
    reg = OrthoReg.from_model(params, list(SHAPES), form=form)  # theta0 = current weights: dW = 0
    pen = reg.penalty()
    expected = sum(s[1] for s in SHAPES.values()) if form == "squared" else sum(math.sqrt(min(s)) for s in
                                                                                 SHAPES.values())
    assert reg.penalty_at_zero() == pytest.approx(expected)
    assert pen.item() == pytest.approx(expected, rel=1e-6)
    pen.backward()
    for p in params.values():
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_hutchinson_is_unbiased_with_the_rademacher_variance():
    params, theta0 = make_params(seed=4, scale=0.3)
    exact = OrthoReg.from_model(params, list(SHAPES), theta0=theta0).penalty().item()
    # ||M z||^2 = z^T B z with B = M^2; one Rademacher probe has variance 2 (||B||_F^2 - sum_i B_ii^2)
    var = 0.0
    for k, s in SHAPES.items():
        dw = (params[k] - theta0[k]).detach().double()
        g = dw @ dw.T if s[0] < s[1] else dw.T @ dw
        m = g - torch.eye(g.shape[0], dtype=g.dtype)
        b = m @ m
        var += 2 * (b.square().sum() - b.diagonal().square().sum()).item()
    gen = torch.Generator().manual_seed(0)
    hutch = OrthoReg.from_model(params, list(SHAPES), theta0=theta0, estimator="hutchinson", probes=1)
    samples = torch.tensor([hutch.penalty(generator=gen).item() for _ in range(2000)], dtype=torch.float64)
    se = math.sqrt(var / len(samples))
    assert abs(samples.mean().item() - exact) < 4 * se
    assert samples.var().item() == pytest.approx(var, rel=0.2)
    # many probes in one call: the same expectation, the variance divided by the probe count
    many = OrthoReg.from_model(params, list(SHAPES), theta0=theta0, estimator="hutchinson", probes=4000)
    assert abs(many.penalty(generator=gen).item() - exact) < 4 * math.sqrt(var / 4000)


def test_hutchinson_gradient_is_unbiased():
    params, theta0 = make_params(seed=5, scale=0.3)
    OrthoReg.from_model(params, list(SHAPES), theta0=theta0).penalty().backward()
    exact = {k: p.grad.clone() for k, p in params.items()}
    for p in params.values():
        p.grad = None
    hutch = OrthoReg.from_model(params, list(SHAPES), theta0=theta0, estimator="hutchinson", probes=20000)
    hutch.penalty(generator=torch.Generator().manual_seed(1)).backward()
    for k, p in params.items():
        err = (p.grad - exact[k]).norm() / exact[k].norm()
        assert err < 0.05, (k, err)


def test_bad_options_are_user_errors():
    with pytest.raises(TVToolError, match="squared"):
        OrthoReg({"w": (3, 3)}, form="plain", estimator="hutchinson")
    with pytest.raises(TVToolError, match="form"):
        OrthoReg({"w": (3, 3)}, form="cubed")
    with pytest.raises(TVToolError, match="2-D"):
        OrthoReg({"w": (3, 3, 3)})
    with pytest.raises(TVToolError, match="no layer"):
        OrthoReg({})
    with pytest.raises(TVToolError, match="not a parameter"):
        OrthoReg.from_model({"a": torch.zeros(2, 2)}, ["b"])


def tiny_clip(layers=2):
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=24,
        vision_cfg=dict(image_size=16, layers=layers, width=32, head_width=16, patch_size=8),
        text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1),
    )


def test_scopes_select_the_protocol_tensors():
    model = tiny_clip()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    trainable = {k for k in shapes if k.startswith("visual.")}
    linear = select_names(shapes, trainable.__contains__, "visual-linear")
    assert sorted(linear) == sorted(f"visual.transformer.resblocks.{i}.{s}" for i in range(2) for s in (
        "attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))
    ref = select_names(shapes, trainable.__contains__, "reference")
    assert sorted(set(ref) - set(linear)) == ["visual.positional_embedding", "visual.proj"]
    # the text leftovers count only where they are trainable; the text transformer never does
    ref_all = select_names(shapes, lambda k: True, "reference")
    assert sorted(set(ref_all) - set(ref)) == ["positional_embedding", "text_projection", "token_embedding.weight"]


@pytest.mark.parametrize("form", ["squared", "plain"])
def test_lora_low_rank_formula_equals_dense(form):
    tuned = prepare(tiny_clip(), "lora", lora_rank=3, lora_alpha=6)
    with torch.no_grad():
        for b, _, _ in tuned.lora_factors().values():
            b.normal_(0, 0.3)
    reg = OrthoReg.from_tuned(tuned, form=form)
    low = reg.penalty()
    low.backward()
    grads = [p.grad.clone() for p in tuned.trainable_parameters()]
    for p in tuned.trainable_parameters():
        p.grad = None
    dense = sum(direct(d, form) for d in tuned.deltas().values())
    dense.backward()
    assert low.item() == pytest.approx(dense.item(), rel=1e-5)
    for g, p in zip(grads, tuned.trainable_parameters()):
        torch.testing.assert_close(g.double(), p.grad.double(), rtol=1e-3, atol=1e-4)


def test_tf32_precision_covers_forward_and_backward_products(monkeypatch):
    """precision="tf32" must hold for both products of the exact penalty: the backward's runs later, inside
    loss.backward(), outside any block around penalty(). A spy reads the TF32 flag at each product; afterwards the
    flag is back to what it was, and the value and gradient equal fp32's (TF32 does not exist on the CPU)."""
    import torch

    from tvtool.orthoreg import OrthoReg

    seen = []
    real_bmm, real_baddbmm = torch.bmm, torch.baddbmm

    def spy(real, name):
        def f(*a, **k):
            seen.append((name, torch.backends.cuda.matmul.allow_tf32))
            return real(*a, **k)
        return f

    g = torch.Generator().manual_seed(0)
    weights = {"visual.transformer.resblocks.0.attn.out_proj.weight": torch.randn(6, 6, generator=g),
               "visual.transformer.resblocks.0.mlp.c_fc.weight": torch.randn(12, 6, generator=g)}
    results = {}
    before = torch.backends.cuda.matmul.allow_tf32
    for precision in ("fp32", "tf32"):
        params = {k: v.clone().requires_grad_() for k, v in weights.items()}
        reg = OrthoReg({k: v.shape for k, v in params.items()}, precision=precision)
        seen.clear()
        monkeypatch.setattr(torch, "bmm", spy(real_bmm, "bmm"))
        monkeypatch.setattr(torch, "baddbmm", spy(real_baddbmm, "baddbmm"))
        value = reg.penalty(params)
        value.backward()
        monkeypatch.undo()
        results[precision] = (value.item(), [p.grad.clone() for p in params.values()])
        expected = precision == "tf32"
        assert {name for name, _ in seen} == {"bmm", "baddbmm"}
        assert all(flag == expected for _, flag in seen), (precision, seen)
        assert torch.backends.cuda.matmul.allow_tf32 == before
    assert results["fp32"][0] == results["tf32"][0]
    assert all(torch.equal(a, b) for a, b in zip(results["fp32"][1], results["tf32"][1]))


def test_unknown_precision_refused():
    from tvtool.errors import TVToolError
    from tvtool.orthoreg import OrthoReg

    with pytest.raises(TVToolError, match="unknown OrthoReg precision 'bf16'"):
        OrthoReg({"w": (4, 4)}, precision="bf16")


@pytest.mark.parametrize("wide", [False, True])
def test_custom_ops_pass_torch_library_opcheck(wide):
    """The penalty's custom ops (what torch.compile captures): schema, fake kernels (shapes and strides, also for a
    transposed input, as wide layers pass), autograd registration, all checked by torch.library.opcheck; and the
    gradient against autograd through the formula."""
    from tvtool.orthoreg import _gram_defect, _gram_defect_grad, gram_defect

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 7, generator=g)
    a = (a.transpose(1, 2).contiguous().transpose(1, 2) if wide else a).requires_grad_()
    torch.library.opcheck(_gram_defect, (a, False))
    m = torch.randn(3, 7, 7, generator=g)  # the k x k Gram defect of a (L, rows, k)
    torch.library.opcheck(_gram_defect_grad, (a.detach(), m + m.transpose(1, 2), torch.rand(3, generator=g), False))
    s = gram_defect(a)
    (s * torch.arange(1.0, 4.0)).sum().backward()
    ref = a.detach().double().requires_grad_()
    eye = torch.eye(7, dtype=torch.float64)
    ((ref.transpose(1, 2) @ ref - eye).square().sum(dim=(1, 2)) * torch.arange(1.0, 4.0, dtype=torch.float64)).sum() \
        .backward()
    torch.testing.assert_close(a.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)
