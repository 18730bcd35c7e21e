"""Datasets: the registry, protocol splits and the uint8 image cache.

Layers, each importing only those below it: ``base`` (registry, types, protocol splits, helpers of the dataset
modules) and ``files`` (the image opener) -> ``hf`` (Hugging Face snapshots) -> ``sources`` (folder layout or
snapshot, which rows form each split) -> ``cachefile`` (the cache file format) -> ``cache`` (decoding, keys) ->
``splits`` (``open_split`` / ``load_split``). Adding a dataset is one small module that calls
``register(DatasetSpec(...))`` and is imported below.
"""
from .base import (  # noqa: F401
    SPLITS,
    DatasetSpec,
    Listing,
    get_dataset,
    list_datasets,
    protocol_val_split,
    register,
    resolve_data_root,
)
import importlib as _importlib

_SPLITS_API = ("open_split", "load_split", "check_available", "ImageSplit")


def __getattr__(name):
    # The loading layer imports torch: only on first use, so listing the registry starts instantly.
    if name in _SPLITS_API:
        from . import splits

        return getattr(splits, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


from . import cars, dtd, eurosat, gtsrb, imagenet, mnist, resisc45, sun397, svhn  # noqa: F401,E402  register
from . import (  # noqa: F401,E402  register the 14- and 20-task additions
    cifar10, cifar100, emnist, fashionmnist, fer2013, flowers102, food101, kmnist, oxfordiiitpet, pcam, renderedsst2,
    stl10,
)
from .suites import SUITES, resolve_tasks  # noqa: F401,E402

try:
    _importlib.import_module(f"{__name__}.mini")  # the offline mini-world tasks (written separately)
except ModuleNotFoundError as exc:  # only a missing mini module is tolerated, never a missing dependency
    if exc.name != f"{__name__}.mini":
        raise
