"""A training run: the batches of a source, epoch after epoch, measured, recorded and
checkpointed.

:class:`Run` is the one place where batches are handed out, timed, recorded and
checkpointed; :func:`pipetrain.train` is one loop written on it, and a custom loop (a GAN
alternating two ``train_on_batch`` calls) is another. Separation of concerns:

- the :class:`Run` owns the plan, the producer pool, the history writer, the system
  monitor, the progress display, the Keras callbacks, checkpoints, resume and signals;
- an :class:`Epoch` hands out that epoch's batches and collects what the loop computed:
  per-model metrics through :meth:`Epoch.train_on_batch` (aggregated exactly as ``fit``
  does), other values through :meth:`Epoch.record` (means weighted by batch size), and
  validation through :meth:`Epoch.evaluate`;
- records go to *sinks* (the JSONL writer, the progress display); the loop never writes.

Example::

    with pipetrain.Run(source, batch_size=64, epochs=5, history="runs/gan/history.jsonl",
                       models={"d": discriminator, "gan": gan}) as run:
        for epoch in run.epochs():
            for batch in epoch:
                epoch.train_on_batch(discriminator, ..., prefix="d_")
                epoch.train_on_batch(gan, ..., prefix="g_")
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import operator
import os
import platform
import signal
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import h5py
import keras
import numpy as np
import psutil

from pipetrain import __version__
from pipetrain import checkpoint as ckpt
from pipetrain import device, distributed, fingerprint, fitlike, outcome, runfolder
from pipetrain.aggregate import MetricObjects, MetricSums, WeightedMeans, pythonify, unfused_reason
from pipetrain.fused import Group, each
from pipetrain.errors import Interrupted, RunError, argument, one_line
from pipetrain.history import SCHEMA, HistoryWriteError, HistoryWriter, jsonable
from pipetrain.monitor import Monitor, gpu_probe, peak_rss_mb
from pipetrain.pipeline import PRIORITIES, Batch, Cancelled, Prefetcher, plans_from
from pipetrain.plan import MAX_PARTITIONS, MAX_SEED, PARTITIONS, Plan
from pipetrain.process import process_info
from pipetrain.progress import Progress, RecentRate, batch_text
from pipetrain.source import H5Source

CHECKPOINT_EVERY = 1000  # batches between checkpoints, besides one at each epoch end
MAX_ROWS = 2**63 - 1  # a batch's rows are numpy int64 offsets (10**20 failed in a producer thread)
MAX_WORKERS = 256  # producer threads (100,000 failed to start: "can't start new thread")


class NonFiniteLoss(FloatingPointError):
    """A batch produced a NaN or infinite loss."""


class _Interrupted(Exception):
    """Validation stops early because the run was asked to stop."""


def _overrides(callback, *names: str) -> bool:
    base = keras.callbacks.Callback
    return any(getattr(type(callback), n) is not getattr(base, n) for n in names)


def _models(models) -> dict[str, object]:
    if models is None:
        return {}
    if isinstance(models, Mapping):
        return dict(models)
    if isinstance(models, (list, tuple)):
        return {getattr(m, "name", f"model_{i}"): m for i, m in enumerate(models)}
    return {getattr(models, "name", "model"): models}


class _NoModel:
    """What callbacks see as ``self.model`` in a run without models: a callback may still
    stop it (``stop_training``), and Keras' History keeps itself there."""

    name = "no model"
    stop_training = False
    history = None


def host_info() -> dict:
    backend = keras.backend.backend()
    try:
        backend_version = __import__(backend).__version__
    except Exception:
        backend_version = None
    return {
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count(),
        "memory_mb": round(psutil.virtual_memory().total / 2**20),
        "python": platform.python_version(),
        "keras": keras.__version__,
        "backend": backend,
        "backend_version": backend_version,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
        "pipetrain": __version__,
    }


# What the batch and epoch records hold themselves: not names for Epoch.record().
RECORD_FIELDS = frozenset({"type", "run", "t", "epoch", "batch", "step", "size", "batches", "step_s", "wait_s",
                           "samples_per_s", "samples", "time_s", "input_bound_pct", "read_mb", "read_mb_s", "disk_mb",
                           "val_time_s", "complete"})


NO_CHECKPOINT = "no checkpoint: the run has no history"  # what a run stopped by a signal without one says


