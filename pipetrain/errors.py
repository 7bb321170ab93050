"""The one exception type that means *bad input*.

A file, dataset, setting or flag that cannot be used is reported as an
:class:`InputError` whose message is one line naming the file, dataset or flag and what
is wrong; the command line turns it into exit code 2, with no traceback. Each part of
pipetrain raises its own subclass (``SourceError``, ``RunError``, ``ModelError``, ...).
"""


class InputError(ValueError):
    """Bad usage or bad input, said in one line."""


class RunError(InputError):
    """A run that cannot start as asked (an existing history, bad settings, no checkpoint)."""
