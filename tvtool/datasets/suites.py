"""The named task suites of the merging literature: ``ta8``, ``ta14``, ``ta20`` (also spelled ``TA8``, ``TALL14``,
``TALL20`` as FusionBench does).

Order and membership: FusionBench's ``config/dataset/image_classification/test/TALL20.yaml`` (tanganke/fusion_bench;
the 8 tasks of Ilharco et al., then the 6 added by Wang et al. 2024 'Localizing Task Information for Improved Model
Merging and Compression' (TALL masks) for 14, then 6 more for 20); each suite is a prefix of the next. EMNIST is the
``digits`` split that TALL masks (and so TSV-M and Iso-C) fine-tuned; FusionBench's copy uses ``emnist_letters``.
"""
from __future__ import annotations

from typing import Iterable

from ..errors import TVToolError

_TA20 = (
    "sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd",
    "flowers102", "pcam", "fer2013", "oxfordiiitpet", "stl10", "cifar100",
    "cifar10", "food101", "fashionmnist", "emnist", "kmnist", "renderedsst2",
)
SUITES: dict[str, tuple[str, ...]] = {"ta8": _TA20[:8], "ta14": _TA20[:14], "ta20": _TA20}
# FusionBench's names of the same suites (TALL-masks' DATASETS_14 / DATASETS_20 hold the same tasks in another order)
SUITE_ALIASES = {"tall14": "ta14", "tall20": "ta20"}


def resolve_tasks(names_or_suite: str | Iterable[str]) -> list[str]:
    """Task names with suites expanded: ``"ta14"``, ``"ta8,imagenet"``, ``"TALL20"`` or ``["ta8", "cifar10"]``.

    Every name must be a registered dataset (in any spelling ``base.canonical_task`` knows); duplicates (e.g. a task
    also inside a suite) are kept once, first occurrence wins.
    """
    from .base import canonical_task, get_dataset

    items = [names_or_suite] if isinstance(names_or_suite, str) else list(names_or_suite)
    tasks: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TVToolError(f"task names must be strings, got {item!r}")
        for name in (part.strip() for part in item.split(",")):
            if not name:
                continue
            suite = SUITE_ALIASES.get(name.lower(), name.lower())
            expanded = SUITES.get(suite, (name,))
            for task in expanded:
                try:
                    task = canonical_task(task)
                    get_dataset(task)
                except TVToolError as exc:
                    raise TVToolError(f"{exc}; or a suite: {', '.join([*SUITES, 'TALL14', 'TALL20'])}") from None
                if task not in tasks:
                    tasks.append(task)
    if not tasks:
        raise TVToolError(f"no tasks given; pass task names or a suite ({', '.join(SUITES)})")
    return tasks
