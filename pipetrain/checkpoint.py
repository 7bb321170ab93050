"""A run's state on disk, written atomically, so that a run killed at any instant resumes
at the exact next batch.

A checkpoint is one file, ``checkpoint/ckpt-<step>.npz``: every array (each model's
variables, seed-generator states included; each optimizer's variables; the epoch's
metric sums; callback arrays such as ``EarlyStopping.best_weights``) and one JSON
document (position, settings, counters, callback and RNG state). It is written to a
temporary file, flushed to disk, and renamed into place: the rename is the commit
point, so the newest ``ckpt-*.npz`` is always complete. Older ones are then removed.
A run's own checkpoints are written by a :class:`Writer`, in a background thread, while
training goes on.

Keras' own ``BackupAndRestore`` saves the batch index but restarts the epoch from batch
0; here the position, the batch order (a pure function of seed and epoch) and the
epoch's partial metrics are all saved, so no batch is trained twice.
"""

from __future__ import annotations

import collections
import csv
import functools
import io
import json
import os
import random
import struct
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipetrain.errors import RunError
from pipetrain.history import run_records
from pipetrain.runfolder import checkpoints

KEEP = 2  # checkpoints kept: the newest, and one before it


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read, or applied to these models."""


def check_backend(path: Path, meta: dict, history: Path | None = None) -> None:
    """Refuse a checkpoint written under another Keras backend. Its arrays would load
    bit for bit (weights, optimizer slots, seed-generator states), but a backend draws
    other random numbers from the same seed state (Dropout's masks) and computes in its
    own order, so the run would not go on as it would have: no resume is exact there.
    A checkpoint that predates the ``backend`` field is judged by its history's run record."""
    import keras

    ours, theirs = keras.backend.backend(), meta.get("backend")
    if theirs is None and history is not None and history.is_file():
        runs = run_records(history)
        theirs = (runs[-1].get("host") or {}).get("backend") if runs else None
    if theirs is not None and theirs != ours:
        raise RunError(f"cannot resume {path}: it was written under Keras' {theirs} backend and this is {ours}, "
                       f"where it would not continue exactly (other random draws and arithmetic); "
                       f"resume it with KERAS_BACKEND={theirs}")


def latest(folder: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``folder``, or None."""
    found = checkpoints(Path(folder))
    return found[-1] if found else None


def save(folder: str | os.PathLike, step: int, meta: dict, arrays: dict[str, np.ndarray]) -> Path:
    """Write one checkpoint atomically (temporary file, fsync, rename); return its path."""
    document, arrays = _document(meta), dict(arrays)
    return _write(Path(folder), step, lambda file: pack_into(file, document, arrays))


def path_of(folder: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` goes (the names sort in step order)."""
    return folder / f"ckpt-{step:012d}.npz"


def pack(meta: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """A checkpoint file's bytes in memory (the archive of :func:`pack_into`); takes the
    arrays out of ``arrays``.

    Up to 2 GiB and 65,535 members it is written here rather than by ``zipfile``, whose
    Python costs about 15 us a member: a small model's checkpoint is packed by the
    training loop's thread at each epoch's end (the digits' 18 arrays, warm: 0.30 ms
    through ``zipfile``, 0.07 here). Member by member the archive is ``zipfile``'s:
    stored, each an ``.npy`` whose header numpy wrote, made on Unix, mode 0600; sizes,
    offsets and the count fit the 32- and 16-bit fields, so no ZIP64 records."""
    document = _document(meta)
    if (len(arrays) + 2 > _ZIP32_MEMBERS  # (with __meta__ and __dtypes__)
            or len(document) + sum(np.asarray(a).nbytes for a in arrays.values()) > _ZIP32_BYTES):
        packed = io.BytesIO()
        pack_into(packed, document, arrays)
        return packed.getvalue()
    parts: list = []
    directory: list[bytes] = []
    offset = 0
    for name, array in _members(document, arrays):
        array = array if array.flags.c_contiguous else array.copy(order="C")
        header, data = _npy_header(array.dtype, array.shape), array.reshape(-1).view(np.uint8)
        crc, size = zlib.crc32(data, zlib.crc32(header)), len(header) + data.nbytes
        path = f"{name}.npy".encode()
        flags = 0 if path.isascii() else _UTF8_NAME
        parts += (_LOCAL.pack(_LOCAL_SIGNATURE, 20, flags, 0, 0, _DOS_DATE, crc, size, size, len(path), 0),
                  path, header, data)
        directory.append(_CENTRAL.pack(_CENTRAL_SIGNATURE, _MADE_ON_UNIX, 20, flags, 0, 0, _DOS_DATE, crc, size,
                                       size, len(path), 0, 0, 0, 0, _MODE_0600, offset) + path)
        offset += _LOCAL.size + len(path) + size
    listing = b"".join(directory)
    parts += (listing, _END.pack(_END_SIGNATURE, 0, 0, len(directory), len(directory), len(listing), offset, 0))
    return b"".join(parts)


# The zip records pack() writes (PKWARE's APPNOTE 4.3.7, 4.3.12, 4.3.16); the date is 1980-01-01.
_LOCAL, _LOCAL_SIGNATURE = struct.Struct("<4s5H3L2H"), b"PK\x03\x04"
_CENTRAL, _CENTRAL_SIGNATURE = struct.Struct("<4s6H3L5H2L"), b"PK\x01\x02"
_END, _END_SIGNATURE = struct.Struct("<4s4H2LH"), b"PK\x05\x06"
_DOS_DATE, _UTF8_NAME = (1 << 5) | 1, 0x800
# As zipfile on Unix: "version made by" Unix (3), 2.0 (unzip reads names as UTF-8 only then), and rw-------.
_MADE_ON_UNIX, _MODE_0600 = (3 << 8) | 20, 0o600 << 16
_ZIP32_BYTES, _ZIP32_MEMBERS = 2 << 30, 0xFFFF  # the archive pack() writes itself, at most


@functools.lru_cache(maxsize=4096)
def _npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    """The ``.npy`` header numpy writes for a C-ordered array of ``dtype`` and ``shape``
    (the same shapes come back at every checkpoint): numpy writes it for an array of one
    value seen through zero strides, and its first write, the header, is all kept."""
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be saved when allow_pickle=False")
    header = _FirstWrite()
    try:
        np.lib.format.write_array(header, np.broadcast_to(np.zeros((), dtype), shape), allow_pickle=False)
    except _FirstWrite.Done:
        pass
    return header.data


class _FirstWrite:
    """A file that keeps the first bytes written to it, then stops the writer."""

    class Done(Exception):
        pass

    def __init__(self):
        self.data = b""

    def write(self, data) -> int:
        self.data = bytes(data)
        raise _FirstWrite.Done


def pack_into(file: BinaryIO, document: bytes, arrays: dict[str, np.ndarray]) -> None:
    """Write an ``.npz`` (as ``np.savez`` writes one) of ``document`` (a JSON meta) and
    ``arrays`` to ``file``, taking the arrays out of the dict one by one as it packs them:
    a model's state is not held twice while it is packed."""
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in _members(document, arrays):
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
            del array


def _members(document: bytes, arrays: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """The members of a checkpoint's archive: ``__meta__`` (the document), the arrays,
    taken out of ``arrays`` one by one, and ``__dtypes__`` if any is of an extended type.

    The ``.npy`` format knows numpy's own types only: an array of a type that ml_dtypes
    adds (bfloat16, float8, int4: a model's variables may be such) would come back as
    raw bytes (``|V2``), which no backend assigns. Its bits are stored as unsigned
    integers instead, and its type's name in the member ``__dtypes__``."""
    extended: dict[str, str] = {}
    yield "__meta__", np.frombuffer(document, dtype=np.uint8)
    for name in list(arrays):
        array = np.asarray(arrays.pop(name))
        if _extended(array.dtype):
            extended[name] = array.dtype.name
            array = array.view(f"u{array.dtype.itemsize}")
        yield name, array
        del array
    if extended:
        yield "__dtypes__", np.frombuffer(json.dumps(extended).encode(), dtype=np.uint8)


def _extended(dtype: np.dtype) -> bool:
    """A type that numpy does not define itself (an ml_dtypes one, like bfloat16)."""
    return dtype.kind == "V" and dtype.fields is None and dtype.type is not np.void


def _document(meta: dict) -> bytes:
    return json.dumps(meta).encode()


def _write(folder: Path, step: int, fill: Callable[[BinaryIO], object]) -> Path:
    """Write the checkpoint of ``step``, whose bytes ``fill(file)`` writes, atomically."""
    final = path_of(folder, step)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_folder(folder)
    except OSError as e:
        raise CheckpointError(f"{folder}: cannot write a checkpoint: {e.strerror or e}") from e
    for old in checkpoints(folder)[:-KEEP]:
        old.unlink(missing_ok=True)
    return final


def _owned(array) -> np.ndarray:
    """``array`` as an array that nothing else writes to: a view (of a tensor's memory,
    say) is copied."""
    array = np.asarray(array)
    return array if array.flags.owndata else array.copy()


# A checkpoint's arrays up to this size are packed by the caller (see Writer): packing costs
# ~20 us a member plus ~0.5 ms a MiB (copy and CRC), so at most ~1 ms of the loop's time.
PACK_HERE_BYTES = 2 << 20


class Writer:
    """A run's writes to disk that training need not wait for, done in order by one
    background thread: its checkpoints, and the history's syncs (so a history is on disk
    up to its epoch record before the checkpoint that follows that epoch is).

    Writing a checkpoint (the archive, two fsyncs, the rename) costs a small model's run a
    few milliseconds, and an fsync of the history at an epoch's end about one (more on a
    slow disk), time the training loop would otherwise wait; here the loop only takes the
    snapshot and goes on. A state of up to ``PACK_HERE_BYTES`` is packed in the loop's
    thread, and the writing thread only writes, syncs and renames, which release the GIL:
    packing costs ~20 us of Python per array, and done in the thread it took the GIL
    from a PyTorch step at every array (docs/performance.md measures both). A larger
    state is copied here (where it is a view) and packed there, where its bytes, not
    its arrays, are the cost. A checkpoint is complete once renamed, as with
    :func:`save`, so a kill during a write leaves the one before it, as a kill during
    :func:`save` does. :meth:`submit` waits for the previous checkpoint first (at most
    one in flight; a caller that joins before taking its snapshot holds one snapshot at
    a time) and raises the error of any write that failed; :meth:`wait` waits for them
    all and raises it too. ``latest`` is the newest checkpoint written so far. The
    thread starts with the first write (starting one costs about a millisecond on busy
    cores) and ends with :meth:`close`."""

    THREAD = "pipetrain-checkpoint"  # the writing thread's name

    def __init__(self):
        self.latest: Path | None = None
        self._error: BaseException | None = None
        self._jobs: collections.deque = collections.deque()  # (ticket, callable), in order
        self._issued = self._done = 0  # tickets handed out, and the jobs finished
        self._checkpoint = 0  # the ticket of the last checkpoint submitted
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, folder: str | os.PathLike, step: int, meta: dict, arrays: dict[str, np.ndarray]) -> Path:
        """Start writing a checkpoint; returns the path it will have. Takes the arrays
        out of ``arrays`` (see :func:`pack_into`)."""
        self.join_checkpoint()
        self._raise()
        folder = Path(folder)
        if sum(np.asarray(a).nbytes for a in arrays.values()) <= PACK_HERE_BYTES:
            archive = pack(meta, arrays)
            fill = lambda file: file.write(archive)  # noqa: E731
        else:
            document = _document(meta)  # now: the meta may hold objects the run changes later
            arrays = {name: _owned(arrays.pop(name)) for name in list(arrays)}
            fill = lambda file: pack_into(file, document, arrays)  # noqa: E731

        def write() -> None:
            self.latest = _write(folder, step, fill)

        self._checkpoint = self.later(write)
        return path_of(folder, step)

    def later(self, job) -> int:
        """Run ``job()`` in the thread after those before it; returns its ticket (for
        :meth:`join`). An exception it raises is raised by the next :meth:`submit` or
        :meth:`wait`, and the jobs given until then are dropped. Once closed, the job
        runs here and now."""
        with self._changed:
            closed = self._closed
            if not closed:
                self._issued += 1
                self._jobs.append((self._issued, job))
                if self._thread is None:
                    self._thread = threading.Thread(target=self._serve, name=self.THREAD, daemon=True)
                    self._thread.start()
                self._changed.notify_all()
            ticket = self._issued
        if closed:
            job()
        return ticket

    def _serve(self) -> None:
        while True:
            with self._changed:
                while not self._jobs and not self._closed:
                    self._changed.wait()
                if not self._jobs:
                    return
                ticket, job = self._jobs[0]
            if self._error is None:  # after a failure, nothing more (no checkpoint after a failed sync)
                try:
                    job()
                except BaseException as e:  # raised in the loop's thread, by the next submit or wait
                    self._error = e
            with self._changed:
                self._jobs.popleft()
                self._done = ticket
                self._changed.notify_all()

    def join_checkpoint(self) -> None:
        """Wait for the checkpoint being written, if any (its error is kept for :meth:`wait`)."""
        self.join(self._checkpoint)

    def join(self, ticket: int | None = None) -> None:
        """Wait for the jobs up to ``ticket`` (all given so far by default) to be done
        (an error is kept for :meth:`wait`)."""
        with self._changed:
            ticket = self._issued if ticket is None else ticket
            while self._done < ticket:
                self._changed.wait()

    def wait(self) -> None:
        """Wait for every job given so far; raise the error of one that failed."""
        self.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Let the thread end once its jobs are done (jobs given later run in the caller's thread)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()


def load(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON document and the arrays of a checkpoint file."""
    return _read(path, with_arrays=True)


def load_meta(path: str | os.PathLike) -> dict:
    """The JSON document of a checkpoint file alone (the arrays stay on disk)."""
    return _read(path, with_arrays=False)[0]


def unpack(file, with_arrays: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """The meta and the arrays of what :func:`pack` wrote (a path or a file object)."""
    if not zipfile.is_zipfile(file):  # numpy would take it for a pickle
        raise ValueError("not an .npz archive")
    if hasattr(file, "seek"):
        file.seek(0)
    with np.load(file, allow_pickle=False) as data:
        meta = json.loads(data["__meta__"].tobytes().decode())
        arrays = {k: data[k] for k in data.files if k not in ("__meta__", "__dtypes__")} if with_arrays else {}
        extended = json.loads(data["__dtypes__"].tobytes().decode()) if with_arrays and "__dtypes__" in data else {}
    if extended:
        import ml_dtypes  # (Keras' own dependency)

        for name, dtype in extended.items():
            arrays[name] = arrays[name].view(getattr(ml_dtypes, dtype))
    return meta, arrays


def _read(path, with_arrays: bool) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        meta, arrays = unpack(path, with_arrays)
        _check_meta(meta)
    except Exception as e:  # not a zip, a damaged member, no or bad __meta__
        raise CheckpointError(f"{path}: cannot read the checkpoint ({_reason(e)})") from e
    return meta, arrays


REQUIRED = ("run_id", "position", "steps_done", "epochs_done", "plan", "rows_per_file", "config", "models",
            "callbacks", "rng", "epoch")


def _check_meta(meta) -> dict:
    missing = [key for key in REQUIRED if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise ValueError(f"its document lacks {', '.join(missing)}")
    return meta


def _reason(e: Exception) -> str:
    return f"no {e}" if isinstance(e, KeyError) else str(e) or type(e).__name__


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- what goes in -----------------------------------------------------------------------


def model_arrays(name: str, model) -> dict[str, np.ndarray]:
    """A model's variables (weights, seed-generator states) and its optimizer's; on
    PyTorch they may share the tensors' memory (see :func:`_host`)."""
    host = _host if _torch_backend() is not None else _copied
    out = {f"model/{name}/{i}": host(v) for i, v in enumerate(model.variables)}
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "built", False):
        out.update({f"optimizer/{name}/{i}": host(v) for i, v in enumerate(optimizer.variables)})
    return out


def _copied(variable) -> np.ndarray:
    return np.asarray(variable.numpy())


def _host(variable) -> np.ndarray:
    """A PyTorch variable's value on the host, read from its tensor: Keras'
    ``Variable.numpy()`` costs ~10 us a variable more (keras.tree, a copy), paid for
    every variable at every epoch's end. On the CPU the array is the tensor's memory,
    which training goes on changing: the checkpoint :class:`Writer` packs a small state
    at once and copies a larger one before its thread packs it (:func:`_owned`)."""
    tensor = variable.value.detach()
    try:
        return tensor.cpu().numpy()
    except TypeError:  # a type numpy lacks (bfloat16): Keras converts it
        return _copied(variable)


def optimizer_targets(model) -> list[str] | None:
    """Paths of the variables a model's optimizer was built for: not always the model's
    trainable variables now (a GAN freezes its discriminator inside the combined model)."""
    optimizer = getattr(model, "optimizer", None)
    targets = getattr(optimizer, "_trainable_variables", None)  # set by Keras' optimizer.build
    if not getattr(optimizer, "built", False) or targets is None:
        return None
    return [v.path for v in targets]


def restore_model(name: str, model, arrays: dict[str, np.ndarray], targets: list[str] | None = None) -> None:
    """Assign a model's (and its optimizer's) variables from checkpoint arrays; an
    optimizer not built yet is built for the variables it was built for originally."""
    _assign(f"model/{name}/", list(model.variables), arrays, f"model {name!r}")
    optimizer = getattr(model, "optimizer", None)
    saved = [k for k in arrays if k.startswith(f"optimizer/{name}/")]
    if optimizer is not None and saved:
        if not getattr(optimizer, "built", False):
            by_path = {v.path: v for v in model.variables}
            if targets and all(p in by_path for p in targets):
                optimizer.build([by_path[p] for p in targets])
            else:
                optimizer.build(model.trainable_variables)
        _assign(f"optimizer/{name}/", list(optimizer.variables), arrays, f"the optimizer of model {name!r}")


def _assign(prefix: str, variables: list, arrays: dict[str, np.ndarray], what: str) -> None:
    keys = sorted((k for k in arrays if k.startswith(prefix)), key=lambda k: int(k[len(prefix):]))
    if len(keys) != len(variables):
        raise CheckpointError(f"the checkpoint holds {len(keys)} variables for {what}, which has {len(variables)}")
    for key, variable in zip(keys, variables, strict=True):
        value = arrays[key]
        if tuple(value.shape) != tuple(variable.shape):
            raise CheckpointError(
                f"the checkpoint's {key} has shape {value.shape} but {what}'s variable "
                f"{variable.path} has {tuple(variable.shape)}"
            )
        variable.assign(value)


def _plain(value) -> bool:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


# The attributes that carry the training state of Keras' own callbacks (what their
# ``on_train_begin`` resets); their settings (patience, monitor, ...) are not saved, so a
# resumed run uses the callbacks as given. Any callback may instead define
# ``get_state()`` returning plain values (and lists of arrays) and ``set_state(state)``.
KERAS_CALLBACK_STATE = {
    "History": ("history", "epoch"),
    "EarlyStopping": ("wait", "stopped_epoch", "best", "best_weights", "best_epoch"),
    "ReduceLROnPlateau": ("wait", "best", "cooldown_counter"),
    "ModelCheckpoint": ("best", "_batches_seen_since_last_saving", "_last_batch_seen", "_current_epoch"),
    "TensorBoard": ("_global_train_batch", "_global_test_batch", "_previous_epoch_iterations"),
}


# Keras callbacks whose ``on_epoch_begin`` changes what a checkpoint holds: resumed in
# the middle of an epoch, they must not run it again (LearningRateScheduler would apply
# the epoch's schedule to a learning rate that has it already).
EPOCH_BEGIN_IN_STATE = ("LearningRateScheduler",)


def _is_keras(cb, names) -> bool:
    return any(k.__name__ in names and k.__module__.startswith("keras") for k in type(cb).__mro__)


def begin_again_on_resume(callbacks: list) -> list:
    """The callbacks that get ``on_epoch_begin`` again when a run resumes in the middle
    of an epoch: all but those whose state the checkpoint restored as it was mid-epoch
    (any callback with ``get_state``/``set_state``) and those whose ``on_epoch_begin``
    acts on restored state (``LearningRateScheduler``: the optimizer's learning rate)."""
    return [cb for cb in callbacks
            if not (hasattr(cb, "get_state") and hasattr(cb, "set_state")) and not _is_keras(cb, EPOCH_BEGIN_IN_STATE)]


def continue_csv_logs(callbacks: list, epoch: int) -> None:
    """A resumed run's ``CSVLogger`` appends, after dropping the rows at the end of its
    file for epochs from ``epoch`` on (written after the checkpoint, and written again by
    the resumed run), so that the file holds each epoch once, as ``fit``'s does. Rows
    before them (another run's, in a file it appends to) stay."""
    for cb in callbacks:
        if not _is_keras(cb, ("CSVLogger",)):
            continue
        cb.append = True
        path = Path(cb.filename)
        try:
            lines = path.read_text().splitlines(keepends=True)
        except (OSError, UnicodeDecodeError):
            continue  # no file yet (or not one it wrote): nothing to drop
        if not lines:
            continue
        header = next(csv.reader([lines[0]], delimiter=cb.sep))
        if "epoch" not in header:
            continue
        column = header.index("epoch")
        end = len(lines)
        while end > 1:
            row = next(csv.reader([lines[end - 1]], delimiter=cb.sep), [])
            try:
                if int(row[column]) < epoch:
                    break
            except (IndexError, ValueError):
                break
            end -= 1
        kept = lines[:end]
        if len(kept) < len(lines):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)


def _stateful_names(cb) -> tuple[str, ...]:
    for klass in type(cb).__mro__:
        if klass.__name__ in KERAS_CALLBACK_STATE and klass.__module__.startswith("keras"):
            return KERAS_CALLBACK_STATE[klass.__name__]
    return ()


def _to_plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # a tensor counter
        return np.asarray(value.numpy()).item()
    return value


_SCALARS = frozenset({bool, int, float, str, type(None)})


def _pack(value, key: str, arrays: dict[str, np.ndarray]):
    """``value`` as plain data, its arrays (a History's per-class metric, say) moved to
    ``arrays`` under ``key/...`` and left as ``{"__array__": name}``; None if it is not
    plain data."""
    value = _to_plain(value)
    if type(value) in (list, tuple) and all(type(v) in _SCALARS for v in value):
        return list(value)  # (a History's column, one value an epoch: at once, not value by value)
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject or isinstance(value, np.ma.MaskedArray):  # (a pickle; the mask would be lost)
            return None
        arrays[key] = value
        return {"__array__": key}
    if isinstance(value, (list, tuple)):
        packed = [_pack(v, f"{key}/{j}", arrays) for j, v in enumerate(value)]
        return None if any(p is None and v is not None for p, v in zip(packed, value, strict=True)) else packed
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        packed = {k: _pack(v, f"{key}/{k}", arrays) for k, v in value.items()}
        return None if any(packed[k] is None and value[k] is not None for k in value) else packed
    return value if _plain(value) else None


def _unpack(value, arrays: dict[str, np.ndarray]):
    if isinstance(value, dict) and set(value) == {"__array__"}:
        return arrays[value["__array__"]]
    if isinstance(value, list):
        return [_unpack(v, arrays) for v in value]
    if isinstance(value, dict):
        return {k: _unpack(v, arrays) for k, v in value.items()}
    return value


def callback_state(callbacks: list) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Each callback's training state (counters, best values, histories) and its arrays
    (``EarlyStopping.best_weights``), by position in the callback list."""
    states, arrays = [], {}
    for i, cb in enumerate(callbacks):
        if hasattr(cb, "get_state") and hasattr(cb, "set_state"):
            raw, custom = cb.get_state(), True
        else:
            raw = {n: getattr(cb, n) for n in _stateful_names(cb) if hasattr(cb, n)}
            custom = False
        state = {}
        for key, value in raw.items():
            packed = _pack(value, f"callback/{i}/{key}", arrays)
            if packed is not None or value is None:
                state[key] = packed
            else:
                kind = ("an array of Python objects" if isinstance(value, np.ndarray) and value.dtype.hasobject
                        else type(value).__name__)
                raise CheckpointError(f"callback {type(cb).__name__}: state {key!r} is not plain data ({kind})")
        states.append({"class": type(cb).__name__, "custom": custom, "state": state})
    return states, arrays


def check_callbacks(callbacks: list, states: list[dict]) -> None:
    """The callbacks are those whose state the checkpoint holds (a resume checks this
    before it writes anything)."""
    if [type(cb).__name__ for cb in callbacks] != [s["class"] for s in states]:
        raise CheckpointError(
            "the callbacks differ from the checkpoint's: "
            f"{[s['class'] for s in states]} were saved, {[type(cb).__name__ for cb in callbacks]} given"
        )


def restore_callbacks(callbacks: list, states: list[dict], arrays: dict[str, np.ndarray]) -> None:
    """Put back what :func:`callback_state` took, after ``on_train_begin`` has reset them."""
    check_callbacks(callbacks, states)
    for i, (cb, saved) in enumerate(zip(callbacks, states, strict=True)):
        state = {}
        for key, value in saved["state"].items():
            if isinstance(value, dict) and set(value) == {"__arrays__"}:  # checkpoints of before
                value = [arrays[f"callback/{i}/{key}/{j}"] for j in range(value["__arrays__"])]
            state[key] = _unpack(value, arrays)
        if saved["custom"]:
            cb.set_state(state)
        else:
            for key, value in state.items():
                setattr(cb, key, value)


def rng_state() -> tuple[dict, dict[str, np.ndarray]]:
    """Python's and numpy's global random states, Keras' global seed generator, and on
    the torch backend torch's global generators (an unseeded Dropout draws from them)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    arrays = {"rng/numpy": np.asarray(keys)}
    generator = _keras_global_seed_generator()
    if generator is not None:
        arrays["rng/keras"] = np.asarray(generator.state.numpy())
    torch = _torch_backend()
    if torch is not None:
        arrays["rng/torch"] = torch.get_rng_state().numpy()
        if torch.cuda.is_available():
            arrays.update({f"rng/torch-cuda/{i}": s.numpy() for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return meta, arrays


def restore_rng(meta: dict, arrays: dict[str, np.ndarray]) -> None:
    generator = _keras_global_seed_generator()
    if generator is None and "rng/keras" in arrays:
        # The run made it at its first unseeded draw (keras.random.normal() in a loop), before
        # the checkpoint; made only at the next draw here, it would start from another seed.
        # Made before Python's state is restored: making one draws its seed from there.
        generator = _keras_global_seed_generator(create=True)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, arrays["rng/numpy"], pos, has_gauss, cached))
    if generator is not None and "rng/keras" in arrays:
        generator.state.assign(arrays["rng/keras"])
    torch = _torch_backend()
    if torch is not None and "rng/torch" in arrays:
        torch.set_rng_state(torch.from_numpy(arrays["rng/torch"].copy()))
        cuda = sorted((k for k in arrays if k.startswith("rng/torch-cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.from_numpy(arrays[k].copy()) for k in cuda])


def _torch_backend():
    """torch, when it is Keras' backend (imported then already), else None."""
    import keras

    if keras.backend.backend() != "torch":
        return None
    import torch

    return torch


def _keras_global_seed_generator(create: bool = False):
    """Keras' global seed generator (used by unseeded random ops), if one exists yet (or
    made now, with ``create``)."""
    try:
        from keras.src.backend.common import global_state
        from keras.src.random.seed_generator import GLOBAL_SEED_GENERATOR, global_seed_generator

        if create:
            return global_seed_generator()
        return global_state.get_global_attribute(GLOBAL_SEED_GENERATOR)
    except Exception:  # a Keras without it (private API): nothing to save
        return None


def restore_history(callbacks: list, states: list[dict]) -> None:
    """Put back the saved state of Keras' History callback alone (what ``train()``
    returns): for a resumed run that has nothing left to train, whose other callbacks
    must not run again."""
    saved = next((s["state"] for s in states if s.get("class") == "History" and not s.get("custom")), None)
    history = next((cb for cb in callbacks if type(cb).__name__ == "History"), None)
    if saved is not None and history is not None:
        for key, value in saved.items():
            setattr(history, key, value)
