"""The one exception type that means "the user asked for something that cannot be done".

The CLI prints its message as a single line on stderr and exits with status 1; anything else is a bug
and keeps its traceback.
"""


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
