"""Other codes' spellings of tvtool's task names: FusionBench's (stanford-cars, oxford_flowers102, ...) and the
task_vectors / TALL-masks code's (Cars, OxfordIIITPet, ..., "CarsVal" for the split fine-tuned on).

A name is matched after lowercasing and dropping "-", "_", " " and a trailing "val" (:func:`key`); spellings that
match a registered name that way need no entry here. ``tvtool.datasets.base.canonical_task`` applies them.
"""
from __future__ import annotations

TASK_ALIASES = {"stanfordcars": "cars", "oxfordflowers102": "flowers102", "oxfordpets": "oxfordiiitpet",
                "sst2": "renderedsst2"}

# Same family name, another dataset: refused rather than silently read as tvtool's task.
NOT_ALIASES = {
    "emnistletters": "FusionBench's emnist_letters is EMNIST's letters split; tvtool's emnist is the digits split "
                     "that TALL masks fine-tuned",
    "emnistmnist": "FusionBench's emnist_mnist is EMNIST's mnist split; tvtool's emnist is the digits split that "
                   "TALL masks fine-tuned",
}


def key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in "-_ ")
