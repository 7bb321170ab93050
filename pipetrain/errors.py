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


def is_bad_input(exc: BaseException | None) -> bool:
    """Bad usage or bad data: an InputError, also when a producer thread met it (a
    corrupt chunk) and it reached the consumer as the cause of a PipelineError."""
    while exc is not None:
        if isinstance(exc, InputError):
            return True
        exc = exc.__cause__ if type(exc).__name__ == "PipelineError" else None
    return False


def one_line(exc: BaseException, with_type: bool = False) -> str:
    """An exception's message on one line; ``with_type`` prefixes the exception's type
    unless it is bad input (whose message says all)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if with_type and not is_bad_input(exc) else text


class Interrupted(KeyboardInterrupt, SystemExit):
    """A run stopped by SIGINT or SIGTERM, its checkpoint written: what ``run.epochs()``
    (and ``train()``) raise. It is a ``KeyboardInterrupt`` (``except KeyboardInterrupt``
    catches it) and, left uncaught, ends a script with exit status 130 and no traceback
    (Python treats it as a ``SystemExit``); the run's closing summary says where it
    stopped."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 130  # what an uncaught SystemExit exits with

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "interrupted"
