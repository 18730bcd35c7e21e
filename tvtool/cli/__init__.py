"""Command-line entry point: `tvtool ...`. A thin layer over the Python API in `tvtool`."""
from __future__ import annotations

import contextlib
import sys
import warnings

import typer

from ..errors import TVToolError, TVToolWarning, command_line
from ._app import app

# Each import registers one family of commands on `app`.
from . import vectors  # noqa: E402,F401  extract, add, negate, apply, inspect

for _family in ("merge", "data", "train", "evaluate", "models", "convert"):
    try:
        __import__(f"{__name__}.{_family}")
    except ModuleNotFoundError as exc:  # a family still being written; never hides a missing dependency
        if exc.name != f"{__name__}.{_family}":
            raise


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"tvtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Task-vector toolkit."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status. User mistakes print one line on stderr, never a traceback.

    Usage errors (unknown option or command, missing argument, bad value, bare group) are left to typer's
    standalone mode: whichever click it runs on (click itself, or the copy typer >= 0.29 vendors as
    `typer._click`) prints its usual usage message and exits 2, so no exception class is named here.
    """
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        with command_line(), _warnings_as_lines():  # API messages name --flags; warnings print as one line
            command.main(args=args, prog_name="tvtool", standalone_mode=True)
    except SystemExit as exc:  # standalone mode always ends this way, success included
        if _interrupted(exc):  # typer 0.29 maps Ctrl-C to 130 itself; 0.12 leaves click's "Aborted." and exit 1
            return 130
        code = exc.code
        if code is None or code == 0:
            # A bare group prints its help and exits 2 (click >= 8.2's convention; click 8.1 exited 0).
            return 2 if _is_bare_group(command, args) else 0
        if isinstance(code, int):
            return code
        typer.echo(str(code), err=True)
        return 1
    except TVToolError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 1
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except OSError as exc:  # disk full, permission denied, ...: one line, not a traceback
        typer.echo(f"error: {_torchvision_cause(exc) or exc}", err=True)
        return 1
    except (ImportError, RuntimeError) as exc:
        cause = _torchvision_cause(exc)
        if cause is None:
            raise
        typer.echo(f"error: {cause}", err=True)
        return 1
    return 0


def _torchvision_cause(exc: BaseException) -> str | None:
    """A broken torch/torchvision pair met while importing (open_clip imports torchvision): its one-line message."""
    from ..environment import torchvision_error, torchvision_problem

    tb, seen = exc.__traceback__, False
    while tb is not None:
        seen = seen or "torchvision" in tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    if not seen and "torchvision" not in str(exc):
        return None
    problem = torchvision_problem()
    return None if problem is None else str(torchvision_error(problem))


@contextlib.contextmanager
def _warnings_as_lines():
    """tvtool's own warnings (TVToolWarning) as one `warning: ...` line on stderr, each time; others as usual."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", TVToolWarning)
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, TVToolWarning):
                typer.echo(f"warning: {message}", err=True)
            else:
                original(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def _interrupted(exc: BaseException) -> bool:
    """Whether this exit unwinds a KeyboardInterrupt (click raises Abort from it, then SystemExit)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _is_bare_group(command, args: list[str]) -> bool:
    """`tvtool`, `tvtool data`, `tvtool eval`: a command group named with nothing after it."""
    for word in args:
        command = getattr(command, "commands", {}).get(word)
        if command is None:
            return False
    return hasattr(command, "commands")


def run() -> None:
    sys.exit(main())
