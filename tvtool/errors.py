"""The one exception type that means "the user asked for something that cannot be done", its warning twin, and how
messages name an option in the interface the user is using.

The CLI prints an error's message as a single line on stderr and exits with status 1; anything else is a bug and
keeps its traceback. A :class:`TVToolWarning` is printed by the CLI as one ``warning: ...`` line; Python callers see
an ordinary ``warnings`` warning.
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings


class TVToolError(Exception):
    """A user-facing error. The message says what is wrong and how to fix it, in one line."""


def brief(value, limit: int = 60) -> str:
    """A short repr of a value read from an untrusted file, for an error message: bounded work and length.

    ``str(value)[:60]`` would build the whole text first, and a 918-byte pickle can hold a list whose text is
    gigabytes ("billion laughs": lists of references to lists); ``reprlib`` stops after a few items and levels,
    and an int too long to print (over Python's 4300 digits) is named by its size."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlong = 2, limit, limit, limit
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = r.maxarray = 4
    try:
        text = r.repr(value)
    except Exception:  # an int beyond the digit limit, a stub whose repr fails, ...
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TVToolWarning(UserWarning):
    """Something the user should know (the run may be useless), though it is not an error."""


def warn(message: str) -> None:
    warnings.warn(message, TVToolWarning, stacklevel=3)


# Messages written by the API name options the way the user gave them: `--force` on the command line, `force=True`
# in Python. The CLI sets this while a command runs.
_ON_COMMAND_LINE = contextvars.ContextVar("tvtool_on_command_line", default=False)


@contextlib.contextmanager
def command_line(on: bool = True):
    """While active, :func:`spell` names options by their command-line flags."""
    token = _ON_COMMAND_LINE.set(on)
    try:
        yield
    finally:
        _ON_COMMAND_LINE.reset(token)


def spell(flag: str, parameter: str) -> str:
    """``flag`` (e.g. ``--force``) under the CLI, else the Python ``parameter`` (e.g. ``force=True``)."""
    return flag if _ON_COMMAND_LINE.get() else parameter
