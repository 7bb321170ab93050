"""The one exception type that means *bad input*.

A file, dataset, setting or flag that cannot be used is reported as an
:class:`InputError` whose message is one line naming the file, dataset or flag and what
is wrong; the command line turns it into exit code 2, with no traceback. Each part of
pipetrain raises its own subclass (``SourceError``, ``RunError``, ``ModelError``, ...).

A message that tells the user what to pass names it as the caller spells it: the Python
argument (``resume=True``) for a Python caller, the flag (``--resume``) when the command
line runs (:func:`argument`).
"""

import contextlib
import contextvars
import re

_COMMAND_LINE = contextvars.ContextVar("pipetrain_command_line", default=False)


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


def _without_graph_trace(text: str) -> str:
    """TensorFlow's op errors ("Graph execution error: Detected at node ... defined at
    (most recent call last): File ...") carry a stack of the graph's frames before the
    one line that says what failed: keep that line (and cut a long list of values)."""
    if "Detected at node" not in text:
        return text
    noise = ("File ", "Detected at node", "[[{{node", "Graph execution error")
    kept = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(noise)]
    said = " ".join(kept) or text
    return re.sub(r"((?:values|Label values):(?:\s+\S+){8})(?:\s+\S+)+", r"\1 …", said)


def one_line(exc: BaseException, with_type: bool = False) -> str:
    """An exception's message on one line; ``with_type`` prefixes the exception's type
    unless it is bad input (whose message says all)."""
    text = " ".join(_without_graph_trace(str(exc)).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if with_type and not is_bad_input(exc) else text


def located(where: str, exc: BaseException, path: str) -> str:
    """``where: message`` for an error out of reading the file ``path``, which names the
    file once: a lower layer's message that names it already keeps its own place (the
    dataset and rows of a chunk, or the bytes of a request) after the file's name, and
    the place more precise than ``where`` wins."""
    text, prefix = one_line(exc), f"{path}: "
    while text.startswith(prefix):
        text = text[len(prefix):]
    return prefix + text if text.startswith("dataset '") else f"{where}: {text}"


class Interrupted(KeyboardInterrupt, SystemExit):
    """A run stopped by SIGINT or SIGTERM, its checkpoint written (a run with a history
    keeps them): what ``run.epochs()`` (and ``train()``) raise. It is a
    ``KeyboardInterrupt`` (``except KeyboardInterrupt`` catches it) and, left uncaught,
    ends a script with exit status 130 and no traceback (Python treats it as a
    ``SystemExit``); the run's closing summary says where it stopped."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 130  # what an uncaught SystemExit exits with

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "interrupted"


@contextlib.contextmanager
def command_line():
    """Within this block, :func:`argument` spells arguments as command-line flags."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def argument(python: str, flag: str) -> str:
    """How the caller says it: ``python`` (``"overwrite=True"``) from Python, ``flag``
    (``"--overwrite"``) inside :func:`command_line`."""
    return flag if _COMMAND_LINE.get() else python
