"""A run folder: one writer at a time, a place that can be written, and what a run may
replace there.

A run folder holds ``history.jsonl``, ``checkpoint/`` and, at the end, ``model.keras``.
Separation of concerns:

- :class:`FolderLock` keeps one writer at a time: an exclusive ``flock`` on
  ``.pipetrain.lock`` in the folder, held for as long as the run writes there. The kernel
  drops it when the process ends, however it ends, so ``kill -9`` leaves no stale lock
  (the file may stay behind, unlocked; the next run takes it). The holder writes its
  pid, host and start time into the file for the message a second run gets. Readers
  (``tail``, ``plot``, ``read_history``, ``follow``) never look at it.
- :func:`claim` locks the folder and checks that the history and the checkpoints can be
  written there, before any data is opened or model built.
- :meth:`RunFolder.decide` says what starting here means (a new run, a resume from the
  newest checkpoint, or a restart of a run killed before its first checkpoint) and
  refuses what must not happen: another run's history or checkpoints replaced without
  ``overwrite``, a file that is not pipetrain's replaced at all, a file the run reads
  used as its history.
- :meth:`RunFolder.clear` is ``overwrite``: it removes the old history (with its index,
  ``history.jsonl.index``), checkpoints and ``model.keras``, and nothing else.
- :func:`save_model` writes ``model.keras`` whole or not at all; :func:`model_is_saved`
  says whether a finished run's model is there, whole and saved after its last checkpoint
  (a run killed while saving it is finished again by a resume).

Locks and network file systems: on NFSv4 (and NFSv3 with ``lockd``) the lock holds
between machines; mounted ``nolock``, through FUSE, or on cluster file systems that keep
locks per node, it keeps out a second writer on the same machine only. Where the file
system refuses locks altogether, the run starts with a warning, unprotected.

Example::

    folder = claim(Path("runs/exp1/history.jsonl"), Path("runs/exp1/checkpoint"))
    try:
        kind = folder.decide(resume="auto", overwrite=False)  # "new", "resume" or "restart"
        ...
    finally:
        folder.release()
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import re
import signal
import socket
import stat
import tempfile
import threading
import time
import warnings
import zipfile
from pathlib import Path

import psutil

from pipetrain import index
from pipetrain.errors import RunError, argument
from pipetrain.history import file_kind, run_records
from pipetrain.process import STARTED_SLACK_S, running, writer_state

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system
    fcntl = None

LOCK_NAME = ".pipetrain.lock"
MODEL = "model.keras"  # the model the command line saves at a run's end, beside the history
_MODEL_PART = ".model.saving.keras"  # a model being saved: renamed to MODEL once whole
HISTORY = "a pipetrain history"
HDF5 = "an HDF5 file"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}
# How the history writer begins every run and epoch record (compact JSON, "type" first).
_RUN_LINE = b'{"type":"run"'
_EPOCH_NUMBER = re.compile(rb'\n\{"type":"epoch",[^\n]{0,400}?"epoch":(\d+)')  # (its "epoch" follows "run", "t")


class FolderBusy(RunError):
    """Another process (or another run in this one) is writing the run folder."""


# -- one writer at a time --------------------------------------------------------------------

_held: dict[tuple[int, int], FolderLock] = {}  # folders this process holds, by (device, inode)
_held_lock = threading.Lock()


class FolderLock:
    """An exclusive lock on a run folder (created if needed), held until :meth:`release`
    or the end of the process. Raises :class:`FolderBusy`, naming the holder, when
    another process holds it; ``OSError`` when the folder cannot be created or written.

    A lock taken with ``joinable=True`` (the command line, before it loads the model)
    is joined by the next ``FolderLock`` on the same folder in this process (the run it
    starts): that one's :meth:`release` leaves it held. Any other second lock on a held
    folder, in this process or another, is refused.
    """

    def __init__(self, folder: str | os.PathLike, *, joinable: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.joinable = joinable
        self.joined = False
        self.locked = False  # False only where the file system refuses locks
        self._fd = -1
        self._created: list[Path] = []  # folders made for the lock, outermost first
        self._key: tuple[int, int] | None = None
        self._acquire()

    def _acquire(self) -> None:
        missing: OSError | None = None
        for _ in range(100):  # a retry only when a run that just ended removed its lock file
            self._created += _make_folders(self.folder)
            try:
                info = os.stat(self.folder)
            except FileNotFoundError:
                continue  # removed by a run that just ended, between making it and looking
            key = (info.st_dev, info.st_ino)
            with _held_lock:
                mine = _held.get(key)
                if mine is not None and mine.joinable and mine._fd >= 0:
                    self._key, self.joined, self.locked = key, True, mine.locked
                    return
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            except FileNotFoundError as e:
                # The folder was removed between making it and opening the file (by a run
                # ending at the same moment), or it takes no new file at all (/proc).
                missing = e
                continue
            try:
                self.locked = _flock(fd, self.folder)
            except FolderBusy:
                os.close(fd)
                self._remove_created()
                raise
            except BaseException:
                os.close(fd)
                raise
            if not _same_file(fd, self.path):  # unlinked by the run that held it: lock anew
                os.close(fd)
                continue
            self._fd, self._key = fd, key
            try:
                _write_holder(fd)
            except BaseException:
                self.release()
                raise
            with _held_lock:
                _held[key] = self
            return
        if missing is not None:
            raise missing
        raise OSError(errno.EAGAIN, "the lock file keeps being replaced", str(self.path))

    @property
    def held(self) -> bool:
        return self.joined or self._fd >= 0

    def release(self) -> None:
        """Let go of the folder: the lock file is removed while still locked (a run that
        opened it meanwhile sees it gone and locks the new one), and the folders made for
        it are removed again if nothing else was written there."""
        if self.joined:
            self.joined = False
            return
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        with _held_lock:
            if _held.get(self._key) is self:
                del _held[self._key]
        try:
            if _same_file(fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass  # a read-only folder now, or gone: the kernel drops the lock all the same
        finally:
            os.close(fd)
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            try:
                os.rmdir(folder)
            except OSError:
                break  # not empty: the run wrote there
        self._created = []

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a fallback: runs and the command line release explicitly
        if getattr(self, "_fd", -1) >= 0:
            self.release()


def _make_folders(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; those this call made, outermost first. A
    parent that a run ending at the same moment removes meanwhile is made again."""
    made: list[Path] = []
    for attempt in range(100):
        missing = []
        probe = folder
        while not os.path.lexists(probe) and probe != probe.parent:
            missing.append(probe)
            probe = probe.parent
        try:
            for path in reversed(missing):
                try:
                    os.mkdir(path)
                except FileExistsError:
                    continue  # made by a run starting at the same moment
                made.append(path)
            return made
        except FileNotFoundError:
            if attempt == 99:  # a folder that takes no new folder (/proc)
                raise
        except OSError:  # (a name too long, say): the parents made for it are not left behind
            for path in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            raise
    return made


