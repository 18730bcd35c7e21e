"""Evaluation of task arithmetic (PROTOCOL.md "Evaluation"): accuracy, the addition and negation alpha searches, and
the weight-disentanglement error map.

Everything that does not depend on alpha is built once by :class:`Evaluator`: the zero-shot head of each task, the
uint8 inputs of each (task, split) on the device (or, for splits over the device's budget, streamed from the cache
file batch by batch: ``tvtool/feed.py``), and theta_0 of the image tower on the device. A grid point then costs
one in-place weight update (``p.copy_(theta0).add_(tau, alpha=a)``) plus the forward passes; correct counts stay on
the device and are read once per (task, split). On the tangent model (linearized vectors) a whole grid costs one jvp
per batch (:meth:`Evaluator.sweep`): its features are affine in alpha.

The searches themselves (:func:`search_addition`, :func:`search_negation`) are pure functions of an accuracy
callback, so their selection rules can be tested without a model.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from . import __version__, defaults, tangent
from .checks import check_alpha, check_finite
from .checks import parse_grid  # noqa: F401  (the one grid parser; evaluate.parse_grid is its public name here too)
from .defaults import default_device
from .errors import TVToolError, spell
from .evaldata import EvalData
from .feed import Placement
from .fileio import atomic_path
from .taskvector import open_vector
from .weightstate import WeightState

VISUAL = "visual."
DEFAULT_THRESHOLD = 0.95
NO_ALPHA = "no-alpha-qualifies"
SWEEP_CHUNK = 32  # grid points evaluated together by Evaluator.sweep (memory: chunk x batch x classes logits)


Progress = Callable[[str], None]  # receives one plain line per task / alpha point (the CLI prints it to stderr)


def _say(progress: Progress | None, line: str) -> None:
    if progress is not None:
        progress(line)


# --------------------------------------------------------------------------------------------------- grids
DEFAULT_GRID = tuple(parse_grid(defaults.ALPHA_GRID))  # 0, 0.05, ..., 1 (protocol)
DEFAULT_DISENTANGLEMENT_GRID = tuple(parse_grid(defaults.DISENTANGLEMENT_GRID))  # -2 .. 2, 9 points


# --------------------------------------------------------------------------------------------------- vectors
def open_vectors(paths: Sequence[str | os.PathLike]):
    if not paths:
        raise TVToolError("no task vectors given; pass one or more .st files")
    out = []
    for p in paths:
        if not Path(p).is_file():
            raise TVToolError(f"{p}: no such file")
        out.append(open_vector(p))
    return out


def vector_task(vec) -> str:
    tasks = vec.tasks
    if len(tasks) != 1:
        raise TVToolError(f"{vec.path}: this evaluation needs a single-task vector (the file records tasks {tasks}); "
                          "pass the per-task vectors, not a merged one")
    return tasks[0]


def orientation(history) -> int | None:
    """+1 when a vector points along its task (fine-tuned or extracted, or scaled by a positive number), -1 when it
    points against it (negated an odd number of times), None when its history cannot tell (a sum of several
    vectors, no history)."""
    if not history or not isinstance(history[-1], dict):
        return None
    last = history[-1]
    if last.get("op") in ("finetune", "extract", "convert"):
        return 1
    inputs, coefficients = last.get("inputs") or [], last.get("coefficients") or []
    if len(inputs) != 1 or len(coefficients) != 1 or not isinstance(inputs[0], dict):
        return None
    inner = orientation(inputs[0].get("history"))
    if inner is None or not isinstance(coefficients[0], (int, float)) or coefficients[0] == 0:
        return None
    return inner if coefficients[0] > 0 else -inner


def check_not_negated(vec) -> None:
    """Negation evaluates theta_0 - alpha * tau: a vector made by `tvtool negate` would be added back."""
    if orientation(vec.meta.get("history")) == -1:
        source = ((vec.meta["history"][-1].get("inputs") or [{}])[0]).get("path")
        raise TVToolError(f"{vec.path} is already negated (its history records `negate`), and negation evaluation "
                          "negates the vector itself: pass the task vector it was made from"
                          + (f" ({source})" if source else "") + ", or measure this one with `tvtool eval accuracy`")


def load_deltas(vectors, device, weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """sum_i w_i * tau_i over the image-tower keys, fp32 on ``device`` (summed there, once).

    Non-image-tower tensors are accepted only if they are zero: the zero-shot heads are built from theta_0's text
    tower, so a vector that changed it could not be evaluated faithfully.
    """
    weights = [1.0] * len(vectors) if weights is None else list(weights)
    out: dict[str, torch.Tensor] = {}
    for vec, w in zip(vectors, weights):
        for key in vec.keys():
            t = vec.get(key)
            if not key.startswith(VISUAL):
                if t.is_floating_point() and bool(t.any()):
                    raise TVToolError(f"{vec.path}: changes {key}, outside the image tower; tvtool evaluates image-"
                                      "tower task vectors only (extract without --all, or from an image-tower tune)")
                continue
            if not t.is_floating_point():
                continue
            t = t.to(device=device, dtype=torch.float32)
            if key in out:
                out[key].add_(t, alpha=w)
            else:
                out[key] = t.mul(w) if w != 1.0 else t.clone()
    return out


def describe_vectors(vectors) -> list[dict]:
    return [{"path": str(v.path), "fingerprint": v.fingerprint, "tasks": v.tasks} for v in vectors]


def check_base(vectors, bundle) -> None:
    for v in vectors:
        fp = v.base_fingerprint
        if fp and bundle is not None and fp != bundle.fingerprint:
            base = v.meta.get("base") or {}
            raise TVToolError(f"{v.path}: taken against base {base.get('model')}:{base.get('pretrained')} ({fp}) but "
                              f"the loaded model is {bundle.name}:{bundle.pretrained} ({bundle.fingerprint}); pass "
                              "the matching --model/--pretrained")


def wants_linearized(vectors, choice: bool | None = None) -> bool:
    """Vectors from linearized fine-tuning are evaluated on the tangent model (as in tangent task arithmetic);
    ``choice`` overrides. Mixing linear and non-linear vectors has no single faithful model: refused."""
    modes = {(v.meta.get("mode") or "full") for v in vectors}
    if choice is not None:
        return choice
    if "linear" in modes and len(modes) > 1:
        raise TVToolError(f"vectors mix linearized and non-linear fine-tuning ({', '.join(sorted(modes))}); "
                          f"pass {spell('--linearized or --no-linearized', 'linearized=True or False')} to choose the model they "
                          "are evaluated on")
    return modes == {"linear"}


def recorded_base(vectors) -> tuple[str | None, str | None]:
    """(model, pretrained) recorded in the vectors' metadata; they must agree."""
    bases = {((v.meta.get("base") or {}).get("model"), (v.meta.get("base") or {}).get("pretrained")) for v in vectors}
    bases.discard((None, None))
    if len(bases) > 1:
        raise TVToolError(f"the vectors record different base models {sorted(map(str, bases))}; pass the model "
                          "and its weights explicitly (or vectors taken against one base)")
    return next(iter(bases)) if bases else (None, None)


