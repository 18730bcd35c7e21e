"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learned by entropy minimization on unlabeled test images.

The merged image tower is theta_0 + sum_t lambda[t, g(k)] tau_t[k] for every tensor k, with one group g per tensor
(layer-wise) or a single group (task-wise). Each Adam step draws one batch of unlabeled test images per task and
minimizes sum_t mean_x H(softmax(logits_t(x))), the Shannon entropy of the merged model's zero-shot predictions, as
the authors' code (EnnengYang/AdaMerging) and FusionBench do: init 0.3, lr 1e-3, batch 16 per task, coefficients
clipped to [0, 1] in the forward. The options and their sources are declared once, in the merge registry
(tvtool/merge/methods/adamerging.py; `tvtool merge --list`).

The forward is ``torch.func.functional_call`` on the evaluator's image tower with the merged tensors. A step builds
them once, runs every task's batch through them (each task's backward frees its activations at once), and only then
carries the accumulated gradient of the merged tensors back to lambda in one pass: the same gradient as
differentiating the whole sum at once (:func:`objective`, which the tests compare against finite differences), with
one merge and one merge-backward per step instead of one per task.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from .errors import TVToolError, spell
from .feed import batches
from .evaluate import (VISUAL, Evaluator, Progress, _mean, _say, describe_vectors, finetuned_accuracy, load_deltas,
                       vector_task)
from .merge.registry import get_method, resolve_options

METHOD = "adamerging"


# --------------------------------------------------------------------------------------------------- options
def resolve(options: Mapping | None = None, flags: Mapping[str, str] | None = None) -> dict:
    """The method's options typed, range-checked and defaulted (the registry holds the defaults). ``flags`` maps an
    option to the command-line flag that set it, so an error names what the user typed."""
    try:
        return resolve_options(METHOD, options)
    except TVToolError as exc:
        text = str(exc)
        for name, flag in (flags or {}).items():
            text = text.replace(f"option {name}=", f"{flag} ").replace(f"option {name} ", f"{flag} ")
        raise TVToolError(text) from None