def _flock(fd: int, folder: Path) -> bool:
    """Lock ``fd`` without waiting; False where the file system has no locks."""
    try:
        if fcntl is None:
            raise OSError(errno.ENOSYS, "no flock on this system")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise FolderBusy(f"{folder}: another run is writing this folder ({_holder(fd)}); wait for it to end, "
                         "or choose another folder") from None
    except OSError as e:
        if e.errno not in _NO_LOCKS:
            raise
        warnings.warn(f"{folder}: this file system refuses file locks ({e.strerror}): nothing keeps a second "
                      "run from writing this folder at the same time", RuntimeWarning, stacklevel=4)
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def writer(run: dict, history: Path) -> str:
    """:func:`~pipetrain.process.writer_state` of the process of ``run`` (a run record of
    ``history``); "alive" as well when that one is gone but a live process holds the
    run's folder (a resume starting)."""
    state = writer_state(run.get("process"))
    return "alive" if state == "gone" and held(history) else state


def held(history: Path) -> bool:
    """Whether a live process of this host holds the folder of ``history`` (a run writing
    it, or a resume starting there before its first record), as the lock file says; read
    without taking the lock, which a reader never does."""
    try:
        info = json.loads((Path(history).parent / LOCK_NAME).read_bytes())
        pid = int(info["pid"])
        return info.get("host") == socket.gethostname() and running(pid) and not _started_after(pid, info.get("since"))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False


