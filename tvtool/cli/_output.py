"""Where a file-writing command puts its result: one rule for finetune, extract, add, negate, merge, apply, convert.

- ``-o FILE``: that file.
- no ``-o``: a default name in the current directory, derived from the inputs and the settings that tell variants
  apart (the ``*_name`` functions below; README "Output files" lists them), said on stderr.
- ``-o -``: the finished file on stdout. It is written to a private temp folder first and copied to stdout only once
  it is complete and checked, so a failure leaves stdout (a redirect target) empty; refused when stdout is a
  terminal (binary never goes to a terminal) and for folder outputs.

Either way an existing file is refused unless ``--force``, and status lines (``wrote ...``) go to stderr, so stdout
carries only results.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence

import typer

from ..errors import TVToolError

STDOUT = "-"
MAX_JOINED = 80  # characters of joined input names before the name says "+N more" instead


def output_option(what: str = "the result", default: str = ""):
    return typer.Option(
        None, "-o", "--output",
        help=f"Where to write {what}; refused if it exists (see --force). Without -o: "
             f"{default or 'a name derived from the inputs'}, in the current directory. '-o -': the finished file on "
             "stdout (never a terminal).")


# ------------------------------------------------------------------------------------------------ default names
def _clean(text: str) -> str:
    """A file-name-safe version of a name taken from a path or a spec (ARCH:TAG, hf-hub:ORG/NAME)."""
    return re.sub(r"[^\w.+=-]+", "_", text).strip("._") or "output"


def stem(path: str | os.PathLike) -> str:
    """The input's name without its extension: a.st -> a, ft/model.safetensors -> model, a folder -> its name."""
    p = Path(str(path).rstrip("/\\"))
    return _clean(p.stem if p.suffix and not p.is_dir() else p.name)


def joined(paths: Sequence) -> str:
    names = [stem(p) for p in paths]
    text = "+".join(names)
    return text if len(text) <= MAX_JOINED else f"{names[0]}+{len(names) - 1}more"


def number(x: float) -> str:
    return f"{x:g}"


def alpha_part(alpha: float, weights: Optional[Sequence[float]] = None) -> str:
    if weights:
        return "-weights" + "_".join(number(w) for w in weights)
    return "" if alpha == 1 else f"-alpha{number(alpha)}"


def finetune_name(cfg) -> str:
    """TASK, then only the settings that differ from their defaults among those that tell variants apart: mode,
    OrthoReg's lambda, form, scope and estimator, seed. ``cars.st``, ``cars-lambda0.0001.st``,
    ``cars-attn-lambda10-plain-seed2.st``. ``cfg`` is a resolved TrainConfig."""
    from ..trainconfig import TrainConfig

    d = TrainConfig(task=cfg.task)
    parts = [cfg.task]
    if cfg.mode != d.mode:
        parts.append(cfg.mode)
    if cfg.lam > 0:
        parts.append(f"lambda{number(cfg.lam)}")
        parts += [getattr(cfg, f) for f in ("orthoreg_form", "orthoreg_scope", "orthoreg_estimator")
                  if getattr(cfg, f) != getattr(d, f)]
    if cfg.seed != d.seed:
        parts.append(f"seed{cfg.seed}")
    return _clean("-".join(parts)) + ".st"


def extract_name(finetuned: str, task: Optional[str]) -> str:
    return f"{_clean(task) if task else stem(finetuned)}.st"


def add_name(vectors, alpha: float, weights=None) -> str:
    return f"{joined(vectors)}{alpha_part(alpha, weights)}.st"


def negate_name(vector, alpha: float) -> str:
    return f"not_{stem(vector)}{alpha_part(alpha)}.st"


def merge_name(method: str, vectors, alpha: float) -> str:
    return f"{_clean(method)}-{joined(vectors)}{alpha_part(alpha)}.st"


def apply_name(vectors, alpha: float, folder: bool) -> str:
    return f"{joined(vectors)}{alpha_part(alpha)}-model" + ("" if folder else ".safetensors")


# ------------------------------------------------------------------------------------------------ the rule
class Target:
    """The resolved output: ``path`` to hand to the API, ``label`` to show the user, ``to_stdout``, and whether the
    name is the ``default`` one."""

    def __init__(self, path: Path, label: str, to_stdout: bool, default: bool = False):
        self.path, self.label, self.to_stdout, self.default = path, label, to_stdout, default


def _stdout_file_name() -> Optional[str]:
    """The file stdout is redirected to (Linux /proc), or None."""
    try:
        if not stat.S_ISREG(os.fstat(1).st_mode):
            return None
        return os.readlink("/proc/self/fd/1")
    except OSError:
        return None


@contextlib.contextmanager
def destination(given: Optional[str], default_name: str, *, directory: bool = False) -> Iterator[Target]:
    """Resolve the output by the rule above. With ``-o -`` the block writes ``target.path`` (in a private temp
    folder) and the finished file is copied to stdout when the block succeeds; the temp folder goes either way."""
    if given != STDOUT:
        yield Target(Path(given or default_name), given or default_name, False, default=given is None)
        return
    if directory:
        raise TVToolError("-o -: this command writes a folder, which cannot go to stdout; give -o FOLDER")
    if sys.stdout.isatty():
        raise TVToolError("-o -: stdout is a terminal, which never receives binary; redirect it (> FILE) or give "
                          "-o FILE")
    folder = Path(tempfile.mkdtemp(prefix="tvtool-stdout-"))
    try:
        target = Target(folder / default_name, "<stdout>", True)
        yield target
        sys.stdout.flush()
        with open(target.path, "rb") as f:
            shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)
        sys.stdout.buffer.flush()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def announce(target: Target) -> None:
    """Before a long run: where its result will go, when the user did not say (on stderr)."""
    if target.default:
        typer.echo(f"writing {target.label} (default name; -o FILE chooses another)", err=True)


def wrote(target: Target, detail: str = "") -> None:
    """After the run, on stderr: what was written, and a hint when stdout was redirected to a file like the output
    while the output went to its default name (`tvtool add a.st b.st > ab.st` leaves ab.st empty)."""
    typer.echo(f"wrote {target.label}" + (f" ({detail})" if detail else ""), err=True)
    if target.default:
        redirected = _stdout_file_name()
        if redirected and target.path.suffix and Path(redirected).suffix == target.path.suffix:
            typer.echo(f"note: stdout goes to {redirected}, but a result goes to its -o (here the default name "
                       f"{target.path}); pass `-o -` to write it to stdout", err=True)
