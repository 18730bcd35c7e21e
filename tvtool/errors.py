"""The one exception type that means "the user asked for something that cannot be done".

The CLI prints its message as a single line on stderr and exits with status 1; anything else is a bug
and keeps its traceback.
"""


class TVToolError(Exception):
    """A user-facing error. The message says what is wrong and how to fix it, in one line."""
