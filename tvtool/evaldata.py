"""What an evaluation feeds its tower: each task's zero-shot head and each (task, split)'s images and labels, built
once on first use and kept on the device (or, for splits over the device's budget, streamed from the cache file
batch by batch: ``tvtool/feed.py``), normalized on the device as batches are read."""
from __future__ import annotations

import hashlib
from typing import Iterator, Mapping, Sequence

import torch

from . import datasets
from .errors import TVToolError
from .feed import Placement, StreamedImages, batches
from .heads import zero_shot_head


class EvalData:
    """Heads and inputs of the evaluated tasks on ``device``.

    Given ``heads[task]`` [C, D] (already scaled) and ``inputs[(task, split)]`` = (uint8 [N,3,S,S], int64 [N]), or
    built from ``bundle`` (a :class:`~tvtool.models.ClipBundle`) and the data layer on demand: ``data_root``,
    ``max_examples`` (only the first N examples of each split), ``data_on_device`` (auto | yes | no)."""

    def __init__(self, device, batch_size: int, mean: Sequence[float], std: Sequence[float], *,
                 heads: Mapping[str, torch.Tensor] | None = None,
                 inputs: Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] | None = None,
                 bundle=None, data_root=None, max_examples: int | None = None):
        if batch_size < 1:
            raise TVToolError(f"batch size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.bundle = bundle
        self.data_root = data_root
        self.max_examples = max_examples
        self.placement: Placement | None = None  # set by the owner when splits are read from the data layer
        self._heads = {t: h.detach().to(self.device, torch.float32) for t, h in (heads or {}).items()}
        self._inputs = {k: (x.to(self.device), y.to(self.device)) for k, (x, y) in (inputs or {}).items()}
        self._identities: dict[tuple[str, str], str] = {}
        # (x/255 - mean)/std as one multiply-add with device constants built once
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t

    def head(self, task: str) -> torch.Tensor:
        if task not in self._heads:
            if self.bundle is None:
                raise TVToolError(f"no head for task {task!r} in this evaluator")
            self._heads[task] = zero_shot_head(self.bundle, datasets.get_dataset(task)).to(self.device, torch.float32)
        return self._heads[task]

    def inputs(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = (task, split)
        if key not in self._inputs:
            if self.bundle is None:
                raise TVToolError(f"no inputs for task {task!r} split {split!r} in this evaluator")
            data = datasets.open_split(task, split, self.data_root, self.bundle.image_size)
            if self.max_examples is not None:
                data = data.head(self.max_examples)  # only these are ever read
            if len(data) == 0:
                raise TVToolError(f"{task}: split {split!r} is empty; check the dataset (`tvtool data check`)")
            held = self.placement.hold(data.nbytes, f"{task}/{split}", len(data))
            x = data.to(self.device) if held else StreamedImages(data, self.device)
            self._inputs[key] = (x, data.labels.to(self.device))
        return self._inputs[key]

    def size(self, task: str, split: str) -> int:
        return self.inputs(task, split)[1].numel()

    def normalized_batches(self, task: str, split: str) -> Iterator[torch.Tensor]:
        """The split's images in evaluation batches on the device (held or streamed), normalized, float32."""
        for x in batches(self.inputs(task, split)[0], self.batch_size):
            yield torch.addcmul(self.shift, x.float(), self.scale)

    def head_identity(self, task: str) -> str:
        """A digest of the task's head (text tower, class names, templates and logit scale all end up in it)."""
        h = self.head(task)
        return hashlib.sha256(h.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]

    def inputs_identity(self, task: str, split: str) -> str:
        """A cheap digest of a split: its shape, all labels and every k-th image (64 of them; the same whether the
        split is held on the device or streamed), remembered per split. Keys the metrics cache, so a regenerated or
        re-decoded split is never answered from it."""
        if (task, split) not in self._identities:
            x, y = self.inputs(task, split)
            rows = torch.arange(0, len(y), max(1, len(y) // 64))
            sample = x.index_select(0, rows.to(x.device)) if isinstance(x, torch.Tensor) else x.data.read(rows)
            h = hashlib.sha256(repr(tuple(x.shape)).encode())
            h.update(y.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
            h.update(sample.to("cpu", torch.uint8).contiguous().numpy().tobytes())
            self._identities[(task, split)] = h.hexdigest()[:16]
        return self._identities[(task, split)]