# --------------------------------------------------------------------------------------------------- maths
def entropy(logits: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Mean over rows of the Shannon entropy of softmax(logits) [N, C]. ``eps`` 0: exact, from log_softmax (the
    authors' ``softmax_entropy``); ``eps`` > 0: -sum p log(p + eps) (FusionBench's ``entropy_loss``, eps 1e-8)."""
    logits = logits.float()
    if eps:
        p = logits.softmax(-1)
        return -(p * torch.log(p + eps)).sum(-1).mean()
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()


def coefficients(raw: torch.Tensor, clamp: bool) -> torch.Tensor:
    """The coefficients the forward uses: the trained ones clipped to [0, 1] (the authors' code), or as they are."""
    return raw.clamp(0.0, 1.0) if clamp else raw


def merged_parameters(theta0: Mapping[str, torch.Tensor], stacked: Mapping[str, torch.Tensor], lam: torch.Tensor,
                      groups: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """{k: theta0[k] + sum_t lam[t, groups[k]] stacked[k][t]}: differentiable in ``lam`` [T, G]; ``stacked[k]`` is
    the T task vectors' tensor k as one [T, ...] tensor."""
    return {k: theta0[k] + torch.tensordot(lam[:, groups[k]].to(s.dtype), s, dims=1) for k, s in stacked.items()}


def merged_vector(stacked: Mapping[str, torch.Tensor], lam: torch.Tensor, groups: Mapping[str, int]
                  ) -> dict[str, torch.Tensor]:
    """{k: sum_t lam[t, groups[k]] stacked[k][t]}: the merged task vector (no graph)."""
    with torch.no_grad():
        return {k: torch.tensordot(lam[:, groups[k]].to(s.dtype), s, dims=1) for k, s in stacked.items()}


def layer_groups(keys: Sequence[str], granularity: str) -> tuple[dict[str, int], list[str]]:
    """(tensor -> group index, group names): one group per tensor (layer-wise, as FusionBench's LayerWiseMergedModel:
    one weight per parameter tensor) or one for all (task-wise)."""
    if granularity == "task":
        return {k: 0 for k in keys}, ["all"]
    if granularity != "layer":
        raise TVToolError(f"granularity must be layer or task, got {granularity!r}")
    return {k: i for i, k in enumerate(keys)}, list(keys)


# --------------------------------------------------------------------------------------------------- the learner
class AdaMerging:
    """Learns the coefficients of ``vectors`` (single-task vectors, one per task) on ``ev``'s tasks' test images.

    ``ev`` is an :class:`~tvtool.evaluate.Evaluator` whose tasks are the vectors' tasks; its heads and its test
    inputs (held on the device or streamed) are used as they are, its tower as the functional model.
    """

    def __init__(self, ev: Evaluator, vectors, options: Mapping | None = None, *, split: str = "test"):
        if getattr(ev, "linearized", False):
            raise TVToolError("adamerging merges ordinary task vectors; linear-mode (tangent) vectors are not "
                              "supported")
        self.ev, self.split = ev, split
        self.options = resolve(options)
        self.vectors = list(vectors)
        if len(self.vectors) < 1:
            raise TVToolError("no task vectors given; pass one vector per task")
        self.tasks = [vector_task(v) for v in self.vectors]
        if len(set(self.tasks)) != len(self.tasks):
            raise TVToolError(f"two vectors share a task ({self.tasks}); pass one vector per task")
        ev.reset()  # the tower's own parameters are theta_0 from here on
        taus = [load_deltas([v], ev.device) for v in self.vectors]
        for tau in taus:
            ev.weights.check(tau)
        params = dict(ev.visual.named_parameters())
        # the tower's parameter order: layer-wise groups follow the model, not the files
        self.keys = [VISUAL + n for n in params if any(VISUAL + n in tau for tau in taus)]
        if not self.keys:
            raise TVToolError("the vectors change no parameter of the image tower; nothing to merge")
        self.stacked = {}
        for k in self.keys:
            like = next(tau[k] for tau in taus if k in tau)
            self.stacked[k] = torch.stack([tau[k] if k in tau else torch.zeros_like(like) for tau in taus])
            for tau in taus:  # one copy at a time on the device
                tau.pop(k, None)
        del taus
        self.theta0 = {k: params[k[len(VISUAL):]].detach() for k in self.keys}
        self.groups, self.group_names = layer_groups(self.keys, self.options["granularity"])
        self.raw = torch.full((len(self.vectors), len(self.group_names)), float(self.options["init"]),
                              dtype=torch.float32, device=ev.device, requires_grad=True)
        self._order: dict[str, tuple[int, torch.Tensor, int]] = {}  # task -> (epoch, permutation, position)

    # ---- the forward
    def lambdas(self) -> torch.Tensor:
        """The coefficients the merged model uses now [T, G] (clipped when ``clamp``), without a graph."""
        return coefficients(self.raw.detach(), self.options["clamp"]).clone()

    def logits(self, params: Mapping[str, torch.Tensor], task: str, images: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits of the tower with ``params`` (VISUAL-prefixed names; the others its own) on uint8
        ``images``, normalized as the evaluator does."""
        ev = self.ev
        x = torch.addcmul(ev.data.shift, images.float(), ev.data.scale)
        named = {k[len(VISUAL):]: v for k, v in params.items()}
        with torch.autocast(device_type=ev.device.type, dtype=torch.bfloat16, enabled=ev.device.type == "cuda"):
            feats = torch.func.functional_call(ev.visual, named, (x,))
        if isinstance(feats, tuple):
            feats = feats[0]
        head = ev.head(task)
        return F.normalize(feats.float(), dim=-1) @ head.T.to(feats.device)

    def objective(self, raw: torch.Tensor, batches: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """sum_t entropy of the merged model on ``batches[t]``, differentiable in ``raw`` (one graph)."""
        params = merged_parameters(self.theta0, self.stacked, coefficients(raw, self.options["clamp"]), self.groups)
        return sum(entropy(self.logits(params, t, x), self.options["eps"]) for t, x in batches.items())

    # ---- data
    def batch(self, task: str) -> torch.Tensor:
        """The task's next ``batch_size`` test images: its split in a seeded random order, epoch after epoch (as a
        shuffled, endlessly repeated loader; a batch may run on into the next epoch's order)."""
        images, labels = self.ev.inputs(task, self.split)
        n = labels.numel()
        want = min(self.options["batch_size"], n)
        index = self.tasks.index(task)
        epoch, perm, pos = self._order.get(task, (-1, None, n))
        rows = []
        while want:
            if pos >= n:
                epoch, pos = epoch + 1, 0
                g = torch.Generator().manual_seed((self.options["seed"] * 1_000_003 + index) * 1_000_003 + epoch)
                perm = torch.randperm(n, generator=g)
            take = min(want, n - pos)
            rows.append(perm[pos:pos + take])
            pos, want = pos + take, want - take
        self._order[task] = (epoch, perm, pos)
        rows = torch.cat(rows)
        if isinstance(images, torch.Tensor):
            return images.index_select(0, rows.to(images.device))
        return images.data.read(rows.sort().values).to(self.ev.device)  # streamed: read from the cache file

    # ---- training
    def step(self, optimizer: torch.optim.Optimizer) -> float:
        """One Adam step on one batch per task; returns the summed entropy before the step."""
        lam = coefficients(self.raw, self.options["clamp"])
        merged = merged_parameters(self.theta0, self.stacked, lam, self.groups)  # graph back to raw
        leaves = {k: m.detach().requires_grad_() for k, m in merged.items()}
        total = 0.0
        for task in self.tasks:
            loss = entropy(self.logits(leaves, task, self.batch(task)), self.options["eps"])
            loss.backward()  # accumulates d loss / d merged into the leaves, frees this task's activations
            total += float(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        keys = [k for k in merged if leaves[k].grad is not None]
        if keys:
            torch.autograd.backward([merged[k] for k in keys], [leaves[k].grad for k in keys])
        optimizer.step()
        return total

    def fit(self, progress: Progress | None = None) -> list[float]:
        """Run the Adam steps; returns the summed entropy of every step's batches (before its update)."""
        steps = self.options["steps"]
        optimizer = torch.optim.Adam([self.raw], lr=self.options["lr"])
        curve = []
        requires = {n: p.requires_grad for n, p in self.ev.visual.named_parameters()}
        for p in self.ev.visual.parameters():  # only lambda learns: no gradient into the tower's own weights
            p.requires_grad_(False)
        try:
            every = max(1, steps // 20)
            for i in range(steps):
                curve.append(self.step(optimizer))
                if not math.isfinite(curve[-1]):
                    raise TVToolError(f"adamerging: the entropy became {curve[-1]} at step {i + 1}; lower "
                                      f"{spell('--lr', 'lr')}")
                if (i + 1) % every == 0 or i + 1 == steps:
                    lam = self.lambdas()
                    _say(progress, f"adamerging: step {i + 1}/{steps} entropy {curve[-1]:.4f} lambda mean "
                                   f"{float(lam.mean()):.4f} min {float(lam.min()):.4f} max {float(lam.max()):.4f}")
        finally:
            for n, p in self.ev.visual.named_parameters():
                p.requires_grad_(requires[n])
        return curve

    @torch.no_grad()
    def split_entropy(self, lam: torch.Tensor) -> dict[str, float]:
        """Mean entropy of the merged model at ``lam`` over each task's whole split (in evaluation batches)."""
        params = merged_parameters(self.theta0, self.stacked, lam, self.groups)
        out = {}
        for task in self.tasks:
            total = torch.zeros((), device=self.ev.device)
            n = 0
            for x in batches(self.ev.inputs(task, self.split)[0], self.ev.data.batch_size):
                total += entropy(self.logits(params, task, x), self.options["eps"]) * x.shape[0]
                n += x.shape[0]
            out[task] = float(total) / n
        return out

    def merged(self) -> dict[str, torch.Tensor]:
        """The merged task vector sum_t lambda_t tau_t at the learned coefficients (VISUAL-prefixed keys)."""
        return merged_vector(self.stacked, self.lambdas(), self.groups)

    def describe_lambdas(self) -> dict:
        """The learned coefficients as JSON: per task, one value (task-wise) or one per tensor (layer-wise)."""
        lam = self.lambdas().cpu().tolist()
        if self.options["granularity"] == "task":
            values = {t: row[0] for t, row in zip(self.tasks, lam)}
        else:
            values = {t: dict(zip(self.group_names, row)) for t, row in zip(self.tasks, lam)}
        return {"granularity": self.options["granularity"], "clamped": bool(self.options["clamp"]),
                "tasks": self.tasks, "values": values}


# --------------------------------------------------------------------------------------------------- high level
def write_merged(learner: AdaMerging, out: str | os.PathLike, *, force: bool = False, extra: Mapping | None = None
                 ) -> str:
    """Write sum_t lambda_t tau_t as a task vector (every input key; the ones outside the image tower are zero, as
    evaluation requires), each tensor in its first input's dtype, with a `merge` history entry that records the
    options and the learned lambdas. Returns the fingerprint."""
    from . import taskvector as tv

    vectors = learner.vectors
    keys = tv.check_compatible(vectors)
    merged = learner.merged()
    holder = {k: next(v for v in vectors if k in v) for k in keys}
    specs = {k: (holder[k].dtype(k) if holder[k].dtype(k).is_floating_point else torch.float32,
                 tuple(holder[k].shape(k))) for k in keys}
    entry = tv.history_entry("merge", method=METHOD, options=dict(learner.options), alpha=1.0,
                             lambdas=learner.describe_lambdas(), **dict(extra or {}),
                             inputs=[v.describe_input() for v in vectors])
    modes = {v.meta.get("mode") for v in vectors}
    meta = tv.new_meta(vectors[0].meta["base"], tasks=learner.tasks,
                       mode=modes.pop() if len(modes) == 1 else "mixed", history=[entry])

    def items():
        for k in keys:
            t = merged.get(k)
            yield k, (t.cpu() if t is not None else torch.zeros(specs[k][1], dtype=torch.float32))

    return tv.write_vector(out, items(), meta, specs=specs, force=force)


def adamerging(ev: Evaluator, vectors, options: Mapping | None = None, out: str | os.PathLike | None = None, *,
               force: bool = False, flags: Mapping[str, str] | None = None, progress: Progress | None = None) -> dict:
    """Learn the coefficients, write the merged vector to ``out`` (when given) and report the merged model's test
    accuracy per task, Abs.Acc and Norm.Acc (over each vector's single-task test accuracy) as `eval addition` does;
    the learned lambdas replace its alpha search. Returns a JSON-ready dict."""
    options = resolve(options, flags)
    learner = AdaMerging(ev, vectors, options)
    tasks = learner.tasks
    ft, ft_source = {}, {}
    for i, (v, t) in enumerate(zip(learner.vectors, tasks), 1):
        _say(progress, f"adamerging: fine-tuned accuracy of {t} ({i}/{len(tasks)})")
        ft[t], ft_source[f"{t}/test"] = finetuned_accuracy(ev, v, "test")
    ev.reset()
    _say(progress, f"adamerging: {options['granularity']}-wise, {options['steps']} steps of {len(tasks)} x "
                   f"{options['batch_size']} test images, {learner.raw.numel()} coefficients")
    init = learner.lambdas()
    entropy_init = learner.split_entropy(init)
    curve = learner.fit(progress)
    entropy_final = learner.split_entropy(learner.lambdas())
    merged = learner.merged()
    ev.set_weights(merged, 1.0)
    test = ev.accuracies(tasks, "test")
    ev.reset()
    norm = {t: test[t] / ft[t] if ft[t] else None for t in tasks}
    fingerprint = None
    if out is not None:
        fingerprint = write_merged(learner, out, force=force)
    known = [n for n in norm.values() if n is not None]
    return {
        "kind": "adamerging", **ev.provenance(), "vectors": describe_vectors(learner.vectors), "tasks": tasks,
        "options": dict(options), "lambdas": learner.describe_lambdas(),
        "entropy": {"init": entropy_init, "final": entropy_final, "init_sum": sum(entropy_init.values()),
                    "final_sum": sum(entropy_final.values())},
        "loss_curve": curve, "splits": {"adapt": "test", "report": "test"},
        "test_acc": test, "test_norm_acc": norm, "finetuned_acc": {"test": ft}, "finetuned_source": ft_source,
        "abs_acc": _mean(test.values()), "norm_acc": _mean(known) if known and len(known) == len(norm) else None,
        "finetuned_mean_acc": _mean(ft.values()),
        "output": str(out) if out is not None else None, "fingerprint": fingerprint,
    }
