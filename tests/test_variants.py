"""The four fine-tuning variants on a tiny open_clip CLIP, with and without OrthoReg."""
import copy

import open_clip
import pytest
import torch

from tvtool.errors import TVToolError
from tvtool.orthoreg import OrthoReg
from tvtool.variants import MODES, prepare

torch.set_num_threads(1)


def tiny_clip(dtype=torch.float32):
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=24,
        vision_cfg=dict(image_size=16, layers=2, width=32, head_width=16, patch_size=8),
        text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1),
    )
    return model.to(dtype)


def images(n=3, dtype=torch.float32, seed=1):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)).to(dtype)


def step(tuned, reg=None, lr=1e-2):
    """One AdamW step (with weight decay, as the recipe) on a random loss through tuned.module."""
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=lr, weight_decay=0.1)
    tuned.module.train()
    loss = tuned.module(images()).square().mean()
    if reg is not None:
        loss = loss + reg()
    loss.backward()
    opt.step()
    opt.zero_grad()


ATTN_KEYS = {f"visual.transformer.resblocks.{i}.attn.{w}" for i in range(2)
             for w in ("in_proj_weight", "out_proj.weight")}


@pytest.mark.parametrize("mode", MODES)
def test_only_the_modes_tensors_change(mode):
    model = tiny_clip()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = prepare(model, mode)
    if mode == "lora":  # B = 0 at init: move it so that in_proj / out_proj really change
        with torch.no_grad():
            for b, _, _ in tuned.lora_factors().values():
                b.normal_(0, 0.1)
    step(tuned)
    after = tuned.merged_state_dict()
    assert list(after) == list(before)  # the base model's keys, in order, whatever the mode did to the module
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    allowed = ATTN_KEYS if mode in ("attn", "lora") else {k for k in before if k.startswith("visual.")}
    assert changed <= allowed
    assert changed >= ATTN_KEYS  # and something did move
    if mode == "attn":
        assert not any(k.endswith("in_proj_bias") or k.endswith("out_proj.bias") for k in changed)
    # the task vector is exactly theta_t - theta_0 on the tuned keys
    tv = tuned.task_vector()
    assert set(tv) == set(tuned.delta_keys())
    for k in changed:
        torch.testing.assert_close(before[k] + tv[k], after[k], rtol=0, atol=0)
    # the text tower stayed frozen in the module too
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith("visual."))


def test_merged_state_dict_loads_into_a_fresh_model():
    tuned = prepare(tiny_clip(), "lora", lora_rank=2)
    fresh = tiny_clip()
    fresh.load_state_dict(tuned.merged_state_dict(), strict=True)


def test_lora_delta_and_outputs_equal_the_dense_model(monkeypatch):
    model = tiny_clip()
    dense = copy.deepcopy(model)
    tuned = prepare(model, "lora", lora_rank=4, lora_alpha=8)
    with torch.no_grad():
        for b, _, _ in tuned.lora_factors().values():
            b.normal_(0, 0.2)
    deltas = tuned.deltas()
    for k, (b, a, scale) in tuned.lora_factors().items():
        assert scale == 2.0
        torch.testing.assert_close(deltas[k], torch.einsum("or,ri->oi", b, a) * 2.0)
    with torch.no_grad():
        for k, d in deltas.items():
            dense.get_parameter(k).add_(d)
    x = images()
    # training path (grad enabled) and nn.MultiheadAttention's inference fast path (eval + no_grad)
    tuned.module.train()
    dense.visual.train()
    torch.testing.assert_close(tuned.module(x), dense.visual(x), rtol=1e-5, atol=1e-5)
    tuned.module.eval()
    dense.visual.eval()
    fast_calls = []
    native = torch._native_multi_head_attention
    monkeypatch.setattr(torch, "_native_multi_head_attention", lambda *a, **k: fast_calls.append(1) or native(*a, **k))
    with torch.no_grad():
        torch.testing.assert_close(tuned.module(x), dense.visual(x), rtol=1e-5, atol=1e-5)
    assert len(fast_calls) == 4  # both models, both blocks went through the fast path


def test_lora_init_is_theta0_and_only_factors_train():
    model = tiny_clip()
    ref = copy.deepcopy(model)
    tuned = prepare(model, "lora", lora_rank=4)
    names = [n for n, _ in tuned.named_trainable()]
    assert len(names) == 2 * len(ATTN_KEYS) and all(".lora_" in n for n in names)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in tuned.deltas().values())
    with torch.no_grad():  # not bit-equal: the merged weight is a fresh tensor and BLAS may block it differently
        torch.testing.assert_close(tuned.module(images()), ref.visual(images()), rtol=1e-6, atol=1e-6)


