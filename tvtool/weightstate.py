"""The weight state of an evaluated tower: theta_0 kept aside, the tower's tensors set to theta_0 + sum_i c_i tau_i in
place, and only the tensors the previous setting touched restored."""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from .errors import TVToolError


class WeightState:
    """``params``: the tower's live tensors by key (what a task vector's keys name); ``theta0``: their values at
    theta_0, never modified. The tensors are moved only by :meth:`set_combination`."""

    def __init__(self, params: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor]):
        self.params = dict(params)
        self.theta0 = dict(theta0)
        self.dirty: set[str] = set()  # keys away from theta_0

    @classmethod
    def of(cls, module: torch.nn.Module, prefix: str = "") -> "WeightState":
        """The parameters of ``module`` (keys ``prefix + name``), theta_0 a copy of their current values."""
        params = {prefix + n: p for n, p in module.named_parameters()}
        return cls(params, {k: p.detach().clone() for k, p in params.items()})

    @property
    def at_theta0(self) -> bool:
        return not self.dirty

    def check(self, tau: Mapping[str, torch.Tensor]) -> None:
        """Every key of ``tau`` is a parameter of this tower, with its shape."""
        unknown = sorted(k for k in tau if k not in self.params)
        if unknown:
            raise TVToolError(f"task vector key {unknown[0]} is not a parameter of this image tower "
                              f"({len(unknown)} such keys); was it taken against another architecture?")
        for k, t in tau.items():
            if t.shape != self.params[k].shape:
                raise TVToolError(f"task vector tensor {k} has shape {tuple(t.shape)}, the model "
                                  f"{tuple(self.params[k].shape)}; was it taken against another architecture?")

    def set_combination(self, terms: Iterable[tuple[Mapping[str, torch.Tensor], float]]) -> None:
        """Tower := theta_0 + sum of coef * tau over ``terms``, in place (only touched tensors move)."""
        terms = [(tau, float(c)) for tau, c in terms]
        for tau, _ in terms:  # all checked before any tensor moves: a bad vector leaves the tower as it was
            self.check(tau)
        keys = set().union(*(tau.keys() for tau, _ in terms)) if terms else set()
        with torch.no_grad():
            for k in self.dirty - keys:  # restore what the previous setting touched
                self.params[k].copy_(self.theta0[k])
            for k in keys:
                p = self.params[k]
                p.copy_(self.theta0[k])
                for tau, c in terms:
                    if k in tau and c != 0.0:
                        p.add_(tau[k], alpha=c)
        # theta_0 again when no nonzero coefficient was applied (alpha = 0 grid points reuse zero-shot counts)
        self.dirty = keys if any(c != 0.0 for _, c in terms) else set()

    def reset(self) -> None:
        self.set_combination([])