# --------------------------------------------------------------------------------------------------- evaluator
class Evaluator:
    """Accuracy of theta_0 + sum_i a_i tau_i on tasks, with everything alpha-independent built once.

    Three pieces: the weight state (``weights``: theta_0 and the in-place combination,
    :class:`~tvtool.weightstate.WeightState`), the data (``data``: heads and inputs on the device,
    :class:`~tvtool.evaldata.EvalData`), and the tower evaluated on them, the tangent model when ``linearized``
    (its maths in :mod:`tvtool.tangent`).

    ``Evaluator(bundle, tasks, data_root, splits, device, batch_size)`` wires a :class:`~tvtool.models.ClipBundle`
    to the data layer; :meth:`from_parts` takes plain objects (an image tower, heads, input tensors) instead.
    Heads and inputs are built lazily on first use and then kept on the device. ``max_examples`` keeps only the
    first N examples of each split (quick looks; the protocol's figures use whole splits, the default).
    ``data_on_device`` (auto | yes | no) chooses between holding a split's images on the device and streaming them.
    """

    def __init__(self, bundle, tasks: Sequence[str], data_root=None, splits: Sequence[str] = ("val", "test"),
                 device: str | None = None, batch_size: int = 256, max_examples: int | None = None,
                 linearized: bool = False, data_on_device: str = "auto"):
        device = device or default_device()
        if bundle.device != torch.device(device):
            bundle.model.to(device)
        if max_examples is not None and max_examples < 1:
            raise TVToolError(f"max examples must be >= 1, got {max_examples}")
        self.bundle = bundle
        self.data_root = data_root
        self.max_examples = max_examples
        data = EvalData(device, batch_size, bundle.mean, bundle.std, bundle=bundle, data_root=data_root,
                        max_examples=max_examples)
        data.placement = Placement(data.device, data_on_device, announce_held=False)
        self._setup(bundle.model.visual, data)
        self.tasks = list(tasks)
        self.splits = list(splits)
        if linearized:
            self._linearize()

    @classmethod
    def from_parts(cls, visual: torch.nn.Module, heads: Mapping[str, torch.Tensor],
                   inputs: Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor]],
                   mean: Sequence[float], std: Sequence[float], device: str = "cpu", batch_size: int = 256):
        """An evaluator over given parts: ``heads[task]`` [C, D] (already scaled), ``inputs[(task, split)]`` =
        (uint8 [N,3,S,S], int64 [N])."""
        self = cls.__new__(cls)
        self.bundle = None
        self.data_root = None
        self.max_examples = None
        visual.to(device)
        self._setup(visual, EvalData(device, batch_size, mean, std, heads=heads, inputs=inputs))
        self.tasks = sorted({t for t, _ in inputs})
        self.splits = sorted({s for _, s in inputs})
        return self

    def _setup(self, visual: torch.nn.Module, data: EvalData) -> None:
        self.data = data
        self.device = data.device
        self.batch_size = data.batch_size
        self.visual = visual.eval()
        self.weights = WeightState.of(visual, VISUAL)
        self.linearized = False
        self._zeroshot: dict[tuple[str, str], torch.Tensor] = {}  # correct counts at theta_0
        self._autocast = self.device.type == "cuda"

    def _linearize(self) -> None:
        """Evaluate the tangent model f(x; theta_0) + J(x) (theta - theta_0) (Ortiz-Jimenez et al.), the model that
        linearized fine-tuning trains: theta is updated in place as usual, theta_0 is the tower's own weights."""
        lin = tangent.linearize(self.visual)
        self.weights = WeightState({VISUAL + n: t for n, t in zip(lin.names, lin.theta)},
                                   {VISUAL + n: p.detach() for n, p in self.visual.named_parameters()})
        self.visual = lin
        self.linearized = True

    # the weight state's tensors under the names they always had
    @property
    def _params(self) -> dict[str, torch.Tensor]:
        return self.weights.params

    @property
    def _theta0(self) -> dict[str, torch.Tensor]:
        return self.weights.theta0

    # ---- weights
    def set_combination(self, terms: Iterable[tuple[Mapping[str, torch.Tensor], float]]) -> None:
        """Image tower := theta_0 + sum of coef * tau over ``terms``, in place (only touched tensors move)."""
        self.weights.set_combination(terms)

    def set_weights(self, vectors_sum: Mapping[str, torch.Tensor], alpha: float) -> None:
        """Image tower := theta_0 + alpha * vectors_sum, in place."""
        self.set_combination([(vectors_sum, alpha)])

    def reset(self) -> None:
        self.set_combination([])

    # ---- heads and inputs (built once)
    def head(self, task: str) -> torch.Tensor:
        return self.data.head(task)

    def inputs(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.inputs(task, split)

    def head_identity(self, task: str) -> str:
        return self.data.head_identity(task)

    def inputs_identity(self, task: str, split: str) -> str:
        return self.data.inputs_identity(task, split)

    # ---- inference
    @torch.inference_mode()
    def predict(self, task: str, split: str) -> torch.Tensor:
        """Predicted class of every example, int64 on the device (no host sync)."""
        head = self.head(task)
        # written in place, not a list of per-batch tensors: small allocations that outlive each batch sit between
        # its freed activations and fragment the heap (host memory grew ~10 MB a batch on a 59k-image split)
        preds = torch.empty(self.data.size(task, split), dtype=torch.int64, device=self.device)
        done = 0
        for xb in self.data.normalized_batches(task, split):
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self._autocast):
                feats = self.visual(xb)
            if isinstance(feats, tuple):
                feats = feats[0]
            torch.argmax(F.normalize(feats.float(), dim=-1) @ head.T, -1, out=preds[done:done + len(xb)])
            done += len(xb)
        return preds

    def correct(self, task: str, split: str) -> torch.Tensor:
        """Number of correct predictions as a device scalar (no host sync).

        At theta_0 (nothing applied) the count is remembered: every negation and every alpha = 0 grid point asks
        for the same zero-shot figures, on ImageNet-sized control sets."""
        at_theta0 = self.weights.at_theta0
        if at_theta0 and (task, split) in self._zeroshot:
            return self._zeroshot[(task, split)]
        _, y = self.inputs(task, split)
        count = self.predict(task, split).eq(y).sum()
        if at_theta0:
            self._zeroshot[(task, split)] = count
        return count

    def accuracy(self, task: str, split: str) -> float:
        n = self.data.size(task, split)
        return self.correct(task, split).item() / n

    def accuracies(self, tasks: Sequence[str], split: str) -> dict[str, float]:
        """Accuracy on each task with one host sync for all of them."""
        counts = torch.stack([self.correct(t, split) for t in tasks]).tolist()
        return {t: c / self.data.size(t, split) for t, c in zip(tasks, counts)}

    def sweep(self, direction: Mapping[str, torch.Tensor], alphas: Sequence[float], tasks: Sequence[str],
              split: str, on_point: Callable[[int, float, dict[str, float]], None] | None = None
              ) -> list[dict[str, float]]:
        """Accuracy on each task of theta_0 + a * direction for every a in ``alphas`` (a list aligned with them).

        The tangent model is affine in a: its features are f(x; theta_0) + a * J(x) direction, so one jvp per batch
        serves the whole grid (a 21-point search costs one pass instead of 21). Other models take a pass per point.
        On the CPU (fp32) both give the same accuracies; under CUDA autocast the per-point path adds the two terms in
        bf16 and the sweep in fp32, so near-ties may differ within bf16 rounding.
        ``on_point(i, a, acc)`` is called as each point is known. Leaves the tower at theta_0."""
        alphas = [float(a) for a in alphas]
        results: list[dict[str, float]] = []
        if not self.linearized:
            for i, a in enumerate(alphas):
                self.set_weights(direction, a)
                results.append(self.accuracies(tasks, split))
                if on_point is not None:
                    on_point(i, a, results[-1])
            self.reset()
            return results
        tangents = [self.tangents(direction)]
        coefs = [[a] for a in alphas]
        counts = torch.stack([self.tangent_predictions(t, split, tangents, coefs).eq(self.inputs(t, split)[1]).sum(-1)
                              for t in tasks], dim=1)  # [A, T]
        totals = [self.data.size(t, split) for t in tasks]
        for i, (a, row) in enumerate(zip(alphas, counts.tolist())):  # one host sync for the whole grid
            results.append({t: c / n for t, c, n in zip(tasks, row, totals)})
            if on_point is not None:
                on_point(i, a, results[-1])
        return results

    def tangents(self, direction: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``direction`` as a jvp tangent of the linearized tower: one tensor per parameter, zeros where absent."""
        self.weights.check(direction)
        return tangent.tangent_vector(self.visual, direction, VISUAL)

    _tangents = tangents  # its earlier name

    @torch.inference_mode()
    def tangent_predictions(self, task: str, split: str, tangents: Sequence[tuple[torch.Tensor, ...]],
                            coefs: Sequence[Sequence[float]]) -> torch.Tensor:
        """Predicted classes [P, N] of the tangent model at theta_0 + sum_k coefs[p][k] * v_k for every point p, where
        ``tangents[k]`` is v_k as :meth:`tangents` returns it: one jvp per batch and direction serves every point,
        since the features are f(x; theta_0) + sum_k c_k J(x) v_k."""
        self.reset()
        head = self.head(task)
        return tangent.predictions(self.visual, self.data.normalized_batches(task, split), head, tangents, coefs,
                                   autocast=self._autocast, chunk=SWEEP_CHUNK, n=self.data.size(task, split))

    def provenance(self) -> dict:
        b = self.bundle
        return {"model": b.name if b else None, "pretrained": b.pretrained if b else None,
                "base_fingerprint": b.fingerprint if b else None, "device": str(self.device),
                "max_examples": self.max_examples, "linearized": getattr(self, "linearized", False),
                "tvtool": __version__}


# --------------------------------------------------------------------------------------------------- searches
def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def search_addition(grid: Sequence[float], tasks: Sequence[str], val_acc: Callable[[float], Mapping[str, float]],
                    ft_val: Mapping[str, float]) -> tuple[float, list[dict]]:
    """Choose alpha maximizing the mean normalized Val accuracy (acc / fine-tuned acc) over ``grid``.

    Ties go to the smallest alpha (the grid is scanned in ascending order and only a strictly better score
    replaces the best): the smallest edit of theta_0 that reaches the best score. Returns (alpha, curve).
    """
    for t in tasks:
        if not ft_val.get(t):
            raise TVToolError(f"{t}: fine-tuned Val accuracy is {ft_val.get(t)!r}; normalized accuracy needs a "
                              "positive one (check the vector's metrics)")
    best, best_score, curve = None, -math.inf, []
    for a in sorted(grid):
        acc = dict(val_acc(a))
        norm = {t: acc[t] / ft_val[t] for t in tasks}
        score = _mean(norm.values())
        curve.append({"alpha": a, "val_acc": acc, "val_norm_acc": norm, "mean_val_acc": _mean(acc[t] for t in tasks),
                      "mean_val_norm_acc": score})
        if score > best_score:
            best, best_score = a, score
    return best, curve


def search_negation(grid: Sequence[float], val_acc: Callable[[float], tuple[float, float]],
                    zeroshot_control_val: float, threshold: float = DEFAULT_THRESHOLD) -> tuple[float | None, list]:
    """Choose alpha minimizing target Val accuracy subject to control Val acc >= threshold * zero-shot control.

    ``val_acc(alpha) -> (target, control)`` for theta_0 - alpha * tau. Ties go to the smallest alpha. Returns
    (alpha or None when no grid point qualifies, curve).
    """
    floor = threshold * zeroshot_control_val
    best, best_target, curve = None, math.inf, []
    for a in sorted(grid):
        target, control = val_acc(a)
        ok = control >= floor
        curve.append({"alpha": a, "target_val_acc": target, "control_val_acc": control, "qualifies": ok})
        if ok and target < best_target:
            best, best_target = a, target
    return best, curve


# --------------------------------------------------------------------------------------------------- metrics cache
def _metrics_cache_path(vec, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return defaults.cache_root() / "metrics" / f"{digest}.json"


def finetuned_accuracy(ev: Evaluator, vec, split: str) -> tuple[float, str]:
    """The single-task fine-tuned accuracy of ``vec`` on its task: (value, source).

    From the vector's ``metrics`` when recorded; otherwise computed as acc(theta_0 + tau_t) on task t and cached
    under ``$TVTOOL_CACHE/metrics/`` keyed by the vector and base fingerprints, the data, and the model evaluated
    (the tangent model or not: a linear-mode vector's accuracy differs between the two); the input file is never
    rewritten.
    """
    task = vector_task(vec)
    recorded = (vec.meta.get("metrics") or {}).get(f"{split}_acc")
    # recorded figures are whole-split ones, measured on the model the vector was trained as (the tangent model for
    # linear mode): a subset (max_examples) or the other model needs its own figure, computed here
    trained_linear = (vec.meta.get("mode") or "full") == "linear"
    if isinstance(recorded, (int, float)) and 0 <= recorded <= 1 and ev.max_examples is None \
            and trained_linear == bool(ev.linearized):
        return float(recorded), "metadata"
    fp = vec.fingerprint
    # everything the figure depends on: the vector, the model (weights, architecture: GELU and QuickGELU share
    # weights; tangent or not), the head, the examples (identity of the split's tensors, not only their path)
    key = {"vector": fp, "base": (ev.bundle.fingerprint if ev.bundle else None),
           "model": ev.bundle.name if ev.bundle else None, "linearized": bool(ev.linearized), "task": task,
           "split": split, "data_root": str(Path(ev.data_root).resolve()) if ev.data_root
           else os.environ.get("TVTOOL_DATA"), "max_examples": ev.max_examples, "head": ev.head_identity(task),
           "inputs": ev.inputs_identity(task, split)}
    path = _metrics_cache_path(vec, key) if fp != "unknown" else None
    if path is not None and path.is_file():
        try:
            doc = json.loads(path.read_text())
            if doc.get("key") == key:
                return float(doc["acc"]), "cache"
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable cache entry: recompute
    tau = load_deltas([vec], ev.device)
    ev.set_weights(tau, 1.0)
    acc = ev.accuracy(task, split)
    del tau
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path, force=True) as tmp:
                tmp.write_text(json.dumps({"key": key, "acc": acc}))
        except OSError:
            pass  # a read-only cache must not stop the evaluation
    return acc, "computed"


# --------------------------------------------------------------------------------------------------- high level
def eval_accuracy(ev: Evaluator, vectors=(), alpha: float = 1.0, tasks: Sequence[str] | None = None,
                  split: str = "test", *, progress: Progress | None = None) -> dict:
    """Accuracy of theta_0 + alpha * sum(vectors) on each task."""
    alpha = check_alpha("--alpha", alpha)
    tasks = list(tasks or ev.tasks)
    if not tasks:
        raise TVToolError(f"no tasks to evaluate; pass {spell('--tasks t1,t2', 'tasks')} (or vectors that record their "
                          "task)")
    if vectors:
        ev.set_weights(load_deltas(vectors, ev.device), alpha)
    else:
        ev.reset()
    acc = {}
    for i, t in enumerate(tasks, 1):
        _say(progress, f"accuracy: {t} ({i}/{len(tasks)}) on {split}")
        acc[t] = ev.accuracy(t, split)
    return {"kind": "accuracy", **ev.provenance(), "vectors": describe_vectors(vectors), "alpha": alpha,
            "split": split, "tasks": tasks, "accuracy": acc, "mean_accuracy": _mean(acc.values())}


def norm_vs_baseline(test_acc: Mapping[str, float], baseline_acc: Mapping[str, float]
                     ) -> tuple[dict[str, float | None], float | None]:
    """Merged accuracy over a fixed baseline's single-task accuracies: (per task, mean over tasks).

    The paper's Norm.Acc divides by each method's *own* single-task accuracies, so a method that fine-tunes worse
    scores higher; with one baseline (plain fine-tuning of the same tasks) as the denominator for every method, the
    figure moves only with the merged model."""
    per_task = {t: (a / baseline_acc[t] if baseline_acc.get(t) else None) for t, a in test_acc.items()}
    known = [v for v in per_task.values() if v is not None]
    return per_task, (_mean(known) if known and len(known) == len(per_task) else None)


def addition(ev: Evaluator, vectors, grid: Sequence[float] = DEFAULT_GRID, *, val_split: str = "val",
             test_split: str = "test", merged=None, baseline=None, progress: Progress | None = None) -> dict:
    """The protocol's task addition: alpha from ``grid`` on Val by mean normalized accuracy; test Abs/Norm.Acc.

    With ``merged`` (a vector made by `tvtool merge`), the alpha search scales that vector instead of the sum of
    ``vectors``; the single-task ``vectors`` then only name the tasks and give the fine-tuned accuracies.
    With ``baseline`` (one single-task vector per task, e.g. plain fine-tuning of the same tasks), the result also
    holds ``norm_acc_vs_baseline``: the test accuracies over the baseline's single-task test accuracies, measured on
    this evaluator's model (see :func:`norm_vs_baseline`). ``finetuned_mean_acc`` is the mean single-task test
    accuracy of ``vectors`` (the paper's Norm.Acc denominators).
    """
    tasks = [vector_task(v) for v in vectors]
    if len(set(tasks)) != len(tasks):
        raise TVToolError(f"two vectors share a task ({tasks}); pass one vector per task")
    if baseline is not None:
        base_tasks = [vector_task(b) for b in baseline]
        if sorted(base_tasks) != sorted(tasks):
            raise TVToolError(f"the baseline vectors are for tasks {sorted(base_tasks)}, the vectors for "
                              f"{sorted(tasks)}; pass one baseline vector per task of the vectors")
    ft = {s: {} for s in (val_split, test_split)}
    ft_source = {}
    for i, (v, t) in enumerate(zip(vectors, tasks), 1):
        _say(progress, f"addition: fine-tuned accuracy of {t} ({i}/{len(tasks)})")
        for s in ft:
            ft[s][t], ft_source[f"{t}/{s}"] = finetuned_accuracy(ev, v, s)
    if merged is not None:
        missing = sorted(set(tasks) - set(merged.tasks))
        if missing:
            raise TVToolError(f"{merged.path} was not merged from a vector for {missing[0]}; pass the single-task "
                              "vectors it was made from")
    total = load_deltas([merged] if merged is not None else vectors, ev.device)

    points = sorted(set(grid))
    if ev.linearized:
        _say(progress, f"addition: {len(points)} alphas of the tangent model in one pass per {val_split} batch")
    swept = ev.sweep(total, points, tasks, val_split, on_point=lambda i, a, acc: _say(
        progress, f"addition: alpha {a:g} ({i + 1}/{len(points)}) mean {val_split} acc "
                  f"{100 * _mean(acc.values()):.2f}%"))
    alpha, curve = search_addition(grid, tasks, dict(zip(points, swept)).__getitem__, ft[val_split])
    _say(progress, f"addition: alpha {alpha:g} chosen; {test_split} accuracy")
    ev.set_weights(total, alpha)
    test = ev.accuracies(tasks, test_split)
    norm = {t: test[t] / ft[test_split][t] if ft[test_split][t] else None for t in tasks}
    base = None
    if baseline is not None:
        base_acc, base_source = {}, {}
        for i, b in enumerate(baseline, 1):
            t = vector_task(b)
            _say(progress, f"addition: baseline single-task accuracy of {t} ({i}/{len(baseline)})")
            base_acc[t], base_source[t] = finetuned_accuracy(ev, b, test_split)
        base_norm, base_mean = norm_vs_baseline(test, base_acc)
        base = {"vectors": describe_vectors(baseline), "finetuned_acc": {test_split: base_acc},
                "finetuned_source": base_source, "finetuned_mean_acc": _mean(base_acc.values()),
                "test_norm_acc": base_norm}
    return {
        "kind": "addition", **ev.provenance(), "vectors": describe_vectors(vectors),
        "merged": describe_vectors([merged])[0] if merged is not None else None, "grid": list(grid),
        "splits": {"select": val_split, "report": test_split}, "tasks": tasks, "alpha": alpha,
        "test_acc": test, "test_norm_acc": norm, "finetuned_acc": ft, "finetuned_source": ft_source,
        "abs_acc": _mean(test.values()),
        "norm_acc": _mean(n for n in norm.values() if n is not None) if any(n is not None for n in norm.values())
        else None,
        "finetuned_mean_acc": _mean(ft[test_split].values()),
        "norm_acc_vs_baseline": base_mean if base is not None else None, "baseline": base,
        "curve": curve,
    }


def default_control(task: str) -> str:
    return "mini-control" if task.startswith("mini-") else "imagenet"


def negation(ev: Evaluator, vector, control: str | None = None, grid: Sequence[float] = DEFAULT_GRID, *,
             threshold: float = DEFAULT_THRESHOLD, val_split: str = "val", test_split: str = "test",
             progress: Progress | None = None) -> dict:
    """The protocol's task negation: theta_0 - alpha * tau_t, alpha minimizing target Val accuracy subject to
    control Val accuracy >= threshold x zero-shot control Val accuracy."""
    threshold = check_finite("threshold", threshold, low=0, low_open=True)
    target = vector_task(vector)
    check_not_negated(vector)
    control = control or default_control(target)
    if control == target:
        raise TVToolError(f"the control task must differ from the target {target!r}; pass "
                          f"{spell('--control', 'control')}")
    tau = load_deltas([vector], ev.device)
    ev.reset()
    _say(progress, f"negation {target}: zero-shot accuracy (control {control})")
    zs_val = ev.accuracies([target, control], val_split)
    zs_test = ev.accuracies([target, control], test_split)
    points = sorted(set(grid))
    swept = ev.sweep(tau, [-a for a in points], [target, control], val_split, on_point=lambda i, a, acc: _say(
        progress, f"negation {target}: alpha {-a:g} ({i + 1}/{len(points)}) target {100 * acc[target]:.2f}% "
                  f"control {100 * acc[control]:.2f}%"))
    by_alpha = {a: (acc[target], acc[control]) for a, acc in zip(points, swept)}
    alpha, curve = search_negation(grid, by_alpha.__getitem__, zs_val[control], threshold)
    result = {
        "kind": "negation", **ev.provenance(), "vectors": describe_vectors([vector]), "grid": list(grid),
        "splits": {"select": val_split, "report": test_split}, "target": target, "control": control,
        "threshold": threshold, "control_floor_val_acc": threshold * zs_val[control],
        "zeroshot": {"target_val_acc": zs_val[target], "control_val_acc": zs_val[control],
                     "target_test_acc": zs_test[target], "control_test_acc": zs_test[control]},
        "alpha": alpha, "curve": curve,
    }
    if alpha is None:
        result.update(status=NO_ALPHA, tar_acc=None, con_acc=None,
                      message=f"no alpha in the grid keeps {control} Val accuracy >= {threshold:g} x zero-shot "
                              f"({100 * threshold * zs_val[control]:.2f}%); try a finer grid or a lower "
                              f"{spell('--threshold', 'threshold')}")
    else:
        ev.set_weights(tau, -alpha)
        acc = ev.accuracies([target, control], test_split)
        result.update(status="ok", tar_acc=acc[target], con_acc=acc[control], message="")
    ev.reset()
    return result


def disentanglement(ev: Evaluator, a, b, grid: Sequence[float] = DEFAULT_DISENTANGLEMENT_GRID, *,
                    split: str = "test", grid_b: Sequence[float] | None = None,
                    progress: Progress | None = None) -> dict:
    """xi(a1, a2) = sum_t E_{x~D_t} 1[pred(theta0 + a_t tau_t) != pred(theta0 + a1 tau1 + a2 tau2)] (Ortiz-Jimenez).

    ``error[i][j]`` is xi(grid[i], grid_b[j]). Single-task predictions are computed once per alpha; mismatch counts
    stay on the device until the end (one host sync for the whole map). On the tangent model every point comes from
    one jvp pass per vector and batch (:meth:`Evaluator.tangent_predictions`).
    """
    t1, t2 = vector_task(a), vector_task(b)
    if t1 == t2:
        raise TVToolError(f"both vectors are for task {t1!r}; disentanglement compares two different tasks")
    g1, g2 = list(grid), list(grid_b if grid_b is not None else grid)
    tau1 = load_deltas([a], ev.device)
    tau2 = load_deltas([b], ev.device)
    n1, n2 = ev.inputs(t1, split)[1].numel(), ev.inputs(t2, split)[1].numel()
    if ev.linearized:  # features affine in (a1, a2): two jvp passes per batch and task serve the whole map
        _say(progress, f"disentanglement: tangent model, {len(g1)} x {len(g2)} points from one pass per vector")
        both = [ev.tangents(tau1), ev.tangents(tau2)]
        points = [(a1, a2) for a1 in g1 for a2 in g2]
        p1 = ev.tangent_predictions(t1, split, both, [(a1, 0.0) for a1 in g1] + points)
        p2 = ev.tangent_predictions(t2, split, both, [(0.0, a2) for a2 in g2] + points)
        m1 = p1[len(g1):].view(len(g1), len(g2), -1).ne(p1[:len(g1), None, :]).sum(-1)
        m2 = p2[len(g2):].view(len(g1), len(g2), -1).ne(p2[None, :len(g2), :]).sum(-1)
        return _disentanglement_result(ev, a, b, t1, t2, split, g1, g2, m1, m2, n1, n2)
    single1, single2 = [], []
    for a1 in g1:
        ev.set_weights(tau1, a1)
        single1.append(ev.predict(t1, split))
    for a2 in g2:
        ev.set_weights(tau2, a2)
        single2.append(ev.predict(t2, split))
    m1 = torch.zeros(len(g1), len(g2), dtype=torch.long, device=ev.device)
    m2 = torch.zeros_like(m1)
    for i, a1 in enumerate(g1):
        _say(progress, f"disentanglement: alpha1 {a1:g} ({i + 1}/{len(g1)}) x {len(g2)} alpha2 points")
        for j, a2 in enumerate(g2):
            ev.set_combination([(tau1, a1), (tau2, a2)])
            m1[i, j] = ev.predict(t1, split).ne(single1[i]).sum()
            m2[i, j] = ev.predict(t2, split).ne(single2[j]).sum()
    ev.reset()
    return _disentanglement_result(ev, a, b, t1, t2, split, g1, g2, m1, m2, n1, n2)


def _disentanglement_result(ev, a, b, t1, t2, split, g1, g2, m1, m2, n1, n2) -> dict:
    e1 = (m1.double() / n1).cpu()
    e2 = (m2.double() / n2).cpu()
    err = e1 + e2
    return {"kind": "disentanglement", **ev.provenance(), "vectors": describe_vectors([a, b]), "tasks": [t1, t2],
            "split": split, "grid": {"alpha1": g1, "alpha2": g2}, "error": err.tolist(),
            "error_task1": e1.tolist(), "error_task2": e2.tolist(), "mean_error": float(err.mean())}


def plot_disentanglement(result: dict, path: str | os.PathLike, *, force: bool = False) -> None:
    """Heat-map PNG of xi over (alpha1 rows, alpha2 columns), written atomically."""
    import matplotlib  # an optional dependency, imported only when a plot is asked for

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = torch.tensor(result["error"], dtype=torch.float64).numpy()
    g1, g2 = result["grid"]["alpha1"], result["grid"]["alpha2"]
    t1, t2 = result["tasks"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(g2) + 2), max(4.0, 0.5 * len(g1) + 1.5)))
    # rows = alpha1 drawn bottom-up so the map reads like a plot with alpha1 on the vertical axis
    im = ax.imshow(m, cmap="viridis_r", origin="lower", vmin=0.0, vmax=max(float(m.max()), 1e-6))
    ax.set_xticks(range(len(g2)), [f"{v:g}" for v in g2], rotation=45)
    ax.set_yticks(range(len(g1)), [f"{v:g}" for v in g1])
    ax.set_xlabel(f"alpha_2 ({t2})")
    ax.set_ylabel(f"alpha_1 ({t1})")
    ax.set_title("weight-disentanglement error")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    with atomic_path(path, force) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_json(result: dict, path: str | os.PathLike, *, force: bool = False) -> None:
    with atomic_path(path, force) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