class _Signals:
    """SIGINT and SIGTERM ask the run to stop at the next batch boundary; a second one
    stops at once (:class:`pipetrain.Interrupted`). Installed only in the main thread."""

    def __init__(self, checkpoints: bool = True):
        self.received: str | None = None
        self.checkpoints = checkpoints  # whether the run keeps any (one with a history does)
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue  # ignored by whoever started us (nohup): keep it ignored
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            then = "a resume starts from the last checkpoint" if self.checkpoints else NO_CHECKPOINT
            raise Interrupted(f"stopped at once by a second signal ({self.received}, then {name}); {then}")
        self.received = name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Run:
    """A training run over an :class:`~pipetrain.source.H5Source`.

    Args:
        source: the training data.
        batch_size: rows per batch.
        epochs: number of epochs (may be raised when resuming). Defaults to 1.
        history: path of the JSON Lines history; its folder is the run folder, which
            also holds ``checkpoint/``. None for no history and no checkpoints.
            Defaults to None.
        shuffle: ``"block"`` or ``"none"`` (see :mod:`pipetrain.plan`). Defaults to "block".
        seed: the seed of the batch order. Defaults to 0.
        workers: producer threads. Defaults to 2.
        max_queue: batches prefetched ahead of the loop. Defaults to 8.
        max_queue_bytes: bytes prefetched ahead of the loop. Defaults to None.
        shuffle_window: rows permuted together by ``shuffle="block"``. Defaults to 8192.
        partitions: runs of blocks the block shuffle reads side by side; the batches do
            not depend on the number of processes, and processes decode disjoint blocks
            when their number divides it (see :mod:`pipetrain.plan`). Defaults to 16.
        drop_remainder: drop the partial last batch of each epoch. Defaults to False.
        models: the model(s) of the run: one, a list, or a dict by name. Checkpoints
            cover each (weights and optimizer); the first is the one callbacks see.
            Defaults to None.
        metrics: Keras metric objects the loop updates itself (``auc.update_state``);
            reset each epoch, reported under their names, checkpointed. Defaults to None.
        callbacks: Keras callbacks, driven as ``fit`` drives them. Defaults to None.
        verbose: 0 silent, 1 a progress bar (plain lines when not on a terminal).
            Defaults to 1.
        monitor_interval: seconds between system samples; None for no monitor.
            Defaults to 2.0.
        config: settings recorded in the ``run`` record as given. Defaults to None.
        overwrite: replace an existing history and its checkpoints (never a file that is
            not pipetrain's, nor a file the run reads). Defaults to False (refused).
        resume: continue the run whose history is ``history`` from its last checkpoint,
            at the exact next batch; ``"auto"`` resumes when a checkpoint exists and
            starts afresh otherwise (a script that is simply run again). A run killed
            before its first checkpoint (written at its first epoch's end at the latest)
            starts again from its first batch; its earlier records are superseded.
            Defaults to False.
        allow_changed_data: resume although a data file changed since the run read it
            (its fingerprint differs); the run record says which. Defaults to False
            (refused: the resume would be exact over other data).
        validation: the data the loop validates on (``epoch.evaluate``), if any: its
            files are fingerprinted for a resume and protected like the training
            data's. Defaults to None.
        checkpoint_every: batches between checkpoints (besides each epoch end); None or
            0 for epoch ends only. Defaults to 1000.
        stop_on_nonfinite: stop with status ``failed`` when a loss is NaN or infinite.
            Defaults to True.
        handle_signals: SIGINT/SIGTERM stop at the next batch with a checkpoint.
            Defaults to True.
        recycle: reuse batch buffers once the next batch is requested (copy what you
            keep). Defaults to True.
        producer_priority: CPU priority of the producer threads, ``"idle"``, ``"low"``
            or ``"normal"`` (see :mod:`pipetrain.priority`); producers that starve (the
            loop waited for data over 30% of the last 3 seconds) are raised to normal for
            the rest of the run, and a ``producers`` record says when. Defaults to "idle".
        device_prefetch: copy the next batch to the accelerator while the current one
            trains (see :mod:`pipetrain.device`); the loop then gets device arrays.
            ``"auto"``: where there is an accelerator; True: always (on a CPU-only
            machine, a copy). Defaults to False.
    """

    def __init__(
        self,
        source: H5Source,
        *,
        batch_size: int,
        epochs: int = 1,
        history: str | os.PathLike | None = None,
        shuffle: str = "block",
        seed: int = 0,
        workers: int = 2,
        max_queue: int = 8,
        max_queue_bytes: int | None = None,
        shuffle_window: int = 8192,
        drop_remainder: bool = False,
        partitions: int = PARTITIONS,
        models=None,
        metrics=None,
        callbacks=None,
        verbose: int = 1,
        monitor_interval: float | None = 2.0,
        config: Mapping | None = None,
        overwrite: bool = False,
        resume: bool | str = False,
        checkpoint_every: int | None = CHECKPOINT_EVERY,
        stop_on_nonfinite: bool = True,
        handle_signals: bool = True,
        recycle: bool = True,
        producer_priority: str = "idle",
        allow_changed_data: bool = False,
        validation: H5Source | None = None,
        device_prefetch: bool | str = False,
    ):
        batch_size = whole_setting("batch_size", batch_size, 1, MAX_ROWS)
        epochs = whole_setting("epochs", epochs)
        seed = whole_setting("seed", seed, 0, MAX_SEED)
        workers, max_queue = whole_setting("workers", workers, 1, MAX_WORKERS), whole_setting("max_queue", max_queue)
        if max_queue_bytes is not None:
            max_queue_bytes = whole_setting("max_queue_bytes", max_queue_bytes)
        if checkpoint_every:  # None or 0: at epoch ends only
            checkpoint_every = whole_setting("checkpoint_every", checkpoint_every)
        if monitor_interval is not None and not (isinstance(monitor_interval, (int, float))
                                                 and 0 < monitor_interval < math.inf):
            raise RunError(f"monitor_interval={monitor_interval!r} must be a number of seconds > 0 (or None)")
        if resume not in (True, False, "auto"):
            raise RunError(f"resume={resume!r}: expected True, False or 'auto'")
        if resume and overwrite:
            raise RunError("resume and overwrite exclude each other")
        if resume and history is None:
            raise RunError("resume needs the history of the run to resume")
        # In a distributed run: what this process does differently (writes or not, its share).
        self._dist = distributed.link(self)
        self.source = source
        self.validation = validation
        self.allow_changed_data = allow_changed_data
        self.batch_size, self.epochs_total = batch_size, epochs
        self.workers, self.max_queue, self.max_queue_bytes = workers, max_queue, max_queue_bytes
        self.recycle = recycle
        if not (device_prefetch is True or device_prefetch is False or device_prefetch == "auto"):  # 1 == True
            raise RunError(f"device_prefetch={device_prefetch!r}: expected True, False or 'auto'")
        self.device_prefetch_depth = 1
        # A Keras distribution lays each batch out over the devices itself.
        placed = device_prefetch and not isinstance(self._dist, distributed.RunLink)
        self._device_copy = device.device_copier(force=device_prefetch is True) if placed else None
        if producer_priority not in PRIORITIES:
            raise RunError(f"producer_priority={producer_priority!r}: expected one of {', '.join(PRIORITIES)}")
        self.producer_priority = producer_priority
        self._priority = producer_priority  # as it is now: "normal" once producers starved
        try:
            self.plan = Plan(
                source.row_ranges, batch_size, block_rows=source.block_rows(), shuffle=shuffle,
                seed=seed, window=whole_setting("shuffle_window", shuffle_window), drop_remainder=drop_remainder,
                partitions=whole_setting("partitions", partitions, 1, MAX_PARTITIONS), share=self._dist.share,
            )
        except ValueError as e:
            raise RunError(str(e)) from None
        if self.plan.steps_per_epoch == 0:
            raise RunError(f"batch_size={batch_size} with drop_remainder leaves no batch of {source.rows} rows")
        self.models = _models(models)
        self.model = next(iter(self.models.values()), None)
        self._stand_in = None if self.models else _NoModel()
        self.metrics = MetricObjects(metrics or [])
        self.history_path = runfolder.history_path(history) if history is not None else None
        self.run_dir = self.history_path.parent if self.history_path is not None else None
        self.checkpoint_dir = self.run_dir / "checkpoint" if self.run_dir is not None else None
        self.checkpoint_every = checkpoint_every or 0
        self.verbose = self._dist.verbose(verbose)
        self.monitor_interval = monitor_interval
        self.config = dict(config or {})
        self.overwrite, self.resume = overwrite, resume
        self.stop_on_nonfinite = stop_on_nonfinite
        self.run_id = f"{_dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        if callbacks is not None and not (isinstance(callbacks, (list, tuple)) and all(
                isinstance(cb, keras.callbacks.Callback) for cb in callbacks)):
            raise RunError(f"callbacks={callbacks!r}: expected a list of keras.callbacks.Callback objects")
        if any(isinstance(cb, keras.callbacks.BackupAndRestore) for cb in callbacks or ()):
            raise RunError("callbacks: BackupAndRestore would load its own backup over the run's weights as training "
                           "begins; the run's checkpoints resume it exactly (resume=True): leave BackupAndRestore out")
        self.callbacks = keras.callbacks.CallbackList(
            callbacks, add_history=True, add_progbar=False, model=self.model or self._stand_in,
            verbose=0, epochs=epochs, steps=self.plan.steps_per_epoch,
        )
        cbs = self.callbacks.callbacks
        self._batch_hooks = any(_overrides(c, "on_train_batch_end", "on_batch_end") for c in cbs)
        self._batch_begin_hooks = any(_overrides(c, "on_train_batch_begin", "on_batch_begin") for c in cbs)
        self._test_batch_hooks = any(_overrides(c, "on_test_batch_end", "on_test_batch_begin") for c in cbs)
        self.history = next(c for c in cbs if isinstance(c, keras.callbacks.History))
        # Where the run is: the next batch to train, and what is done.
        self.epoch, self.batch, self.steps_done, self.epochs_done = 0, 0, 0, 0
        self.status: str | None = None
        self.stop_requested = False
        self.stop_reason: str | None = None  # why it stopped before its last epoch, in words
        self.complete: str | None = None  # resumed a run with nothing left to train: why
        self._callback_ended = False  # a callback set stop_training: the run is complete
        self._checkpoints = ckpt.Writer()
        self._signals = _Signals(checkpoints=self.checkpoint_dir is not None) if handle_signals else None
        self._sums: dict[tuple[int, str, str], MetricSums] = {}
        self._resumed: tuple[dict, dict] | None = None  # checkpoint (meta, arrays) to apply
        self._saved_names: dict[str, str] = {}  # model name in the checkpoint -> name here
        self._writer: HistoryWriter | None = None
        self._monitor: Monitor | None = None
        self._progress: Progress | None = None
        self._stream: Prefetcher | None = None
        self._stream_at: tuple[int, int] | None = None  # where the open stream delivers next
        self._epoch: Epoch | None = None
        self._epochs_iter = None
        self._entered = False  # the folder claimed, the history open, the signals caught: __enter__'s
        self._failing = False
        self._end_lock = threading.Lock()
        self._ended = False
        self._system = lambda sample: self.emit("system", **sample)
        self._folder: runfolder.RunFolder | None = None
        self._fingerprints: list[dict] | None = None

    # -- records ------------------------------------------------------------------

    def emit(self, kind: str, **fields) -> dict:
        """Send one record to every sink: the history file and the progress display."""
        record = {"type": kind, "run": self.run_id, "t": round(time.time(), 6), **fields}
        if self._writer is not None:
            self._writer.write(record)
        if self._progress is not None:
            self._progress.handle(record)
        return record

    def _run_record(self, resume: dict | None) -> dict:
        model = None
        if self.model is not None:
            model = {"name": self.model.name, "params": _params(self.model)}
        data = {
            "files": [str(p) for p in self.source.paths],
            "rows": self.source.rows,
            **({"row_range": list(self.source.row_range)} if self.source.rows != self.source.rows_total else {}),
            "batch_size": self.batch_size,
            "steps_per_epoch": self.plan.steps_per_epoch,
            "shuffle": self.plan.shuffle,
            "seed": self.plan.seed,
            "epochs": self.epochs_total,
            "fields": self.source.describe()["fields"],
            **({"versions": self.source.versions} if getattr(self.source, "versions", None) else {}),
        }
        if self._fingerprints is not None:
            data["fingerprints"] = self._fingerprints
        record = {
            "schema": SCHEMA,
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "config": jsonable(self.config),
            "model": model,
            "models": {name: getattr(m, "name", name) for name, m in self.models.items()},
            "data": data,
            "host": host_info(),
            "process": process_info(),
            "resume": resume,
            **self._dist.describe(),
        }
        if len(self.models) > 1:
            record["model_params"] = {name: _params(m) for name, m in self.models.items()}
        monitor = outcome.monitored(self.callbacks.callbacks, self.model)
        if monitor is not None:
            record["monitor"] = monitor
        return record

    # -- lifetime -------------------------------------------------------------------

    def __enter__(self) -> Run:
        try:
            resume = self._open_folder()
            if self.complete is not None:  # nothing to train: nothing is written either
                if self.verbose:
                    print(f"pipetrain: {self.history_path} is already complete ({self.complete}); nothing to "
                          f"train (more epochs than {self._resumed[0]['epochs']} would extend it)", flush=True)
                self._entered = True
                return self
        except BaseException as e:
            self._release_folder()
            self._dist.started(e)  # the other processes of a distributed run stop too
            raise
        try:
            # Every process of a distributed run sees the same data and settings, or none
            # starts: before the run record, so that a mismatch writes nothing.
            self._dist.started(None, {"plan": self.plan.describe(), "rows_per_file": list(self.source.rows_per_file),
                                      "at": [self.epoch, self.batch], "epochs": self.epochs_total,
                                      "contents": self._contents()})
            if self.history_path is not None and self._dist.writes:
                self._writer = HistoryWriter(self.history_path)
        except BaseException:
            self._release_folder()
            raise
        started = False
        try:
            if self.verbose:
                self._progress = Progress(self.verbose, history_path=self.history_path)
            self.emit("run", **self._run_record(resume))
            started = True
            if self.monitor_interval:
                probe = gpu_probe(keras.backend.backend())
                self._system = self._dist.samples(self._system, lambda: self._epoch)
                self._monitor = Monitor(self.monitor_interval, self._system, probe)
                self._system(self._monitor.sample())
                self._monitor.start()
            if self._signals is not None:
                self._signals.install()
            self._dist.on_lost(lambda why: self._emit_end("failed", why))
        except BaseException as e:
            with contextlib.suppress(Exception):  # the first error is the one to report
                if started:  # a follower waits for the end of what began
                    self._emit_end("failed", one_line(e, with_type=True))
                self._close_sinks()
            self._release_folder()
            raise
        self._entered = True
        return self

    def _open_folder(self) -> dict | None:
        """Lock the run folder (one writer at a time), check it can be written, and
        decide what starting there means; returns the ``resume`` field of the run record.
        In a distributed run process 0 alone holds the folder; the others take its verdict."""
        if self.history_path is None:
            return None
        data = [self.source, *([self.validation] if self.validation is not None else [])]
        self._fingerprints = [{"role": role, "file": str(path), "fingerprint": source.fingerprint(i)}
                              for role, source in zip(("train", "validation"), data)
                              for i, path in enumerate(source.paths)]

        def decide() -> str:
            self._folder = runfolder.claim(self.history_path, self.checkpoint_dir)
            kind = self._folder.decide(resume=self.resume, overwrite=self.overwrite,
                                       reads=[p for source in data for p in source.paths])
            self._folder.remove_stale()
            if self.overwrite:
                self._folder.clear()
            return kind

        kind = self._dist.first("folder", decide)
        self.resume = kind == "resume"
        if kind == "restart":
            return {"epoch": 0, "batch": 0, "checkpoint": None,
                    "restart": "killed before its first checkpoint: the records before this one are superseded"}
        return self._load_checkpoint() if self.resume else None

    def _contents(self) -> list[str] | None:
        """Each data file's contents in a few characters (its fingerprint without the
        modification time, which a copy on another host need not share): what the
        processes of a distributed run compare."""
        if self._fingerprints is None:
            return None
        return [f"{os.path.basename(f['file'])}:" + hashlib.sha1(json.dumps(
            {k: v for k, v in f["fingerprint"].items() if k != "mtime_ns"}, sort_keys=True).encode()).hexdigest()[:12]
                for f in self._fingerprints]

    def _release_folder(self) -> None:
        if self._folder is not None:
            self._folder.release()
            self._folder = None

    def _emit_end(self, status: str, error: str | None, reason: str | None = None) -> None:
        """The run's end record, once (in a distributed run the watchdog writes it when
        a lost process leaves this one stuck in a collective)."""
        with self._end_lock:
            if self._ended:
                return
            self._ended = True
        self.emit("end", status=status, epochs=self.epochs_done, steps=self.steps_done, error=error,
                  reason=reason if reason is not None else ("an error" if status == "failed" else None),
                  peak_rss_mb=round(peak_rss_mb(), 1),
                  checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.complete is not None and self._writer is None:
            self.status = "stopped" if self._resumed and self._resumed[0].get("stopped") else "completed"
            self._release_folder()
            return
        self._failing = exc_type is not None
        if self._failing and self._epoch is not None:
            self._epoch._current = None  # the batch in hand was not trained: do not record it
        for generator in (getattr(self._epoch, "_iterator", None), self._epochs_iter):
            if generator is not None:
                generator.close()
        self._close_stream()
        for sums in self._sums.values():  # the models get their own step functions back
            sums.detach()
        late = None  # a background checkpoint that failed, or a Ctrl-C while waiting for it: the run ends with it
        try:
            self._checkpoints.wait()
        except BaseException as e:
            if exc_type is None:
                exc_type, exc, late = type(e), e, e
            with contextlib.suppress(BaseException):  # a Ctrl-C in the wait: the write takes milliseconds, let it land
                self._checkpoints.join()
        self._checkpoints.close()
        if self._signals is not None:
            self._signals.restore()
        if self._monitor is not None:
            self._monitor.stop()
            with contextlib.suppress(Exception):  # a last sample is nice to have, not needed
                self._system(self._monitor.sample())
        if exc_type is None:
            self.status = "stopped" if self.stop_requested or self.epochs_done < self.epochs_total else "completed"
            left = f"the loop left after {self.epochs_done} of {self.epochs_total} epochs"
            error, reason = None, self.stop_reason or (left if self.status == "stopped" else
                                                       f"all {self.epochs_total} epochs trained")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.status = "interrupted"
            signal_name = self._signals.received if self._signals and self._signals.received else None
            error = str(exc) if isinstance(exc, Interrupted) else f"interrupted by {signal_name}" if signal_name \
                else "interrupted"
            reason = signal_name or "KeyboardInterrupt"
        else:
            self.status, error, reason = "failed", self._dist.explain(exc), "an error"
        try:
            self._dist.finish(self.status)
            if not isinstance(exc, HistoryWriteError):
                self._emit_end(self.status, error, reason)
        finally:
            try:
                if exc_type is None:
                    self._close_sinks()
                else:
                    with contextlib.suppress(Exception):  # the first error is the one to report
                        self._close_sinks()
            finally:
                try:
                    self._dist.close(self.status, error)  # a process whose run did not end with the others ends here
                finally:
                    self._release_folder()
        if late is not None:
            raise late
        received = self._signals.received if self._signals is not None else None
        if exc_type is None and received is not None:  # after the last batch: not acted on, not lost either
            raise Interrupted(f"{received} after the run's last batch (the run is {self.status})")

    def _close_sinks(self) -> None:
        if self._monitor is not None:
            self._monitor.stop()
        if self._progress is not None:
            self._progress.close()
        if self._writer is not None:
            self._writer.close()

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    # -- the loop -------------------------------------------------------------------

    def epochs(self) -> Iterator[Epoch]:
        """The epochs still to train, each an iterable of its batches (given once: a
        loop left early stops the run there, resumable)."""
        if not self._entered:  # (it trained with no history, lock or progress, and wrote checkpoints)
            raise RuntimeError("a Run is used in a with statement, which opens its folder and history: "
                               "with pipetrain.Run(...) as run: for epoch in run.epochs(): ...")
        if self._epochs_iter is not None:  # a second would begin training again (callbacks and all)
            raise RuntimeError("run.epochs() was called already: a run gives its epochs once (a loop left early "
                               "stops the run; resume it in a new Run)")
        self._epochs_iter = self._epochs()
        return self._epochs_iter

    def _epochs(self) -> Iterator[Epoch]:
        if self.complete is not None:  # what train() returns: the run's History as it ended
            ckpt.restore_history(self.callbacks.callbacks, self._resumed[0]["callbacks"])
            return
        if self._resumed is not None:  # a resumed run's CSV goes on where it stopped
            ckpt.continue_csv_logs(self.callbacks.callbacks, self.epoch)
        for model in self.models.values():  # as fit does: a model an earlier run stopped trains again
            model.stop_training = False
        fitlike.starting(self.models.values())
        self.callbacks.on_train_begin()
        epoch_state = self._apply_checkpoint()
        previous: Epoch | None = None
        while self.epoch < self.epochs_total and not self._should_stop():
            epoch = self._epoch = Epoch(self, self.epoch, self.batch, epoch_state)
            epoch_state = None
            try:
                yield epoch
            except GeneratorExit:  # the loop left run.epochs() early: the epoch so far counts
                if not self._failing:
                    self._end_epoch(epoch)
                    self._end_training(epoch)
                raise
            self._end_epoch(epoch)
            previous = epoch
            if self._should_stop():
                break
            if self.epoch < self.epochs_total and self.interrupted:
                # A signal since the last check (during validation's last batch, or the
                # epoch's end): the epoch's checkpoint is the place to stop, not a batch later.
                self._checkpoints.wait()
                raise self._stopped(f"at the end of epoch {epoch.index + 1}")
        self._end_training(previous)

    def _stopped(self, where: str) -> Interrupted:
        """The error a signal ends the run with, once its checkpoint is written (if the
        run keeps checkpoints: one with a history does)."""
        kept = "checkpoint written" if self.checkpoint_dir is not None else NO_CHECKPOINT
        return Interrupted(f"stopped by {self.interrupted} {where} ({kept})")

    def _end_epoch(self, epoch: Epoch) -> None:
        epoch._close_batches()
        incomplete = epoch.batches < epoch.steps  # counters include the batches before a resume
        if incomplete and not self._should_stop():
            # The loop left the epoch's batches without stopping the run: the run stops
            # here (rather than train the epoch again), resumable at the next batch.
            warnings.warn(f"epoch {epoch.index + 1} left after {epoch.batches} of {epoch.steps} batches: "
                          "the run stops here (call run.stop() to say so)", stacklevel=3)
            self.stop_requested = True
            self.stop_reason = f"the loop left epoch {epoch.index + 1} after batch {epoch.batches}/{epoch.steps}"
        if incomplete and self.checkpoint_dir is not None:
            # Before the epoch's end reaches the callbacks: a resume trains the rest of
            # the epoch and ends it once, as if it had never stopped.
            self.save_checkpoint(epoch, wait=False)
        epoch.end()
        if not incomplete and self.checkpoint_dir is not None:
            self.save_checkpoint(wait=False)

    def _end_training(self, last: Epoch | None) -> None:
        self._close_stream()
        for model in self.models.values():
            optimizer = getattr(model, "optimizer", None)
            if optimizer is not None and hasattr(optimizer, "finalize_variable_values"):
                optimizer.finalize_variable_values(model.trainable_weights)
        self.callbacks.on_train_end(logs=last.logs if last else None)

    def _should_stop(self) -> bool:
        if not self.stop_requested and any(getattr(m, "stop_training", False) for m in [*self.models.values(), self._stand_in]):
            self.stop_requested = self._callback_ended = True
            epoch = self._epoch
            self.stop_reason = outcome.callback_stop(self.callbacks.callbacks, epoch.index if epoch else 0,
                                                     epoch.batches if epoch else 0)
        return self.stop_requested

    @property
    def interrupted(self) -> str | None:
        """The signal that asked the run to stop (``"SIGINT"``, ``"SIGTERM"``), if any; in a
        distributed run, once every process has reached the batch boundary they agreed on."""
        received = self._signals.received if self._signals is not None else None
        return self._dist.stop_signal(received, self.steps_done)

    def stop(self) -> None:
        """Stop after the current batch (as a callback setting ``model.stop_training``),
        resumable at the next one."""
        if not self.stop_requested:
            epoch = self._epoch
            self.stop_reason = f"run.stop() in epoch {epoch.index + 1}" if epoch is not None else "run.stop()"
        self.stop_requested = True

    def _batches(self, epoch: int, start: int) -> Prefetcher:
        """The producer pool, positioned at (epoch, start); one stream across epochs."""
        if self._stream is None or self._stream_at != (epoch, start):
            self._close_stream()
            self._stream = Prefetcher(
                self.source, plans_from(self.plan, epoch, start, self.epochs_total), self.plan.blocks,
                self.plan.local_batch_size, workers=self.workers, max_queue=self.max_queue,
                max_queue_bytes=self.max_queue_bytes, recycle=self.recycle,
                priority=self._priority, lookahead=self.plan.window_batches + 1, name="train",
                on_raised=lambda info: self._producers_raised("train", info), cancel=lambda: self.interrupted,
            )
            self._stream_at = (epoch, start)
        return self._stream

    def _producers_raised(self, stream: str, info: dict) -> None:
        """The producers starved at low priority and now run at normal priority: so do
        the streams made after this one; the history says when."""
        self._priority = "normal"
        where = {"batch": self.batch} if stream == "train" else {}
        self.emit("producers", priority="normal", was=info["was"], stream=stream, epoch=self.epoch, **where,
                  waited_s=info["waited_s"], window_s=info["window_s"])

    def metric_sums(self, model, prefix: str = "", step: str = "train") -> MetricSums:
        """The epoch sums of ``model``'s metrics (one per model, prefix and step)."""
        key = (id(model), prefix, step)
        if key not in self._sums:
            self._sums[key] = MetricSums(model, step)
        return self._sums[key]

    def model_name(self, model) -> str:
        for name, m in self.models.items():
            if m is model:
                return name
        if self.checkpoint_dir is not None:
            raise RunError(
                f"model {getattr(model, 'name', model)!r} is not one of the run's models; pass it in "
                "Run(models=...) so that checkpoints cover it"
            )
        return getattr(model, "name", "model")

    # -- checkpoints and resume -------------------------------------------------------

    @property
    def last_checkpoint(self) -> Path | None:
        """The newest checkpoint written (complete on disk), or the one resumed from."""
        return self._checkpoints.latest

    def save_checkpoint(self, epoch: Epoch | None = None, wait: bool = True) -> Path | None:
        """Write the run's state (mid-``epoch`` if given); atomic, so a kill at any
        instant leaves the last complete checkpoint usable. With ``wait=False`` (the
        loop's own checkpoints) the file is written in the background while training
        goes on (:class:`pipetrain.checkpoint.Writer`); an error then ends the run at
        the next checkpoint or at its end."""
        if self.checkpoint_dir is None:
            return None
        if epoch is None and self._epoch is not None and not self._epoch.ended:
            epoch = self._epoch  # mid-epoch: without the epoch's state a resume would begin it anew at its position
        if epoch is not None and epoch._trained_in_hand():
            raise RuntimeError("run.save_checkpoint() with a trained batch in hand (inside the batch loop) would "
                               "resume at that batch and train it again: call it from a callback's "
                               "on_train_batch_end, or outside the batch loop")
        self._checkpoints.join_checkpoint()  # the previous snapshot leaves memory before this one is taken
        arrays: dict[str, np.ndarray] = {}
        for name, model in self.models.items():
            arrays.update(ckpt.model_arrays(name, model))
        callbacks, callback_arrays = ckpt.callback_state(self.callbacks.callbacks)
        rng, rng_arrays = self._dist.gather_rng(ckpt.rng_state())  # every process's random state
        arrays.update(callback_arrays)
        arrays.update(rng_arrays)
        epoch_meta = None
        if epoch is not None and (not epoch.ended or epoch.batches < epoch.steps):  # mid-epoch: it goes on
            epoch_meta, epoch_arrays = epoch.state()
            arrays.update(epoch_arrays)
        meta = {
            "format": 1,
            "run_id": self.run_id,
            "backend": keras.backend.backend(),
            "position": {"epoch": self.epoch, "batch": self.batch},
            "steps_done": self.steps_done,
            "epochs_done": self.epochs_done,
            "epochs": self.epochs_total,
            "plan": self.plan.describe(),
            "rows_per_file": list(self.source.rows_per_file),
            "row_range": list(self.source.row_range),
            "fingerprints": self._fingerprints,
            "config": jsonable(self.config),
            "models": list(self.models),
            "optimizer_targets": {name: ckpt.optimizer_targets(m) for name, m in self.models.items()},
            "dtype_policies": {name: _policy(m) for name, m in self.models.items()},
            "epoch": epoch_meta,
            # A callback ended the run at an epoch's end (EarlyStopping): it is complete, and
            # a resume changes nothing. Stopped inside an epoch, the epoch goes on.
            "stopped": self.stop_reason if epoch_meta is None and self._should_stop() and self._callback_ended
            else None,
            "callbacks": callbacks,
            "rng": rng,
            "saved": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        path = self._dist.save(lambda: self._checkpoints.submit(self.checkpoint_dir, self.steps_done, meta, arrays))
        if wait:
            self._checkpoints.wait()
        return path

    def _load_checkpoint(self) -> dict:
        """Read the newest checkpoint and check that it fits this run; returns the
        ``resume`` field of the run record. The state is applied when training starts."""
        # Process 0 reads the checkpoint and compares the data with what the run read (a
        # copy on another host has another modification time); every process gets both.
        path, meta, arrays, changed = self._dist.first("checkpoint", self._read_checkpoint)
        ours = self.plan.describe()
        for key, theirs in meta["plan"].items():
            if ours.get(key) != theirs:
                raise RunError(f"cannot resume {path}: {key} was {theirs!r}, now {ours.get(key)!r}")
        if list(meta["rows_per_file"]) != list(self.source.rows_per_file):
            raise RunError(f"cannot resume {path}: the data files have changed ({meta['rows_per_file']} rows then)")
        if list(meta.get("row_range") or [0, sum(meta["rows_per_file"])]) != list(self.source.row_range):
            raise RunError(f"cannot resume {path}: the run read rows {meta.get('row_range')} of its files, "
                           f"this source rows {list(self.source.row_range)}")
        if sorted(meta["models"]) == sorted(self.models):
            saved = {name: name for name in self.models}
        elif len(meta["models"]) == len(self.models) == 1:  # one model: its name may differ (sequential_3)
            saved = {next(iter(self.models)): meta["models"][0]}
        else:
            raise RunError(f"cannot resume {path}: the models were {meta['models']}, now {sorted(self.models)}")
        self._saved_names = {saved_name: name for name, saved_name in saved.items()}
        # Settings outside the plan that change what a batch computes: not exact otherwise.
        policies = meta.get("dtype_policies") or {}
        for name, model in self.models.items():
            if policies.get(saved[name]) not in (None, _policy(model)):
                raise RunError(f"cannot resume {path}: model {name!r} trained under the dtype policy "
                               f"{policies[saved[name]]!r}, now {_policy(model)!r}")
        then, now = (meta.get("config") or {}), json.loads(json.dumps(jsonable(self.config)))
        if "class_weight" in then and "class_weight" in now and then["class_weight"] != now["class_weight"]:
            raise RunError(f"cannot resume {path}: class_weight was {then['class_weight']}, now {now['class_weight']}")
        self.run_id = meta["run_id"]
        self.epoch, self.batch = meta["position"]["epoch"], meta["position"]["batch"]
        self.steps_done, self.epochs_done = meta["steps_done"], meta["epochs_done"]
        targets = meta.get("optimizer_targets") or {}
        held, ours = sum(k.startswith("metrics/") for k in arrays), sum(len(m.variables) for m in self.metrics.metrics)
        if meta.get("epoch") and held != ours:  # (a checkpoint taken mid-epoch holds their state)
            raise RunError(f"cannot resume {path}: it holds {held} variables of metrics=, the run's metrics= have {ours}")
        try:
            ckpt.check_callbacks(self.callbacks.callbacks, meta["callbacks"])  # (restored after on_train_begin)
            for name, model in self.models.items():
                ckpt.restore_model(saved[name], model, arrays, targets.get(saved[name]))
        except ckpt.CheckpointError as e:
            raise RunError(f"cannot resume {path}: {e}") from e
        self._resumed = (meta, arrays)
        self._checkpoints.latest = path
        self.complete = outcome.already_complete(meta, self.epochs_total)
        resume = {"epoch": self.epoch, "batch": self.batch, "checkpoint": str(path)}
        if changed:
            resume["changed_data"] = changed
        return resume

    def _read_checkpoint(self) -> tuple[Path, dict, dict, list[str]]:
        path = ckpt.latest(self.checkpoint_dir)
        if path is None:
            raise RunError(f"{self.checkpoint_dir}: no checkpoint to resume from")
        try:
            meta, arrays = ckpt.load(path)
        except ckpt.CheckpointError as e:
            raise RunError(str(e)) from e
        if self.history_path is not None:
            runfolder.check_resume(self.history_path, meta["run_id"])
        ckpt.check_backend(path, meta, self.history_path)
        changed = fingerprint.changed_files(meta.get("fingerprints"), self._fingerprints)
        if changed and not self.allow_changed_data:
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise RunError(f"cannot resume {path}: {changed[0]}{more}; pass "
                           f"{argument('allow_changed_data=True', '--allow-changed-data')} to resume on the data as it is now")
        return path, meta, arrays, changed

    def _apply_checkpoint(self) -> dict | None:
        """After ``on_train_begin`` (which resets callbacks): callback and RNG state;
        returns the partial epoch's state, if the checkpoint was taken mid-epoch."""
        if self._resumed is None:
            return None
        meta, arrays = self._resumed
        self._resumed = None
        try:
            ckpt.restore_callbacks(self.callbacks.callbacks, meta["callbacks"], arrays)
        except ckpt.CheckpointError as e:
            raise RunError(f"cannot resume {self.last_checkpoint}: {e}") from e
        ckpt.restore_rng(*self._dist.own_rng(meta["rng"], arrays))
        return {"meta": meta["epoch"], "arrays": arrays} if meta["epoch"] else None


class Epoch:
    """One epoch of a :class:`Run`: iterate it for its batches."""

    def __init__(self, run: Run, index: int, start: int, state: dict | None = None):
        self.run, self.index, self.start = run, index, start
        self.steps = run.plan.steps_per_epoch
        self.logs: dict = {}
        self.ended = False
        self._means = WeightedMeans()
        self._models: dict[tuple[str, str], tuple[object, str]] = {}  # (name, prefix) -> (model, prefix)
        self._val_logs: dict = {}
        self._train_logs: dict | None = None
        self._values: dict = {}  # what the loop recorded for the batch in hand
        self._logs: dict = {}  # the models' own metrics of the batch in hand
        self._current: Batch | Group | None = None
        self._handed = 0.0
        self._rate = RecentRate()
        self._iterator = None
        self.samples = self.batches = 0
        self.wait_s = self.read_s = 0.0
        self.read_bytes = self.nbytes = 0
        self.val_time_s = 0.0
        self.train_s = 0.0  # training time of this epoch before a resume
        self._t0: float | None = None
        self._t_train_end: float | None = None
        self._began_before = False  # on_epoch_begin ran before the checkpoint this epoch resumes from
        if state is not None:
            self._load_state(state["meta"], state["arrays"])
        else:
            run.metrics.reset()

    # -- batches --------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        self._once()
        self._iterator = self._batches(1)
        return self._iterator

    def groups(self, k: int) -> Iterator[Group]:
        """The epoch's batches in groups of up to ``k`` (copied and stacked, see
        :class:`pipetrain.fused.Group`), for :meth:`train_on_group`; a group ends early
        where the batch size changes (the partial last batch). One batch record, one
        pair of batch callbacks and one signal check per group; checkpoints land
        between groups."""
        k = whole_setting("steps_per_execution", k)
        distributed.check_steps_per_execution(k)
        self._once()
        self._iterator = self._batches(k)
        return self._iterator

    def _once(self) -> None:
        """An epoch's batches are handed out once: a second loop would start again at
        its first batch and train those batches twice (and begin the epoch twice)."""
        if self._iterator is not None or self.ended:
            self._close_batches()  # the batch in hand was trained: it is recorded
            raise RuntimeError(f"the batches of epoch {self.index + 1} were handed out already: iterate an epoch "
                               "once (leaving its loop early stops the run there)")

    def _batches(self, k: int) -> Iterator[Batch | Group]:
        run = self.run
        if self._began_before:  # resumed mid-epoch: only where the checkpoint does not hold its effect
            for callback in ckpt.begin_again_on_resume(run.callbacks.callbacks):
                callback.on_epoch_begin(self.index, {})
        else:
            run.callbacks.on_epoch_begin(self.index)
        fitlike.epoch_begins(run.models.values(), draw=not self._began_before)
        self._t0 = time.perf_counter()
        items = _items(run._batches(self.index, self.start), self.steps - self.start, k)
        if run._device_copy is not None:
            items = device.prefetch(items, run._device_copy, run.device_prefetch_depth)
        finished = False
        try:
            while True:
                if run._should_stop():
                    break
                try:
                    item = next(items, None)
                except Cancelled:  # a signal while waiting for data: stop here, as at a batch's end
                    run.save_checkpoint(self)
                    where = batch_text(self.index, run.batch, self.steps)
                    raise run._stopped(f"while waiting for the data of {where}") from None
                if item is None:
                    break
                self._current, self._handed = item, time.perf_counter()
                self._values, self._logs = {}, {}
                if run._batch_begin_hooks:
                    run.callbacks.on_train_batch_begin(item.index)
                with run._dist.batch_scope(run.plan.replicated(item.index)):
                    yield item
                self._finish_batch()
            finished = True
        except GeneratorExit:  # the loop left after training the batch in hand: it counts
            if self._current is not None:
                self._finish_batch(check=False)
            raise
        finally:
            items.close()
            fitlike.epoch_batches_end(run.models.values())
            self._current = None
            self._t_train_end = time.perf_counter()
            # The stream is positioned at the next epoch only if this one ran to its end.
            run._stream_at = (self.index + 1, 0) if finished and not run.stop_requested else None

    def _close_batches(self) -> None:
        """Close the batch loop; if it was left early, the batch in hand counts."""
        if self._iterator is not None:
            self._iterator.close()

    def _finish_batch(self, check: bool = True) -> None:
        batch, run = self._current, self.run
        self._current = None
        now = time.perf_counter()
        step_s = now - self._handed
        count = getattr(batch, "count", 1)
        last = batch.index + count - 1
        # The global batch: this process's rows are a share of it (groups of several
        # batches run on one process only: a distributed run trains one batch a step).
        size = batch.size if count > 1 else run.plan.global_size(batch.index)
        rate = self._rate.add(now - step_s - batch.wait_s, now, size)
        if self._values:
            self._means.add(self._values, size)
        self._train_logs = None  # (taken before a mid-epoch evaluate: the epoch goes on)
        self.samples += size
        self.batches += count
        self.wait_s += batch.wait_s
        self.read_s += batch.read_s
        self.read_bytes += batch.read_bytes
        self.nbytes += batch.nbytes
        run.batch = last + 1
        run.steps_done += count
        group = {"batches": count} if count > 1 else {}
        if self._values and self._values.keys() & self._logs.keys():
            raise RunError(f"Epoch.record({', '.join(f'{k}=' for k in sorted(self._values.keys() & self._logs.keys()))}"
                           "...): the model's train_on_batch reports that already; give your values other names")
        run.emit(
            "batch", epoch=self.index, batch=last, step=self.index * self.steps + last,
            size=size, **group, **self._logs, **self._values, step_s=round(step_s, 6),
            wait_s=round(batch.wait_s, 6), samples_per_s=round(rate, 1) if rate else None,
        )
        if run._batch_hooks:
            run.callbacks.on_train_batch_end(last, self._running_logs())
        if run.batch == self.steps:  # before a checkpoint that follows holds the generator
            fitlike.after_last_batch(stopping=run._should_stop)
        if not check:
            return
        self._check_finite(last)
        if run.interrupted:
            run.save_checkpoint(self)
            raise run._stopped(f"after {batch_text(self.index, last, self.steps)}")
        every = run.checkpoint_every
        if every and run.steps_done // every > (run.steps_done - count) // every and run.batch < self.steps:
            run.save_checkpoint(self, wait=False)

    def _check_finite(self, last: int) -> None:
        run = self.run
        if not run.stop_on_nonfinite or run._should_stop():  # a TerminateOnNaN has stopped it
            return
        bad = {k: v for values in (self._logs, self._values) for k, v in values.items()
               if k.endswith("loss") and isinstance(v, float) and not math.isfinite(v)}
        if bad:
            shown = ", ".join(f"{k}={v}" for k, v in bad.items())
            kept = "the last checkpoint holds finite weights" if run.last_checkpoint else "no checkpoint was written"
            raise NonFiniteLoss(
                f"non-finite loss at {batch_text(self.index, last, self.steps)}: {shown} (training stopped; {kept})"
            )

    def _running_logs(self) -> dict:
        """What ``fit`` passes to ``on_train_batch_end``: the epoch's metrics so far."""
        logs = self._means.result()
        for model, prefix in self._models.values():
            sums = self.run.metric_sums(model, prefix)
            logs.update({prefix + k: v for k, v in sums.running().items()})
        logs.update(self.run.metrics.result())
        return logs

    # -- what the loop computed -----------------------------------------------------

    def _track(self, model, prefix: str) -> MetricSums:
        """The metric sums of ``model`` for this epoch (zeroed on first use)."""
        key = (self.run.model_name(model), prefix)
        sums = self.run.metric_sums(model, prefix)
        if key not in self._models:
            self._models[key] = (model, prefix)
            plan = self.run.plan
            sums.reset(partial_batch=plan.rows % plan.batch_size != 0 and not plan.drop_remainder)
        return sums

    def train_on_batch(self, model, x, y=None, sample_weight=None, class_weight=None, prefix: str = "") -> dict:
        """``model.train_on_batch`` on this batch, recorded under ``prefix``.

        Returns the batch's own metrics (not running averages). The epoch's metrics for
        this model are aggregated from the metric state exactly as ``fit`` does."""
        self._in_hand("train_on_batch")
        sums = self._track(model, prefix)
        if class_weight is not None:
            sample_weight = _class_weights(y, sample_weight, class_weight)
        logs = sums.train((x, y, sample_weight))
        if prefix:
            logs = {prefix + k: v for k, v in logs.items()}
        self._logs.update(logs)
        return logs

    def train_on_group(self, model, group: Group, class_weight=None, prefix: str = "") -> dict:
        """Train a :class:`~pipetrain.fused.Group` of :meth:`groups` in one compiled call
        (on PyTorch, k steps back to back); recorded under ``prefix``.

        Returns the metrics of the group's batches (the model's metrics over them, as
        ``fit`` would report for those batches alone); the epoch's metrics stay exactly
        ``fit``'s. A model's very first group trains its first batch on its own (that
        call builds the model) and reports the metrics of the rest. ``groups(1)`` gives
        batches, which train as :meth:`train_on_batch` does."""
        self._in_hand("train_on_group")
        if not isinstance(group, Group):
            return self.train_on_batch(model, group.x, group.y, group.sample_weight, class_weight, prefix)
        check_groups(model, group.count)
        sums = self._track(model, prefix)
        data = (group.x, group.y, group.sample_weight)
        if class_weight is not None:
            weights = [_class_weights(y, sw, class_weight) for y, sw in
                       zip(group.y, group.sample_weight if group.sample_weight is not None else [None] * group.count,
                           strict=True)]
            data = (group.x, group.y, np.stack(weights))
        if not sums.fused:  # the first batch builds the model, through train_on_batch
            logs = sums.train(each(lambda a: a[0], data))
            data, count = each(lambda a: a[1:], data), group.count - 1
        else:
            count = group.count
        if count == 1:
            logs = sums.train(each(lambda a: a[0], data))
        elif count > 1:
            logs = sums.train(data, count)
        if prefix:
            logs = {prefix + k: v for k, v in logs.items()}
        self._logs.update(logs)
        return logs

    def _trained_in_hand(self) -> bool:
        """Whether the loop holds a batch it has trained (or recorded values for), not yet finished."""
        return self._current is not None and bool(self._logs or self._values)

    def _in_hand(self, method: str) -> None:
        """Training and recording are for the batch in hand: outside the batch loop there is
        none to record, count or check (the model would train unseen)."""
        if self._current is None:
            raise RuntimeError(f"Epoch.{method}() is for the batch being trained: call it inside the batch loop")

    def record(self, **values: float) -> None:
        """Record scalar values of the current batch (averaged over the epoch by batch size)."""
        self._in_hand("record")
        taken = sorted(values.keys() & RECORD_FIELDS)
        if taken:
            raise RunError(f"Epoch.record({', '.join(f'{k}=' for k in taken)}...): the batch and epoch records' own "
                           "field(s); give your values other names")
        try:
            self._values.update({k: float(v) for k, v in values.items()})
        except (TypeError, ValueError):  # name the value: float()'s own words do not
            bad = next(k for k, v in values.items() if not _is_number(v))
            raise RunError(f"Epoch.record({bad}=...): expected a number, got {type(values[bad]).__name__}") from None

    def _train_results(self) -> dict:
        if self._train_logs is None:
            logs = self._means.result()
            for model, prefix in self._models.values():
                sums = self.run.metric_sums(model, prefix)
                logs.update({prefix + k: v for k, v in sums.result().items()})
            logs.update(self.run.metrics.result())
            self._train_logs = logs
        return self._train_logs

    def evaluate(self, model, source: H5Source, batch_size: int | None = None, prefix: str = "val_") -> dict:
        """Evaluate ``model`` on ``source`` (file order, every row), as ``fit`` validates:
        returns and records ``val_*`` metrics equal to ``model.evaluate``."""
        run = self.run
        self._train_results()  # before validation touches the metric variables
        t0 = time.perf_counter()
        try:
            logs = evaluate(
                model, source, batch_size or run.batch_size, workers=run.workers,
                max_queue=run.max_queue, priority=run._priority,
                callbacks=run.callbacks, batch_hooks=run._test_batch_hooks,
                sums=run.metric_sums(model, prefix, step="test"), interrupted=lambda: run.interrupted,
                on_raised=lambda info: run._producers_raised("val", info),
            )
        except (_Interrupted, Cancelled):
            if self._trained_in_hand():
                # Validating inside the batch loop, after the batch in hand was trained:
                # it counts, or a resume would train it a second time.
                self._finish_batch(check=False)
            run.save_checkpoint(self)
            raise run._stopped(f"during validation of epoch {self.index + 1}") from None
        self.val_time_s += time.perf_counter() - t0
        logs = {prefix + k: v for k, v in logs.items()}
        self._val_logs.update(logs)
        return logs

    def end(self, **logs) -> dict:
        """End the epoch (implied when the next one starts): write its record, run the
        callbacks' ``on_epoch_end``. Extra ``logs`` (say, your own validation) join it."""
        if self.ended:
            return self.logs
        self._close_batches()
        self.ended = True
        run = self.run
        now = time.perf_counter()
        train_time = self.train_s + (self._t_train_end or now) - (self._t0 or now)
        self.logs = {**self._train_results(), **self._val_logs, **{k: float(v) for k, v in logs.items()}}
        complete = self.batches == self.steps
        stats = {
            "samples": self.samples,
            "batches": self.batches,
            "time_s": round(train_time, 4),
            "samples_per_s": round(self.samples / train_time, 1) if train_time > 0 else None,
            "wait_s": round(self.wait_s, 4),
            "input_bound_pct": round(100 * self.wait_s / train_time, 2) if train_time > 0 else None,
            "read_mb": round(self.nbytes / 2**20, 3),
            "read_mb_s": round(self.nbytes / 2**20 / self.read_s, 1) if self.read_s > 0 else None,
            "disk_mb": round(self.read_bytes / 2**20, 3),
            "val_time_s": round(self.val_time_s, 4),
            "complete": complete,
        }
        stats = run._dist.epoch_stats(self.index, stats)  # every process's data counters, on process 0
        run.emit("epoch", epoch=self.index, **self.logs, **stats)
        if run._writer is not None:  # on disk before the checkpoint that follows, not waited for here
            run._checkpoints.later(run._writer.sync)
        if complete:  # (before the callbacks: a checkpoint one of them asks for resumes at the next epoch)
            run.epochs_done = self.index + 1
            run.epoch, run.batch = self.index + 1, 0
        run.callbacks.on_epoch_end(self.index, dict(self.logs))
        return self.logs

    # -- checkpointed state -----------------------------------------------------------

    COUNTERS = ("samples", "batches", "wait_s", "read_s", "read_bytes", "nbytes")

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The epoch so far: counters, recorded means, each model's metric sums."""
        now = time.perf_counter()
        train_s = self.train_s + ((self._t_train_end or now) - self._t0 if self._t0 is not None else 0.0)
        meta = {
            "counters": {name: getattr(self, name) for name in self.COUNTERS},
            "began": self._began_before or self._t0 is not None,
            "train_s": train_s,
            "means": self._means.state(),
            "models": [],
            # Once every batch is trained, the results themselves: a run resumed before
            # validation has no batch left to build the model's metrics with.
            "train_logs": jsonable(self._train_results()) if self.batches == self.steps else None,
        }
        arrays = {f"metrics/{i}": a for i, a in enumerate(self.run.metrics.state())}
        for i, ((name, prefix), (model, _)) in enumerate(self._models.items()):
            sums = self.run.metric_sums(model, prefix).state() or []
            meta["models"].append({"name": name, "prefix": prefix, "arrays": len(sums)})
            arrays.update({f"sums/{i}/{j}": s for j, s in enumerate(sums)})
        return meta, arrays

    def _load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        for name, value in meta["counters"].items():
            setattr(self, name, value)
        self.train_s = meta["train_s"]
        self._began_before = meta.get("began", True)
        self._means.load_state(meta["means"])
        self._train_logs = meta.get("train_logs")
        self.run.metrics.load_state([arrays[k] for k in sorted((k for k in arrays if k.startswith("metrics/")),
                                                               key=lambda k: int(k.split("/")[1]))])
        for i, entry in enumerate(meta["models"]):
            model = self.run.models[self.run._saved_names.get(entry["name"], entry["name"])]
            sums = self._track(model, entry["prefix"])
            if self._train_logs is None:
                sums.load_state([arrays[f"sums/{i}/{j}"] for j in range(entry["arrays"])] or None)


def evaluate(model, source: H5Source, batch_size: int, *, workers: int = 2, max_queue: int = 8,
             priority: str = "idle", callbacks=None, batch_hooks: bool = True,
             sums: MetricSums | None = None, interrupted=None, on_raised=None) -> dict:
    """``model.evaluate`` over ``source`` in file order, through the producer pool.

    Returns the metrics ``model.evaluate(..., return_dict=True)`` returns for the same
    batches; ``callbacks`` (a ``CallbackList``) get the ``on_test_*`` hooks."""
    plan = evaluation_plan(source, batch_size)
    own = sums is None
    sums = sums or MetricSums(model, "test")
    sums.reset(partial_batch=source.rows % batch_size != 0)
    with fitlike.validating(model):
        if callbacks is not None:
            callbacks.on_test_begin()
        with Prefetcher(source, plan.batches(0), plan.blocks, plan.local_batch_size, workers=workers,
                        max_queue=max_queue, priority=priority, name="val", on_raised=on_raised,
                        cancel=interrupted) as batches:
            for batch in batches:
                if interrupted is not None and interrupted():
                    raise _Interrupted
                if callbacks is not None and batch_hooks:
                    callbacks.on_test_batch_begin(batch.index)
                with distributed.batch_scope(plan.replicated(batch.index)):
                    logs = sums.accumulate(lambda b=batch: _test_on_batch(model, b))
                if callbacks is not None and batch_hooks:
                    callbacks.on_test_batch_end(batch.index, pythonify(logs))
    logs = sums.result()
    if own:
        sums.detach()
    if callbacks is not None:
        callbacks.on_test_end(logs)
    return logs


def evaluation_plan(source: H5Source, batch_size: int) -> Plan:
    """The batches :func:`evaluate` reads: every row in file order; in a distributed run
    each process its share of each batch, which must split evenly over the devices."""
    cluster = distributed.active()
    try:
        return Plan(source.row_ranges, batch_size, block_rows=source.block_rows(), shuffle="none",
                    share=cluster.share if cluster is not None else None)
    except ValueError as e:
        raise RunError(f"validation: {e}") from None


def _params(model) -> int | None:
    try:
        return int(model.count_params())
    except Exception:  # not built yet
        return None


def _policy(model) -> str | None:
    """The name of a model's dtype policy (``mixed_bfloat16``...)."""
    return getattr(getattr(model, "dtype_policy", None), "name", None)


def check_groups(model, k: int) -> None:
    """Groups of k > 1 batches need pipetrain's compiled step, which some models cannot use."""
    why = unfused_reason(model) if k > 1 else None
    if why is not None:
        said = argument(f"steps_per_execution={k}", f"--steps-per-execution {k}")  # the flag on the command line
        raise RunError(f"{said}: model {getattr(model, 'name', '?')!r} trains one batch a step: {why}; use 1")


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def whole_setting(name: str, value, low: int = 1, high: int | None = None) -> int:
    """A whole number from ``low`` to ``high`` (Python or numpy integers), or a RunError
    naming the setting."""
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or number < low or high is not None and number > high:
        bounds = f">= {low}" if high is None else f"from {low} to {high}"
        said = argument(f"{name}={value!r}", f"--{name.replace('_', '-')} {value}")
        raise RunError(f"{said} must be a whole number {bounds}")
    return number


def _items(stream: Iterator[Batch], steps: int, k: int) -> Iterator[Batch | Group]:
    """The next ``steps`` batches of ``stream``, one by one (k = 1) or in groups of up
    to k batches of one size."""
    k = min(k, max(steps, 1))  # a group never spans more than the epoch's steps: no more room than those
    if k == 1:
        for _ in range(steps):
            yield next(stream)
        return
    held: Group | None = None  # a batch of another size, which starts the next group
    taken = 0
    while taken < steps or held is not None:
        group = Group(held if held is not None else next(stream), k)
        taken += 0 if held is not None else 1
        held = None
        while group.count < k and taken < steps:
            batch = next(stream)
            taken += 1
            if not group.add(batch):
                held = Group(batch, 1)
                break
        yield group.done()


def _class_weights(y, sample_weight, class_weight):
    """Class weights as per-row sample weights, as ``train_on_batch`` makes them."""
    if sample_weight is not None:
        raise ValueError("sample_weight and class_weight exclude each other (as in train_on_batch)")
    from keras.src.trainers.data_adapters.data_adapter_utils import class_weight_to_sample_weights

    return class_weight_to_sample_weights(y, class_weight)


def _test_on_batch(model, batch: Batch) -> dict:
    try:
        return model.test_on_batch(batch.x, batch.y, sample_weight=batch.sample_weight, return_dict=True)
    except StopIteration:
        # Keras < 3.8: the first test_on_batch of a fresh model builds its metrics while
        # tracing, traces again and finds its one-batch iterator spent. That call ran
        # nothing; the second one runs.
        return model.test_on_batch(batch.x, batch.y, sample_weight=batch.sample_weight, return_dict=True)
