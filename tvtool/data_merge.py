"""Data-aware merges (``regmean``, ``fisher``; issue 24): each fine-tuned model theta_0 + tau_t run on a seeded
subset of its task's training images, its statistics collected by the method's ``collect``, then the per-key merge,
written like any `tvtool merge` output. It loads models and data, so it sits above the merge package (which holds
the hooks and the maths: tvtool/merge/data.py, tvtool/merge/methods/regmean.py, fisher.py).
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Mapping, Sequence

import torch

from .errors import TVToolError
from .merge.data import collect, merge_stats, task_rows
from .merge.registry import get_method, resolve_options

Progress = Callable[[str], None]


class StatsContext:
    """The model side of a data-aware merge: an :class:`~tvtool.evaluate.Evaluator` (its image tower, heads and
    device), the vectors' tensors, and each task's training images.

    ``use(i)`` sets the tower to theta_0 + tau_i; ``batches(i, examples, batch)`` yields normalized fp32 image
    batches of task i (a ``seed``-chosen subset of ``split``) on the device.
    """

    def __init__(self, ev, tasks: Sequence[str], taus: Sequence[Mapping[str, torch.Tensor]], *, seed: int = 0,
                 split: str = "train", progress: Progress | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        self.ev = ev
        self.tasks = list(tasks)
        self.taus = list(taus)
        self.seed = int(seed)
        self.split = split
        self.progress = progress
        self.visual = ev.visual
        self.device = ev.device
        b = ev.bundle  # the model's normalization; an evaluator from parts takes it from the caller
        mean = torch.tensor(mean or (b.mean if b is not None else (0.0, 0.0, 0.0)), dtype=torch.float32,
                            device=self.device)
        std = torch.tensor(std or (b.std if b is not None else (1.0, 1.0, 1.0)), dtype=torch.float32,
                           device=self.device)
        self._mean, self._std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        self.used: dict[str, int] = {}  # examples each task contributed

    def say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)

    def use(self, i: int) -> None:
        self.ev.set_weights(self.taus[i], 1.0)

    def head(self, i: int) -> torch.Tensor:
        return self.ev.head(self.tasks[i])

    def _split(self, task: str):
        from .datasets import ImageSplit, open_split

        ev = self.ev
        if ev.bundle is None:  # an evaluator from parts: its held inputs of the split
            x, y = ev.inputs(task, self.split)
            return ImageSplit.from_tensors(x.cpu(), y.cpu())
        return open_split(task, self.split, ev.data_root, ev.bundle.image_size)

    def batches(self, i: int, examples: int, batch: int) -> Iterator[torch.Tensor]:
        task = self.tasks[i]
        data = self._split(task)
        rows = task_rows(len(data), examples, self.seed, task)
        self.used[task] = int(rows.numel())
        for start in range(0, rows.numel(), batch):
            x = data.read(rows[start:start + batch]).to(self.device, non_blocking=True)
            yield (x.float() / 255.0 - self._mean) / self._std


# ------------------------------------------------------------------------------------------ the merge
def _check_vectors(vectors) -> None:
    modes = {(v.meta.get("mode") or "full") for v in vectors}
    if "linear" in modes:
        raise TVToolError("data-aware merges act on the fine-tuned weights theta_0 + tau of the plain model; "
                          "linearized (--mode linear) vectors are not supported")


def _vector_tasks(vectors, tasks: Sequence[str] | None) -> list[str]:
    if tasks is not None:
        tasks = list(tasks)
        if len(tasks) != len(vectors):
            raise TVToolError(f"--tasks names {len(tasks)} tasks for {len(vectors)} vectors; name one task per "
                              "vector, in order")
        return tasks
    out = []
    for v in vectors:
        if len(v.tasks) != 1:
            raise TVToolError(f"{v.path}: a data-aware merge needs each vector's task, and this one records "
                              f"{v.tasks or 'none'}; pass --tasks t1,t2,... (one per vector, in order)")
        out.append(v.tasks[0])
    return out


def merge_with_data(method: str, paths: Sequence[str | os.PathLike], out: str | os.PathLike,
                    options: Mapping | None = None, *, tasks: Sequence[str] | None = None, data_root=None,
                    device: str | None = None, bundle=None, alpha: float = 1.0, seed: int = 0,
                    dtype=None, force: bool = False, progress: Progress | None = None) -> str:
    """A data-aware merge of task-vector files into ``out`` (atomic; history as `merge_files` writes it, plus what
    data was used); returns its fingerprint.

    The model is the base the vectors record (or ``bundle``, already loaded, its image tower at theta_0: recipes
    pass theirs, and get it back at theta_0); each vector's
    task is the one it records (or ``tasks``, in order). ``seed`` chooses the training images.
    """
    from . import evaluate
    from . import taskvector as tv

    m = get_method(method)
    if m.collect is None:
        raise TVToolError(f"{m.name} is not data-aware; use tvtool.merge.merge_files")
    opts = resolve_options(m, options)
    if isinstance(dtype, str):
        dtype = tv.parse_dtype(dtype)
    if not paths:
        raise TVToolError("no task vectors given; pass one .st file per task")
    if m.check is not None:
        m.check(opts, len(paths))
    tv.check_output(out, force)
    vectors = evaluate.open_vectors(paths)
    try:
        _check_vectors(vectors)
        task_names = _vector_tasks(vectors, tasks)
        keys = tv.check_compatible(vectors)
        if bundle is None:
            from .datasets.sources import check_available
            from .models import load_clip

            for t in dict.fromkeys(task_names):
                check_available(t, ["train"], data_root)
            model, pretrained = evaluate.recorded_base(vectors)
            if model is None:
                raise TVToolError("the vectors record no base model; a data-aware merge needs it (re-extract them "
                                  "with tvtool, or use the Python API with a loaded bundle)")
            bundle = load_clip(model, pretrained, device=device)
        evaluate.check_base(vectors, bundle)
        ev = evaluate.Evaluator(bundle, list(dict.fromkeys(task_names)), data_root=data_root, splits=("train",),
                                device=device)
        taus = [evaluate.load_deltas([v], ev.device) for v in vectors]
        ctx = StatsContext(ev, task_names, taus, seed=seed, progress=progress)
        try:
            lookup = collect(m, ctx, opts)
        finally:
            ev.reset()
        del taus
        specs = {k: (dtype or (vectors[0].dtype(k) if vectors[0].dtype(k).is_floating_point else torch.float32),
                     tuple(vectors[0].shape(k))) for k in keys}
        entry = tv.history_entry("merge", method=m.name, options=opts, alpha=float(alpha), seed=int(seed),
                                 data={"split": ctx.split, "tasks": task_names, "examples": ctx.used,
                                       "model": bundle.name, "pretrained": bundle.pretrained},
                                 inputs=[v.describe_input() for v in vectors])
        meta = tv.new_meta(vectors[0].meta["base"], tasks=list(dict.fromkeys(task_names)),
                           mode=(vectors[0].meta.get("mode") if len({v.meta.get("mode") for v in vectors}) == 1
                                 else "mixed"), history=[entry])
        by_key = ((k, [v.get(k) for v in vectors]) for k in keys)
        return tv.write_vector(out, merge_stats(m, by_key, lookup, opts, alpha), meta, specs=specs, force=force)
    finally:
        for v in vectors:
            v.close()
