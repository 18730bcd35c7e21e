"""Fine-tuning logs for TensorBoard (`tvtool finetune --log-dir DIR`), beside the JSON lines of ``--log``.

A progress sink like the CLI's bars: ``finetune(cfg, out, progress=TensorBoardLog(dir, run))`` writes, per logged
step, ``train/task_loss``, ``train/penalty``, ``train/lr`` and ``train/images_per_s`` (the JSON line's fields), and
:meth:`finish` the run's accuracies (``accuracy/val_acc``, ``accuracy/zeroshot_test_acc``, ...) and its settings as
text. Needs the ``tensorboard`` package (``pip install 'tvtool[tensorboard]'``); :func:`check_available` says so in
one line, before any work.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from .errors import TVToolError, spell

SCALARS = ("task_loss", "penalty", "lr", "images_per_s")


def check_available() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise TVToolError(f"{spell('--log-dir', 'TensorBoardLog')} needs the tensorboard package: "
                          "pip install 'tvtool[tensorboard]' (or pip install tensorboard)")


def run_folder(log_dir: str | os.PathLike, run: str) -> Path:
    """Each run in its own sub-folder of the log dir (named like its vector), so TensorBoard shows runs side by
    side."""
    return Path(log_dir).expanduser() / run


class TensorBoardLog:
    def __init__(self, log_dir: str | os.PathLike, run: str):
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        self.folder = run_folder(log_dir, run)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.folder))

    def __call__(self, record: dict) -> None:
        for name in SCALARS:
            if name in record:
                self.writer.add_scalar(f"train/{name}", float(record[name]), int(record["step"]))

    def finish(self, metrics: dict, settings: dict | None = None, step: int = 0) -> None:
        for name, value in sorted((metrics or {}).items()):
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"accuracy/{name}", float(value), step)
        if settings:
            self.writer.add_text("settings", "```\n" + json.dumps(settings, indent=1, default=str) + "\n```", step)
        self.close()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