def _started_after(pid: int, since) -> bool:
    """Whether process ``pid`` started after ``since`` (the holder's note, to the second):
    the note of a killed run whose pid a later process has taken (pids are reused, soon in
    a container). False when it cannot be told."""
    try:
        noted = _dt.datetime.fromisoformat(since).timestamp()
        started = psutil.Process(pid).create_time()
    except Exception:
        return False
    return started > noted + 1 + STARTED_SLACK_S  # (the note is cut to the second; start times known to a tick)


def _write_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    data = (json.dumps(info) + "\n").encode()
    os.ftruncate(fd, 0)
    if os.pwrite(fd, data, 0) != len(data):
        raise OSError(errno.ENOSPC, "short write of the lock file")


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says. The holder writes it just after locking, so
    the file may still be empty, or hold the note of a killed predecessor for a moment:
    it is read until it says the same twice, 20 ms apart (a local holder must be alive)."""
    host = socket.gethostname()
    info, seen = None, None
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            text = os.pread(fd, 4096, 0)
            info = json.loads(text)
            valid = info.get("host") != host or running(int(info["pid"]))
        except (ValueError, TypeError, KeyError, AttributeError, OSError):
            info, text, valid = None, None, False
        if valid and text == seen:
            break
        seen = text
        time.sleep(0.02)
    if not isinstance(info, dict):
        return "its holder has not said who it is yet"
    who = "this process" if info.get("pid") == os.getpid() and info.get("host") == host else f"pid {info.get('pid')}"
    return f"{who} on {info.get('host')}, since {info.get('since')}"


# -- a run folder ----------------------------------------------------------------------------


def history_path(given: str | os.PathLike) -> Path:
    """``given`` (``history=``, ``--history``) as the history file's path. One ending in a
    slash names a folder and is refused: ``Path()`` drops the slash, so the run would
    write a file of the folder's name and keep its checkpoints beside it."""
    text = os.fspath(given)
    if isinstance(text, str) and text.endswith(("/", os.sep)):
        raise RunError(f"{argument(f'history={given!r}', f'--history {given}')}: names a folder; give the "
                       f"history file (say {Path(text) / 'history.jsonl'})")
    return Path(text)


def claim(history: str | os.PathLike, checkpoint_dir: str | os.PathLike | None = None, *,
          joinable: bool = False) -> RunFolder:
    """Lock the run folder of ``history`` and check that the history and the checkpoint
    folder can be written: bad input (a ``RunError`` naming the path and the reason)
    before any data is opened or model built."""
    history = Path(history)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else history.parent / "checkpoint"
    _check_history_path(history)
    with signals_held() as release_signals:
        try:
            # (a history given through a link is written where it is: its folder's lock, not the link's)
            lock = FolderLock(history.resolve().parent if history.is_symlink() else history.parent, joinable=joinable)
        except OSError as e:
            raise RunError(f"{history}: cannot write the history here ({_why(e, history.parent)})") from None
        folder = RunFolder(history, checkpoint_dir, lock)
        try:
            folder.check_writable()
            release_signals()  # a Ctrl-C or SIGTERM held meanwhile is raised here, and the lock let go
        except BaseException:
            lock.release()
            raise
    return folder


_HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT and SIGTERM back (when called in the main thread) while a lock file is made and
    its owner recorded: a handler raising in between would leave the file behind. The
    context gives a function that lets them through early, where an exception they
    raise can still be cleaned up after; the context's end does it otherwise. (Python
    runs handlers in the main thread whichever thread the kernel picked, so they are
    swapped for one that notes the signal; a mask would hold back one thread only.)"""
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, _HELD):
        yield lambda: None  # (None: a handler set outside Python, which could not be put back)
        return
    came: dict[int, None] = {}  # the signals noted, in order, each once
    before = {s: signal.signal(s, lambda signum, frame: came.setdefault(signum)) for s in _HELD}

    def let_through() -> None:
        while before:
            number, handler = before.popitem()
            signal.signal(number, handler)
        while came:  # each taken off before its handler runs: one that raises is not run again
            number = next(iter(came))
            del came[number]
            signal.raise_signal(number)

    try:
        yield let_through
    finally:
        let_through()


def _check_history_path(history: Path) -> None:
    try:
        folder = history.is_dir()  # (raises for a name too long: is_dir() passes only a few errors)
    except OSError as e:
        raise RunError(f"{history}: cannot write the history ({_why(e, history)})") from None
    if folder:
        raise RunError(f"{history}: is a folder; give the history file (say {history / 'history.jsonl'})")
    try:
        mode = history.stat().st_mode
    except OSError:
        return  # not there yet (or under something that is not a folder: the lock says which)
    if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):  # a device such as /dev/null takes the lines
        raise RunError(f"{history}: is {file_kind(mode)}, not a history file")
    folder = history.parent.resolve()
    if stat.S_ISCHR(mode) and (folder == Path("/dev") or Path("/dev") in folder.parents):
        # (the run's lock, checkpoints and model went into /dev)
        raise RunError(f"{history}: a device in {folder}, which would be the run folder (its checkpoints and "
                       f"model); link it from a run folder instead (ln -s {history} runs/NAME/history.jsonl)")


def _why(e: OSError, path: Path) -> str:
    """An OSError as a reason a person can act on."""
    if e.errno == errno.ENOTDIR:
        probe = path
        while probe != probe.parent and not probe.exists():
            probe = probe.parent
        for candidate in [probe, *probe.parents]:
            if candidate.exists() and not candidate.is_dir():
                return f"{candidate} is a file, not a folder"
    where = e.filename or path
    if Path(where).name == LOCK_NAME and e.errno in (errno.ELOOP, errno.EISDIR):
        what = "a symbolic link" if e.errno == errno.ELOOP else "a folder"
        return f"{where} is {what}, where a run keeps its lock file: remove it"
    if Path(where).name == LOCK_NAME:  # the first file the run makes there
        return f"{Path(where).parent} takes no new file: {e.strerror or e}"
    return f"{where}: {e.strerror or e}"


class RunFolder:
    """A locked run folder: what a run may do there. Made by :func:`claim`."""

    def __init__(self, history: Path, checkpoint_dir: Path, lock: FolderLock):
        self.history, self.checkpoint_dir, self.lock = history, checkpoint_dir, lock
        self.folder = history.parent

    def release(self) -> None:
        self.lock.release()

    def check_writable(self) -> None:
        """The history (when it exists) opens for appending; the checkpoint folder, when
        it exists, takes a new file. (The lock file was just created beside them.)"""
        try:
            exists = self.history.exists()  # (raises for a name too long: exists() passes only a few errors)
            if exists:
                os.close(os.open(self.history, os.O_WRONLY | os.O_APPEND))
        except OSError as e:
            raise RunError(f"{self.history}: cannot write the history ({_why(e, self.history)})") from None
        folder = self.checkpoint_dir
        if os.path.lexists(folder) and not folder.is_dir():
            raise RunError(f"{folder}: is a file, where the run keeps its checkpoints; move it away")
        if folder.is_dir():
            try:
                fd, probe = tempfile.mkstemp(prefix=".probe-", dir=folder)
                os.close(fd)
                os.unlink(probe)
            except OSError as e:
                raise RunError(f"{folder}: cannot write checkpoints ({_why(e, folder)})") from None

    def decide(self, *, resume: bool | str, overwrite: bool, reads=()) -> str:
        """What starting here means: ``"new"``, ``"resume"`` (from the newest checkpoint)
        or ``"restart"`` (a resume of a run killed before its first checkpoint, which
        lands after its first epoch's record at the latest: it starts again from the
        first batch, and its earlier records are superseded). ``reads`` are the data
        files of the run. Nothing is changed."""
        from pipetrain.checkpoint import latest

        history, folder = self.history, self.checkpoint_dir
        for path in reads:
            if history.exists() and _same(history, Path(path)):
                raise RunError(f"{history}: is the data file {path} of this run; give the history another path")
        kind = describe(history)
        if kind not in (None, HISTORY):
            if resume:
                raise RunError(f"{history}: is {kind}, not a pipetrain history: nothing to resume "
                               "(and nothing was written to it)")
            replace = " (overwrite replaces only a pipetrain history)" if overwrite else ""
            raise RunError(f"{history}: is {kind}, not a pipetrain history{replace}; give the history another path")
        found = latest(folder)
        if resume:
            if found is not None:
                return "resume"
            if kind == HISTORY:
                # The first checkpoint is written after the first epoch's record (never
                # ahead of it): a kill between the two leaves epoch 0 ended and no
                # checkpoint, which starts again. A later epoch ended had one.
                if has_epochs(history, first=1):
                    raise RunError(
                        f"{folder}: no checkpoint to resume from, yet {history} records finished epochs "
                        f"(were the checkpoints removed?); start afresh with "
                        f"{argument('overwrite=True (and resume=False)', '--overwrite instead of --resume')}")
                return "restart"
            if resume == "auto":
                return "new"
            raise RunError(f"{folder}: no checkpoint to resume from")
        if overwrite:
            for path in checkpoints(folder):
                if not is_checkpoint(path):
                    raise RunError(f"{path}: is not a pipetrain checkpoint; overwrite replaces only "
                                   "pipetrain's own files: move it away")
            owner = _other_owner(found, history) if found is not None else None
            if owner is not None:
                raise RunError(f"{folder}: holds the checkpoints of the run of {owner}, not of {history}; "
                               f"{argument('overwrite=True', '--overwrite')} replaces only the run of the history "
                               "given: choose another folder")
            return "new"
        if kind == HISTORY:
            raise RunError(f"{history}: a history exists already; pass "
                           f"{argument('resume=True', f'--resume {self.folder}')} to continue that run or "
                           f"{argument('overwrite=True', '--overwrite')} to replace it")
        if found is not None:
            raise RunError(f"{folder}: holds the checkpoints of another run; pass "
                           f"{argument('resume=True', '--resume')} to continue it, "
                           f"{argument('overwrite=True', '--overwrite')} to replace it, or choose another folder")
        return "new"

    def clear(self) -> None:
        """``overwrite``, after :meth:`decide`: remove the old history (and its index),
        checkpoints, and the model the old run saved beside its history (a new run killed
        early must not leave it beside its own history)."""
        if describe(self.history) == HISTORY:
            self.history.unlink()
            index.remove(self.history)
            for name in (MODEL, _MODEL_PART):
                (self.folder / name).unlink(missing_ok=True)
        for path in checkpoints(self.checkpoint_dir):
            path.unlink()

    def remove_stale(self) -> None:
        """Temporary files of a checkpoint that a killed run never finished (never a
        complete checkpoint: the rename is the commit point)."""
        if self.checkpoint_dir.is_dir():
            for path in self.checkpoint_dir.glob(".ckpt-*.tmp"):
                path.unlink(missing_ok=True)


def save_model(model, path: Path) -> None:
    """``model.save(path)``, whole or not at all: saved beside it, synced, then renamed
    over it, so that a run killed while saving leaves the earlier file or none."""
    from pipetrain.checkpoint import fsync_folder

    part = path.with_name(_MODEL_PART)
    try:
        with tensorflow_left_unimported():
            model.save(part)
        fd = os.open(part, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


@contextlib.contextmanager
def tensorflow_left_unimported():
    """Within: Keras on JAX or PyTorch counts TensorFlow as missing if nothing has imported it.

    Keras imports TensorFlow wherever it is installed, on every backend: to seed it
    (``keras.utils.set_random_seed``) and to ask whether each object ``model.save``
    writes is a TensorFlow one. That import takes 3-4 s, a third of a short run's time,
    paid by every process of a distributed run, and no TensorFlow object exists before
    it. (Only within: Keras' preprocessing layers, made of TensorFlow, import it.)"""
    import sys

    import keras

    try:
        from keras.src.utils.module_utils import tensorflow as lazy
    except ImportError:  # another Keras: it imports TensorFlow as it does
        lazy = None
    skip = (getattr(lazy, "_available", False) is None and "tensorflow" not in sys.modules
            and keras.backend.backend() != "tensorflow")
    if skip:
        lazy._available = False
    try:
        yield
    finally:
        if skip:
            lazy._available = None  # asked again next time


def model_is_saved(path: Path, checkpoint: Path | None) -> bool:
    """Whether a finished run's model is at ``path``: a whole ``.keras`` archive, saved no
    earlier than the run's last ``checkpoint`` (an older one is an earlier segment's, left
    by a run killed before it saved its own)."""
    try:
        with zipfile.ZipFile(path):
            pass
        return checkpoint is None or os.stat(path).st_mtime_ns >= os.stat(checkpoint).st_mtime_ns
    except (OSError, zipfile.BadZipFile):
        return False


def _other_owner(checkpoint: Path, history: Path) -> Path | None:
    """Another history beside ``history`` whose run wrote ``checkpoint`` (its last run
    record's), or None."""
    from pipetrain.checkpoint import load_meta

    try:
        run_id = load_meta(checkpoint).get("run_id")
    except (OSError, ValueError, KeyError):
        return None
    for other in sorted(history.parent.glob("*.jsonl")):
        if other.name != history.name and describe(other) == HISTORY:
            runs = run_records(other)
            if runs and runs[-1].get("run") == run_id:
                return other
    return None


def check_resume(history: Path, run_id: str) -> None:
    """Refuse to resume the checkpoint of run ``run_id`` into another run's history."""
    runs = run_records(history) if describe(history) == HISTORY else []
    if runs and runs[-1].get("run") != run_id:
        raise RunError(f"{history} belongs to run {runs[-1].get('run')}, but its checkpoint to run {run_id}")


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("ckpt-*.npz")) if folder.is_dir() else []


