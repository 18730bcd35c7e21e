"""MNIST from torchvision's raw idx files: ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (``.gz`` and
files directly in ``MNIST/`` are accepted too), read with :func:`tvtool.datasets._idx.read_idx`. Labels are the
digits 0-9, the order of ``templates/mnist.yaml``.
"""
from __future__ import annotations

from pathlib import Path

from ._idx import mnist_like_listing
from .base import register_real, torchvision_download

LAYOUT = "ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte; `tvtool data prepare mnist` downloads them via torchvision"

listing = mnist_like_listing("mnist", "MNIST", 10)


def prepare(root: Path, echo) -> None:
    import torchvision

    for train in (True, False):
        torchvision_download("mnist", lambda: torchvision.datasets.MNIST(str(root), train=train, download=True), LAYOUT)
    echo("MNIST: downloaded")


register_real("mnist", listing, epochs=5, layout_help=LAYOUT, prepare=prepare)
