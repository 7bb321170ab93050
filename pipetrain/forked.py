"""Work done in a forked child process, where forking is safe: it starts in milliseconds
(a spawned Python takes about 0.3 s to start and import), with everything this process
has, and hands back what the work returns, pickled, through a pipe.

A child has only the thread that forked it: a lock another thread held at that moment
stays held in the child for ever. So :func:`safe` allows a fork only when this process
runs no thread but its own, apart from OpenBLAS's workers (numpy starts them when it is
imported; OpenBLAS stops them around a fork) - never under a training loop's threads,
pytest-xdist's or a follower's. The child only runs the work and leaves with
``os._exit`` (no atexit handler, no flush of this process's buffers twice), and dies
with this process (killed by any signal, ``kill -9`` included).

:class:`Child` never raises from :meth:`~Child.result`: a child that could not be made,
failed, was killed or answered in part gives None, and the caller does the work itself.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import struct
import threading
import warnings
from collections.abc import Callable

_HEADER = struct.Struct("<Q")  # the length of the pickle that follows
_BLAS_THREADS = ("openblas_get_num_threads", "openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                 "scipy_openblas_get_num_threads64_")


def _tasks() -> int | None:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # not Linux: no way to count native threads
        return None


_blas: dict[frozenset, list] = {}  # the OpenBLAS libraries loaded -> their thread-count functions


def _blas_threads() -> int:
    """How many threads OpenBLAS runs (itself included) if it is loaded, else 1."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            paths = frozenset(os.fsdecode(line.split()[-1]) for line in maps.read().splitlines()
                              if b"openblas" in line.lower() and b"/" in line)
    except OSError:
        return 1
    if paths not in _blas:
        _blas[paths] = []
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            found = [getattr(lib, name) for name in _BLAS_THREADS if hasattr(lib, name)]
            _blas[paths] += found[:1]
    return max([1] + [int(get()) for get in _blas[paths]])


def safe() -> bool:
    """Whether this process may fork: no thread runs here but this one and OpenBLAS's."""
    if not hasattr(os, "fork") or threading.active_count() != 1:
        return False
    tasks = _tasks()
    return tasks is not None and (tasks == 1 or tasks <= _blas_threads())


def _die_with(parent: int) -> None:
    """In a child: be killed when the parent dies, however it dies (Linux's
    PR_SET_PDEATHSIG), rather than parse on for nobody."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux: it finishes its work first
        return
    if os.getppid() != parent:  # the parent died before that
        os._exit(1)


class Child:
    """``work()`` run in a forked child; :meth:`result` is what it returned (or None)."""

    def __init__(self, work: Callable[[], object]):
        self.pid: int | None = None
        self.pipe: int | None = None
        try:
            read, write = os.pipe()
        except OSError:
            return
        parent = os.getpid()
        try:
            with warnings.catch_warnings():  # Python 3.12+ warns of any other OS thread: OpenBLAS's are safe() here
                warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks",
                                        category=DeprecationWarning)
                pid = os.fork()
        except OSError:  # no process to be had (limits): the caller does the work
            os.close(read)
            os.close(write)
            return
        if pid == 0:  # the child
            code = 1
            try:
                _die_with(parent)
                os.close(read)
                signal.signal(signal.SIGINT, signal.SIG_DFL)  # the caller's handlers are not the child's
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                data = pickle.dumps(work(), protocol=pickle.HIGHEST_PROTOCOL)
                with open(write, "wb", closefd=True) as out:
                    out.write(_HEADER.pack(len(data)))
                    out.write(data)
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        self.pid, self.pipe = pid, read

    def result(self):
        """What the work returned, or None where the child failed in any way."""
        if self.pid is None:
            return None
        try:
            with open(self.pipe, "rb", closefd=True) as answer:
                self.pipe = None
                data = answer.read()
            pid, self.pid = self.pid, None
            try:
                ok = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
            except ChildProcessError:  # SIGCHLD ignored: reaped by the kernel; the length tells
                ok = True
            if not ok or len(data) < _HEADER.size:
                return None
            (size,) = _HEADER.unpack_from(data)
            if len(data) != _HEADER.size + size:
                return None
            return pickle.loads(memoryview(data)[_HEADER.size:])
        except Exception:  # killed, out of memory, a pickle cut short: the caller does the work
            return None
        finally:
            self.close()

    def close(self) -> None:
        """Stop the child if it still runs, reap it, close the pipe (idempotent)."""
        pid, self.pid = self.pid, None
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # pragma: no cover - reaped by someone else already
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:  # SIGCHLD ignored: the kernel reaped it
                pass
        pipe, self.pipe = self.pipe, None
        if pipe is not None:
            os.close(pipe)
