"""The four fine-tuning variants of the protocol: ``full``, ``attn``, ``lora`` and ``linear`` (tangent space).

``prepare(model, mode)`` freezes an open_clip CLIP model (text tower, logit scale) and makes the mode's tensors of
its visual tower trainable. It returns a :class:`Tuned` whose

* ``.module`` maps normalized images to image features (the visual tower, or its linearization); give it to
  ``tvtool.models.ImageClassifier(tuned.module, head)``;
* ``.trainable_parameters()`` go to the optimizer;
* ``.deltas()`` are the dense updates dW keyed by the base model's state-dict keys (differentiable: OrthoReg uses
  them), ``.task_vector()`` the same detached (what a task-vector file stores), ``.merged_state_dict()`` the base
  model's full state dict at theta_t = theta_0 + dW (loadable by open_clip).

Modes:

* ``full``: every visual-tower tensor.
* ``attn``: only ``attn.in_proj_weight`` and ``attn.out_proj.weight`` of the visual blocks (their biases frozen).
* ``lora``: ``W = W0 + (alpha / r) * B @ A`` on in_proj (one d -> 3d linear) and out_proj, via
  ``torch.nn.utils.parametrize`` so open_clip's ``nn.MultiheadAttention`` (both its fast path and the regular one)
  sees the merged weight without any rewrite. A is kaiming-uniform, B zero, so training starts at theta_0.
* ``linear``: ``f_lin(x; theta) = f(x; theta_0) + J(x) (theta - theta_0)`` with ``torch.func.jvp`` over
  ``functional_call``. The trainable tensors are copies of the visual tensors initialised at theta_0, so AdamW's
  weight decay acts on theta exactly as in the other modes (and as in the reference code); the task vector
  theta - theta_0 is applied to the non-linear model as usual.

Prepare the model after moving it to its device: theta_0 is kept on that device, once.
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.utils import parametrize

from .errors import TVToolError

from .trainconfig import MODES  # noqa: E402,F401  declared with the options, torch-free
_ATTN = re.compile(r"^transformer\.resblocks\.\d+\.attn\.(in_proj_weight|out_proj\.weight)$")
PREFIX = "visual."


class LoRA(nn.Module):
    """Parametrization W -> W + scale * B @ A (B: out x r, A: r x in)."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, *, device=None, dtype=None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.rank = rank
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        # the nn.Linear / LoRA-paper initialisation of A
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)

    def delta(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


class LinearizedVisual(nn.Module):
    """The first-order Taylor expansion of a visual tower around theta_0, trainable in theta."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual  # its own parameters are theta_0 (frozen): the primals of the jvp
        self.names = [n for n, _ in visual.named_parameters()]
        self.theta = nn.ParameterList(
            [nn.Parameter(p.detach().clone(), requires_grad=True) for _, p in visual.named_parameters()])

    def theta0(self) -> list[torch.Tensor]:
        return [p for _, p in self.visual.named_parameters()]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        primals = tuple(p.detach() for p in self.theta0())
        out, jout = self.pair(images, tuple(t - p0 for t, p0 in zip(self.theta, primals)))
        return out + jout

    def pair(self, images: torch.Tensor, tangents: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(x; theta_0), J(x) v) for the tangent v (one tensor per parameter, in ``self.names`` order): the
        tangent model at theta_0 + a v is ``out + a * jout`` for every a, from this one pass."""
        primals = tuple(p.detach() for p in self.theta0())

        def f(*params):
            return functional_call(self.visual, dict(zip(self.names, params)), (images,))

        # forward-mode AD has no rule for the fused attention kernels: use the composite math path of SDPA and
        # keep nn.MultiheadAttention off its fast path (both restored afterwards).
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]), warnings.catch_warnings():
                # torch's own forward-AD set-up scripts its decompositions once and warns about jit.script: not ours
                warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
                return jvp(f, primals, tuple(tangents))
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)