def is_checkpoint(path: Path) -> bool:
    """A file pipetrain wrote as a checkpoint (an .npz archive with its document)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return "__meta__.npy" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def describe(path: Path) -> str | None:
    """None for no file, an empty one or a device (nothing there to keep), :data:`HISTORY`
    for a pipetrain history, or what the file is, for a message ("an HDF5 file"); reads
    its first bytes only."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        return f"a file that cannot be read ({e.strerror})"
    if not head:
        return None
    if head.startswith(_RUN_LINE):
        return HISTORY
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return HDF5
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a .keras model or a checkpoint?)"
    if head.startswith(b"\x93NUMPY"):
        return "a numpy array file"
    first = head.split(b"\n", 1)[0]
    try:
        record = json.loads(first)
    except ValueError:
        record = None
    if isinstance(record, dict) and record.get("type") == "run":
        return HISTORY
    if len(first) == len(head) == 1 << 16 and run_records(path):  # a first line longer than the head
        return HISTORY
    return "a file with no run record at its start"


def has_epochs(history: Path, block: int = 1 << 20, first: int = 0) -> bool:
    """Whether a history records an ended epoch, of index ``first`` or more (scanned in
    blocks, not parsed)."""
    tail = b"\n"
    with open(history, "rb") as f:
        while data := f.read(block):
            data = tail + data
            if any(int(m.group(1)) >= first for m in _EPOCH_NUMBER.finditer(data)):
                return True  # (a number cut at the block's end reads smaller: found whole in the next)
            tail = data[-512:]
    return False