def test_linearized_model_is_the_first_order_expansion():
    model = tiny_clip(torch.float64)  # float64 so the finite difference is meaningful at small eps
    ref = copy.deepcopy(model)
    tuned = prepare(model, "linear")
    x = images(dtype=torch.float64)
    f0 = ref.visual(x)
    torch.testing.assert_close(tuned.module(x), f0, rtol=1e-12, atol=1e-12)  # equal at theta_0

    gen = torch.Generator().manual_seed(2)
    direction = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in tuned.current().items()}
    eps = 1e-5
    with torch.no_grad():
        for k, p in tuned.current().items():
            p.add_(eps * direction[k])
    f_lin = tuned.module(x)
    plus, minus = copy.deepcopy(ref), copy.deepcopy(ref)
    with torch.no_grad():
        for k, d in direction.items():
            plus.get_parameter(k).add_(eps * d)
            minus.get_parameter(k).sub_(eps * d)
    fd = (plus.visual(x) - minus.visual(x)) / (2 * eps)  # central difference: J d up to O(eps^2)
    torch.testing.assert_close((f_lin - f0) / eps, fd, rtol=1e-6, atol=1e-6)

    # gradients reach theta, and the eval fast path of attention is avoided inside the jvp
    f_lin.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tuned.trainable_parameters()
               if p.ndim == 2)
    tuned.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(tuned.module(x), f_lin.detach())
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_linear_task_vector_applies_to_the_nonlinear_model():
    model = tiny_clip()
    tuned = prepare(model, "linear")
    step(tuned)
    tv = tuned.task_vector()
    theta = tuned.current()
    base = tiny_clip().state_dict()
    merged = tuned.merged_state_dict()
    for k in tv:
        torch.testing.assert_close(tv[k], theta[k].detach() - base[k], rtol=0, atol=0)
        torch.testing.assert_close(merged[k], base[k] + tv[k], rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", ["squared", "plain"])
def test_every_mode_trains_with_orthoreg(mode, form):
    tuned = prepare(tiny_clip(), mode, lora_rank=2)
    reg = OrthoReg.from_tuned(tuned, form=form, lam=0.5)
    assert reg.penalty().item() == pytest.approx(reg.penalty_at_zero(), rel=1e-6)
    expected_layers = 4 if mode in ("attn", "lora") else 8
    assert len(reg.names) == expected_layers
    step(tuned, reg)
    step(tuned, reg)
    # after training the penalty still matches the direct formula on the dense deltas
    deltas = tuned.deltas()
    direct = 0.0
    for k in reg.names:
        dw = deltas[k].detach().double()
        if form == "squared":
            direct += (torch.linalg.matrix_norm(dw.T @ dw - torch.eye(dw.shape[1], dtype=dw.dtype)) ** 2).item()
        else:
            g = dw @ dw.T if dw.shape[0] < dw.shape[1] else dw.T @ dw
            direct += torch.linalg.matrix_norm(g - torch.eye(g.shape[0], dtype=dw.dtype)).item()
    assert reg.penalty().item() == pytest.approx(direct, rel=1e-5)
    assert reg.penalty().item() != pytest.approx(reg.penalty_at_zero(), rel=1e-6)


def test_orthoreg_shares_theta0_with_tuned():
    tuned = prepare(tiny_clip(), "full")
    reg = OrthoReg.from_tuned(tuned)
    k = reg.names[0]
    assert tuned.theta0[k].data_ptr() == reg.theta0(k).data_ptr()
    lin = prepare(tiny_clip(), "linear")
    reg = OrthoReg.from_tuned(lin, scope="reference")
    assert lin.theta0["visual.proj"].data_ptr() == reg.theta0("visual.proj").data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(lin.module(images()), tiny_clip().visual(images()))


@pytest.mark.parametrize("mode", MODES)
def test_trainable_state_round_trip(mode):
    a = prepare(tiny_clip(), mode, lora_rank=2)
    step(a)
    b = prepare(tiny_clip(), mode, lora_rank=2, generator=torch.Generator().manual_seed(9))
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(b.module(images()), a.module(images()), rtol=0, atol=0)
    with pytest.raises(TVToolError, match="mode"):
        b.load_state_dict({"nope": torch.zeros(1)})


def test_bad_inputs():
    with pytest.raises(TVToolError, match="mode"):
        prepare(tiny_clip(), "everything")
    with pytest.raises(TVToolError, match="rank"):
        prepare(tiny_clip(), "lora", lora_rank=64)
    with pytest.raises(TVToolError, match="visual"):
        prepare(torch.nn.Linear(2, 2), "full")