class Tuned:
    """A model prepared for one fine-tuning mode. See the module docstring."""

    def __init__(self, model: nn.Module, mode: str, module: nn.Module, base_keys: list[str],
                 delta_keys: list[str], theta0: dict[str, torch.Tensor], lora: dict[str, LoRA] | None = None,
                 lora_rank: int | None = None, lora_alpha: float | None = None):
        self.model = model
        self.mode = mode
        self.module = module
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self._base_keys = base_keys
        self._delta_keys = delta_keys
        self.theta0 = theta0  # base key -> theta_0 (full / attn: copies; linear: the frozen tower's own tensors)
        self._lora = lora or {}

    # ------------------------------------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable()]

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        """Stable names (base keys; ``<key>.lora_A`` / ``.lora_B`` for LoRA) for checkpoints and resume."""
        if self.mode == "lora":
            return [(f"{k}.lora_{w}", getattr(self._lora[k], w)) for k in self._delta_keys for w in ("A", "B")]
        return list(self.current().items())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.named_trainable()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        own = dict(self.named_trainable())
        if set(own) != set(state):
            diff = sorted(set(own) ^ set(state))[:3]
            raise TVToolError(f"checkpoint does not match the {self.mode} mode (differs in {diff}); "
                              "resume with the same --mode and model")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(state[k])

    def current(self) -> dict[str, torch.Tensor]:
        """Base key -> the live trainable tensor holding theta (full / attn / linear)."""
        if self.mode == "lora":
            raise TVToolError("LoRA has no dense trainable weights; use deltas() or lora_factors()")
        if self.mode == "linear":
            lin: LinearizedVisual = self.module
            return {PREFIX + n: t for n, t in zip(lin.names, lin.theta)}
        params = dict(self.model.named_parameters())
        return {k: params[k] for k in self._delta_keys}

    def lora_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Base key -> (B, A, scale) with dW = scale * B @ A."""
        return {k: (m.B, m.A, m.scale) for k, m in self._lora.items()}

    # ---------------------------------------------------------------------------------------------------- deltas
    def delta_keys(self) -> list[str]:
        """The base state-dict keys this mode can change."""
        return list(self._delta_keys)

    def delta_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(self.theta0[k].shape) for k in self._delta_keys}

    def deltas(self, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Base key -> dense dW (differentiable)."""
        keys = self._delta_keys if keys is None else keys
        if self.mode == "lora":
            return {k: self._lora[k].delta() for k in keys}
        cur = self.current()
        for k in keys:
            if self.theta0[k].device != cur[k].device:  # the model was moved after prepare(): follow it, once
                self.theta0[k] = self.theta0[k].to(cur[k].device)
        return {k: cur[k] - self.theta0[k] for k in keys}

    def task_vector(self) -> dict[str, torch.Tensor]:
        """Base key -> dW, detached, in the base tensor's dtype (what the task-vector file stores)."""
        with torch.no_grad():
            return {k: d.detach().to(self.theta0[k].dtype).clone() for k, d in self.deltas().items()}

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's state dict (same keys) at theta_t = theta_0 + dW, detached."""
        tv = self.task_vector()
        out = {}
        with torch.no_grad():
            for key in self._base_keys:
                if key in tv:
                    out[key] = (self.theta0[key] + tv[key]).detach()
                else:
                    out[key] = _lookup(self.model, key).detach()
        return out

    def adopt_theta0(self, views: Mapping[str, torch.Tensor]) -> None:
        """Share theta_0 storage with OrthoReg's stacks (same values) so it lives on the device only once."""
        with torch.no_grad():
            for k, v in views.items():
                old = self.theta0[k]
                if old.shape != v.shape or old.dtype != v.dtype or old.device != v.device:
                    continue  # a dtype/device mismatch: keep our own copy
                if isinstance(old, nn.Parameter):  # linear mode: the frozen tower's own parameter
                    old.data = v
                else:
                    self.theta0[k] = v


def _lookup(model: nn.Module, key: str) -> torch.Tensor:
    owner, _, leaf = key.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, leaf)


def _tower(model: nn.Module) -> nn.Module:
    visual = getattr(model, "visual", None)
    if not isinstance(visual, nn.Module):
        raise TVToolError("fine-tuning needs an open_clip CLIP model with a .visual tower; load it with "
                          "tvtool.models.load_clip")
    return visual


def prepare(model: nn.Module, mode: str, lora_rank: int = 8, lora_alpha: float = 8.0,
            generator: torch.Generator | None = None) -> Tuned:
    """Freeze ``model`` except what ``mode`` tunes and return the :class:`Tuned` handle (modifies ``model``)."""
    if mode not in MODES:
        raise TVToolError(f"unknown fine-tuning mode {mode!r}; use one of {', '.join(MODES)}")
    visual = _tower(model)
    base_keys = list(model.state_dict().keys())
    model.requires_grad_(False)
    named = dict(visual.named_parameters())

    if mode in ("full", "linear"):
        local = list(named)
    else:
        local = [n for n in named if _ATTN.match(n)]
        if not local:
            raise TVToolError(f"mode {mode!r} needs a ViT visual tower with attention blocks; use --mode full")
    keys = [PREFIX + n for n in local]

    if mode == "linear":
        module = LinearizedVisual(visual)
        theta0 = {PREFIX + n: p for n, p in named.items()}  # the primals themselves, no copy
        return Tuned(model, mode, module, base_keys, keys, theta0)

    if mode in ("full", "attn"):
        theta0 = {PREFIX + n: named[n].detach().clone() for n in local}
        for n in local:
            named[n].requires_grad_(True)
        return Tuned(model, mode, visual, base_keys, keys, theta0)

    if lora_rank < 1 or lora_alpha <= 0:
        raise TVToolError(f"LoRA needs rank >= 1 and alpha > 0, got rank={lora_rank}, alpha={lora_alpha}")
    lora, theta0 = {}, {}
    for n in local:
        owner, _, leaf = n.rpartition(".")
        mod = visual.get_submodule(owner)
        w = named[n]
        if lora_rank > min(w.shape):
            raise TVToolError(f"LoRA rank {lora_rank} exceeds the layer size {tuple(w.shape)}; "
                              "use a smaller --lora-rank")
        par = LoRA(w.shape[0], w.shape[1], lora_rank, lora_alpha, device=w.device, dtype=w.dtype,
                   generator=generator)
        parametrize.register_parametrization(mod, leaf, par)
        original = getattr(mod.parametrizations, leaf).original  # W0 itself: theta_0 without a copy
        original.requires_grad_(False)
        theta0[PREFIX + n] = original
        lora[PREFIX + n] = par
    return Tuned(model, mode, visual, base_keys, keys, theta0, lora, lora_rank, lora_alpha)
