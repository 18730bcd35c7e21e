"""Training attention runs through scaled_dot_product_attention's fused kernel, and equals attention written out.

open_clip 3.3's ResidualAttentionBlock calls ``nn.MultiheadAttention(..., need_weights=False)``. MHA's fast path
(``torch._native_multi_head_attention``) is for inference only: it is off in training mode, under autocast and when
a gradient is needed. Training takes ``F.multi_head_attention_forward``, which with ``need_weights=False`` calls
``F.scaled_dot_product_attention``: the flash / memory-efficient kernels on CUDA, the CPU flash kernel here. So
fine-tuning needs no attention rewrite, in every mode that runs the tower itself (full, attn, lora); these tests pin
that down, so an open_clip or torch that fell back to an explicit softmax would fail here. The linear (tangent)
mode is the exception by necessity: forward-mode AD has no rule for the fused kernels (checked below), so its jvp
uses SDPA's composite math path (tvtool.variants.LinearizedVisual).
"""
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tvtool.variants import prepare

LAYERS = 2
FUSED = "aten._scaled_dot_product_flash_attention_for_cpu.default"
FUSED_BACKWARD = "aten._scaled_dot_product_flash_attention_for_cpu_backward.default"


def tiny_clip(dtype=torch.float32):
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=24,
        vision_cfg=dict(image_size=16, layers=LAYERS, width=32, head_width=16, patch_size=8),
        text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1),
    ).to(dtype)


class OpLog(TorchDispatchMode):
    """Every aten op that runs, by name."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def prepared(mode, dtype=torch.float32):
    tuned = prepare(tiny_clip(dtype), mode, lora_rank=4, lora_alpha=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tuned.trainable_parameters():  # LoRA's B starts at zero: give every mode a non-trivial update
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(dtype))
    tuned.module.train()
    return tuned, torch.randn(3, 3, 16, 16, generator=g).to(dtype)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("mode", ["full", "attn", "lora"])
def test_training_step_uses_the_fused_sdpa_kernel(mode, autocast):
    tuned, x = prepared(mode)
    with OpLog() as log, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        tuned.module(x).float().square().sum().backward()
    assert log.ops.count(FUSED) == LAYERS, [o for o in log.ops if "attention" in o]
    assert log.ops.count(FUSED_BACKWARD) == LAYERS
    assert not [o for o in log.ops if "softmax" in o or "_native_multi_head_attention" in o]


def explicit_attention(self, q_x, k_x=None, v_x=None, attn_mask=None):
    """ResidualAttentionBlock.attention written out: softmax(Q K^T / sqrt(d)) V per head, with the module's (in lora
    mode: parametrized) weights."""
    assert k_x is None and v_x is None and attn_mask is None
    attn = self.attn
    n, length, width = q_x.shape
    heads = attn.num_heads
    q, k, v = F.linear(q_x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(n, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(n, length, width)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("mode", ["full", "attn", "lora"])
def test_fused_attention_equals_attention_written_out(mode, dtype, tol, monkeypatch):
    """Image features and the gradients of every trainable tensor: the module's path (fused SDPA) vs the explicit
    formula, relative L2 difference <= 1e-10 in float64 and <= 1e-5 in float32 (summation order only)."""
    results = []
    for explicit in (False, True):
        if explicit:
            monkeypatch.setattr(open_clip.transformer.ResidualAttentionBlock, "attention", explicit_attention)
        tuned, x = prepared(mode, dtype)
        with OpLog() as log:
            feats = tuned.module(x)
            feats.square().sum().backward()
        assert (log.ops.count(FUSED) == LAYERS) != explicit  # each side really ran its own attention
        results.append((feats.detach(), [p.grad.clone() for p in tuned.trainable_parameters()]))
    (f_fused, g_fused), (f_ref, g_ref) = results
    assert float((f_fused - f_ref).norm() / f_ref.norm()) <= tol
    for a, b in zip(g_fused, g_ref):
        assert float((a - b).norm() / b.norm()) <= tol


def test_forward_mode_ad_needs_the_math_path():
    """Why linear mode pins SDPA to its math backend: the fused kernel has no forward-AD rule."""
    from torch.func import jvp

    q, k, v = (torch.randn(2, 2, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with pytest.raises(RuntimeError, match="forward AD"):
        jvp(lambda t: F.scaled_dot_product_attention(t, k, v), (q,), (torch.ones_like(q),))
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        jvp(lambda t: F.scaled_dot_product_attention(t, k, v), (q,), (torch.ones_like(q),))
