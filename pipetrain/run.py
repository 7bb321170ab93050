"""A training run: the batches of a source, epoch after epoch, measured and recorded.

:class:`Run` is the one place where batches are handed out, timed, recorded and
checkpointed; :func:`pipetrain.train` is one loop written on it, and a custom loop (a GAN
alternating two ``train_on_batch`` calls) is another. Separation of concerns:

- the :class:`Run` owns the plan, the producer pool, the history writer, the system
  monitor, the progress display, the Keras callbacks and the checkpoints;
- an :class:`Epoch` hands out that epoch's batches and collects what the loop computed:
  per-model metrics through :meth:`Epoch.train_on_batch` (aggregated exactly as ``fit``
  does), other values through :meth:`Epoch.record` (means weighted by batch size), and
  validation through :meth:`Epoch.evaluate`;
- records go to *sinks* (the JSONL writer, the progress display); the loop never writes.

Example::

    with pipetrain.Run(source, batch_size=64, epochs=5, history="runs/gan/history.jsonl",
                       models={"generator": g, "discriminator": d}) as run:
        for epoch in run.epochs():
            for batch in epoch:
                epoch.train_on_batch(d, ..., prefix="d_")
                epoch.train_on_batch(gan, ..., prefix="g_")
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import socket
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path

import h5py
import keras
import numpy as np
import psutil

from pipetrain import __version__
from pipetrain.aggregate import MetricSums, WeightedMeans, pythonify
from pipetrain.history import SCHEMA, HistoryWriteError, HistoryWriter, jsonable
from pipetrain.monitor import Monitor, gpu_probe, peak_rss_mb
from pipetrain.pipeline import Batch, Prefetcher, plans_from
from pipetrain.plan import Plan
from pipetrain.progress import Progress
from pipetrain.source import H5Source, SourceError

RATE_WINDOW = 20  # batches in the "recent" samples/s of batch records


class RunError(ValueError):
    """A run that cannot start as asked (an existing history, bad settings)."""


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


class Run:
    """A training run over an :class:`~pipetrain.source.H5Source`.

    Args:
        source: the training data.
        batch_size: rows per batch.
        epochs: number of epochs. Defaults to 1.
        history: path of the JSON Lines history, or None for none. Defaults to None.
        shuffle: ``"block"`` or ``"none"`` (see :mod:`pipetrain.plan`). Defaults to "block".
        seed: the seed of the batch order. Defaults to 0.
        workers: producer threads. Defaults to 2.
        max_queue: batches prefetched ahead of the loop. Defaults to 8.
        max_queue_bytes: bytes prefetched ahead of the loop. Defaults to None.
        shuffle_window: rows permuted together by ``shuffle="block"``. Defaults to 8192.
        drop_remainder: drop the partial last batch of each epoch. Defaults to False.
        models: the model(s) of the run: one, a list, or a dict by name. The first is the
            one callbacks see. Defaults to None.
        callbacks: Keras callbacks, driven as ``fit`` drives them. Defaults to None.
        verbose: 0 silent, 1 a progress bar (plain lines when not on a terminal).
            Defaults to 1.
        monitor_interval: seconds between system samples. Defaults to 2.0.
        config: settings recorded in the ``run`` record as given. Defaults to None.
        overwrite: replace an existing history. Defaults to False (refused).
        recycle: reuse batch buffers once the next batch is requested (copy what you
            keep). Defaults to True.
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
        models=None,
        callbacks=None,
        verbose: int = 1,
        monitor_interval: float = 2.0,
        config: Mapping | None = None,
        overwrite: bool = False,
        recycle: bool = True,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise RunError(f"batch_size={batch_size!r} must be a whole number >= 1")
        if not isinstance(epochs, int) or epochs < 1:
            raise RunError(f"epochs={epochs!r} must be a whole number >= 1")
        if workers < 1:
            raise RunError(f"workers={workers!r} must be >= 1")
        if max_queue < 1:
            raise RunError(f"max_queue={max_queue!r} must be >= 1")
        self.source = source
        self.batch_size, self.epochs_total = batch_size, epochs
        self.workers, self.max_queue, self.max_queue_bytes = workers, max_queue, max_queue_bytes
        self.recycle = recycle
        try:
            self.plan = Plan(
                source.rows_per_file, batch_size, block_rows=source.block_rows(), shuffle=shuffle,
                seed=seed, window=shuffle_window, drop_remainder=drop_remainder,
            )
        except ValueError as e:
            raise RunError(str(e)) from None
        if self.plan.steps_per_epoch == 0:
            raise RunError(
                f"batch_size={batch_size} with drop_remainder leaves no batch of {source.rows} rows"
            )
        self.models = _models(models)
        self.model = next(iter(self.models.values()), None)
        self.history_path = Path(history) if history is not None else None
        self.verbose = verbose
        self.monitor_interval = monitor_interval
        self.config = dict(config or {})
        self.overwrite = overwrite
        self.run_id = f"{_dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        self.callbacks = keras.callbacks.CallbackList(
            callbacks, add_history=True, add_progbar=False, model=self.model,
            verbose=0, epochs=epochs, steps=self.plan.steps_per_epoch,
        )
        cbs = self.callbacks.callbacks
        self._batch_hooks = any(_overrides(c, "on_train_batch_end", "on_batch_end") for c in cbs)
        self._batch_begin_hooks = any(_overrides(c, "on_train_batch_begin", "on_batch_begin") for c in cbs)
        self._test_batch_hooks = any(_overrides(c, "on_test_batch_end", "on_test_batch_begin") for c in cbs)
        self.history = next(c for c in cbs if isinstance(c, keras.callbacks.History))
        # Where the run is: the next batch to train, and what is done.
        self.epoch, self.batch, self.steps_done = 0, 0, 0
        self.epochs_done = 0
        self.status: str | None = None
        self.stop_requested = False
        self.last_epoch_logs: dict = {}
        self._sums: dict[tuple[int, str], MetricSums] = {}
        self._writer: HistoryWriter | None = None
        self._monitor: Monitor | None = None
        self._progress: Progress | None = None
        self._stream: Prefetcher | None = None
        self._stream_at: tuple[int, int] | None = None  # where the open stream will deliver next

    # -- records ------------------------------------------------------------------

    def emit(self, kind: str, **fields) -> dict:
        """Send one record to every sink: the history file and the progress display."""
        record = {"type": kind, "run": self.run_id, "t": round(time.time(), 6), **fields}
        if self._writer is not None:
            self._writer.write(record)
        if self._progress is not None:
            self._progress.handle(record)
        return record

    def _emit_system(self, sample: dict) -> None:
        self.emit("system", **sample)

    def _run_record(self) -> dict:
        model = None
        if self.model is not None:
            try:
                params = int(self.model.count_params())
            except Exception:  # not built yet
                params = None
            model = {"name": self.model.name, "params": params}
        data = {
            "files": [str(p) for p in self.source.paths],
            "rows": self.source.rows,
            "batch_size": self.batch_size,
            "steps_per_epoch": self.plan.steps_per_epoch,
            "shuffle": self.plan.shuffle,
            "seed": self.plan.seed,
            "epochs": self.epochs_total,
            "fields": self.source.describe()["fields"],
        }
        return {
            "schema": SCHEMA,
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "config": jsonable(self.config),
            "model": model,
            "models": {name: getattr(m, "name", name) for name, m in self.models.items()},
            "data": data,
            "host": host_info(),
            "resume": None,
        }

    # -- lifetime -------------------------------------------------------------------

    def __enter__(self) -> Run:
        if self.history_path is not None:
            if self.history_path.exists() and self.history_path.stat().st_size and not self.overwrite:
                raise RunError(
                    f"{self.history_path}: a history exists already; pass --resume to continue "
                    "that run or --overwrite to replace it"
                )
            if self.overwrite and self.history_path.exists():
                self.history_path.unlink()
            self._writer = HistoryWriter(self.history_path)
        if self.verbose:
            self._progress = Progress(self.verbose, history_path=self.history_path)
        try:
            self.emit("run", **self._run_record())
            probe = gpu_probe(keras.backend.backend())
            self._monitor = Monitor(self.monitor_interval, self._emit_system, probe)
            self.emit("system", **self._monitor.sample())
            self._monitor.start()
        except BaseException:
            self._close_sinks()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close_stream()
        if self._monitor is not None:
            self._monitor.stop()
            with contextlib.suppress(Exception):  # a last sample is nice to have, not needed
                self.emit("system", **self._monitor.sample())
        if exc_type is None:
            self.status = "stopped" if self.stop_requested or self.epochs_done < self.epochs_total else "completed"
            error = None
        elif issubclass(exc_type, KeyboardInterrupt):
            self.status, error = "interrupted", "interrupted"
        else:
            self.status, error = "failed", _one_line(exc)
        try:
            if not isinstance(exc, HistoryWriteError):
                self.emit(
                    "end", status=self.status, epochs=self.epochs_done, steps=self.steps_done,
                    error=error, peak_rss_mb=round(peak_rss_mb(), 1),
                )
        finally:
            self._close_sinks()

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
        """The epochs still to train, each an iterable of its batches."""
        self.callbacks.on_train_begin()
        previous: Epoch | None = None
        while self.epoch < self.epochs_total and not self._should_stop():
            epoch = Epoch(self, self.epoch, self.batch)
            yield epoch
            epoch.end()
            previous = epoch
            if self._should_stop():
                break
        self._close_stream()
        for model in self.models.values():
            optimizer = getattr(model, "optimizer", None)
            if optimizer is not None and hasattr(optimizer, "finalize_variable_values"):
                optimizer.finalize_variable_values(model.trainable_weights)
        self.callbacks.on_train_end(logs=previous.logs if previous else None)

    def _should_stop(self) -> bool:
        if any(getattr(m, "stop_training", False) for m in self.models.values()):
            self.stop_requested = True
        return self.stop_requested

    def stop(self) -> None:
        """Stop after the current batch (as a callback setting ``model.stop_training``)."""
        self.stop_requested = True

    def _batches(self, epoch: int, start: int) -> Prefetcher:
        """The producer pool, positioned at (epoch, start); one stream across epochs."""
        stream = self._stream
        if stream is None or self._stream_at != (epoch, start):
            self._close_stream()
            stream = self._stream = Prefetcher(
                self.source, plans_from(self.plan, epoch, start, self.epochs_total), self.plan.blocks,
                self.batch_size, workers=self.workers, max_queue=self.max_queue,
                max_queue_bytes=self.max_queue_bytes, recycle=self.recycle, name="train",
            )
            self._stream_at = (epoch, start)
        return stream

    def metric_sums(self, model, prefix: str = "") -> MetricSums:
        key = (id(model), prefix)
        if key not in self._sums:
            self._sums[key] = MetricSums(model)
        return self._sums[key]


class Epoch:
    """One epoch of a :class:`Run`: iterate it for its batches."""

    def __init__(self, run: Run, index: int, start: int):
        self.run, self.index, self.start = run, index, start
        self.steps = run.plan.steps_per_epoch
        self.logs: dict = {}
        self.ended = False
        self._means = WeightedMeans()
        self._models: dict[tuple[int, str], tuple[object, str]] = {}
        self._val_logs: dict = {}
        self._train_logs: dict | None = None
        self._values: dict = {}
        self._current: Batch | None = None
        self._handed = 0.0
        self._recent: deque = deque(maxlen=RATE_WINDOW)
        self.samples = self.batches = 0
        self.wait_s = self.read_s = 0.0
        self.read_bytes = self.nbytes = 0
        self.val_time_s = 0.0
        self._t0: float | None = None
        self._t_train_end: float | None = None

    # -- batches --------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        run = self.run
        run.callbacks.on_epoch_begin(self.index)
        self._t0 = time.perf_counter()
        stream = run._batches(self.index, self.start)
        finished = False
        try:
            for _ in range(self.start, self.steps):
                if run._should_stop():
                    break
                batch = next(stream)
                self._current, self._handed = batch, time.perf_counter()
                self._values = {}
                if run._batch_begin_hooks:
                    run.callbacks.on_train_batch_begin(batch.index)
                yield batch
                self._finish_batch()
            finished = True
        finally:
            if self._current is not None:
                self._finish_batch()
            self._t_train_end = time.perf_counter()
            # The stream is positioned at the next epoch only if this one ran to its end.
            run._stream_at = (self.index + 1, 0) if finished and not run.stop_requested else None

    def _finish_batch(self) -> None:
        batch, run = self._current, self.run
        self._current = None
        now = time.perf_counter()
        step_s = now - self._handed
        self._recent.append((now, batch.size, step_s + batch.wait_s))
        span = sum(r[2] for r in self._recent)
        rate = sum(r[1] for r in self._recent) / span if span > 0 else None
        self._means.add(self._values, batch.size)
        self.samples += batch.size
        self.batches += 1
        self.wait_s += batch.wait_s
        self.read_s += batch.read_s
        self.read_bytes += batch.read_bytes
        self.nbytes += batch.nbytes
        run.batch = batch.index + 1
        run.steps_done += 1
        run.emit(
            "batch", epoch=self.index, batch=batch.index, step=self.index * self.steps + batch.index,
            size=batch.size, **self._values, step_s=round(step_s, 6), wait_s=round(batch.wait_s, 6),
            samples_per_s=round(rate, 1) if rate else None,
        )
        if run._batch_hooks:
            run.callbacks.on_train_batch_end(batch.index, self._running_logs())

    def _running_logs(self) -> dict:
        """What ``fit`` passes to ``on_train_batch_end``: the epoch's metrics so far."""
        logs = self._means.result()
        for model, prefix in self._models.values():
            sums = self.run.metric_sums(model, prefix)
            logs.update({prefix + k: v for k, v in sums.running().items()})
        return logs

    # -- what the loop computed -----------------------------------------------------

    def train_on_batch(self, model, x, y=None, sample_weight=None, class_weight=None, prefix: str = "") -> dict:
        """``model.train_on_batch`` on this batch, recorded under ``prefix``.

        Returns the batch's own metrics (not running averages). The epoch's metrics for
        this model are aggregated from the metric state exactly as ``fit`` does."""
        sums = self.run.metric_sums(model, prefix)
        key = (id(model), prefix)
        if key not in self._models:
            self._models[key] = (model, prefix)
            sums.reset()
        logs = model.train_on_batch(x, y, sample_weight=sample_weight, class_weight=class_weight, return_dict=True)
        sums.take()
        logs = {prefix + k: v for k, v in pythonify(logs).items()}
        self._values.update(logs)
        return logs

    def record(self, **values: float) -> None:
        """Record scalar values of the current batch (averaged over the epoch by batch size)."""
        if self._current is None:
            raise RuntimeError("Epoch.record() is called for the batch being trained: call it inside the batch loop")
        self._values.update({k: float(v) for k, v in values.items()})

    def _train_results(self) -> dict:
        if self._train_logs is None:
            logs = self._means.result()
            for model, prefix in self._models.values():
                sums = self.run.metric_sums(model, prefix)
                logs.update({prefix + k: v for k, v in sums.result().items()})
            self._train_logs = logs
        return self._train_logs

    def evaluate(self, model, source: H5Source, batch_size: int | None = None, prefix: str = "val_") -> dict:
        """Evaluate ``model`` on ``source`` (file order, every row), as ``fit`` validates:
        returns and records ``val_*`` metrics equal to ``model.evaluate``."""
        self._train_results()  # before validation touches the metric variables
        run = self.run
        t0 = time.perf_counter()
        logs = evaluate(
            model, source, batch_size or run.batch_size, workers=run.workers,
            max_queue=run.max_queue, callbacks=run.callbacks if run._test_batch_hooks else None,
            sums=run.metric_sums(model, "__eval__" + prefix),
        )
        self.val_time_s += time.perf_counter() - t0
        logs = {prefix + k: v for k, v in logs.items()}
        self._val_logs.update(logs)
        return logs

    def end(self, **logs) -> dict:
        """End the epoch (implied when the next one starts): write its record, run the
        callbacks' ``on_epoch_end``. Extra ``logs`` (say, your own validation) join it."""
        if self.ended:
            return self.logs
        self.ended = True
        run = self.run
        train_time = (self._t_train_end or time.perf_counter()) - (self._t0 or time.perf_counter())
        self.logs = {**self._train_results(), **self._val_logs, **{k: float(v) for k, v in logs.items()}}
        complete = self.start + self.batches == self.steps
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
        run.emit("epoch", epoch=self.index, **self.logs, **stats)
        if run._writer is not None:
            run._writer.sync()
        run.last_epoch_logs = self.logs
        run.callbacks.on_epoch_end(self.index, dict(self.logs))
        if complete:
            run.epochs_done = self.index + 1
            run.epoch, run.batch = self.index + 1, 0
        return self.logs


def evaluate(model, source: H5Source, batch_size: int, *, workers: int = 2, max_queue: int = 8,
             callbacks=None, sums: MetricSums | None = None) -> dict:
    """``model.evaluate`` over ``source`` in file order, through the producer pool."""
    plan = Plan(source.rows_per_file, batch_size, block_rows=source.block_rows(), shuffle="none")
    sums = sums or MetricSums(model)
    sums.reset()
    if callbacks is not None:
        callbacks.on_test_begin()
    with Prefetcher(source, plan.batches(0), plan.blocks, batch_size, workers=workers,
                    max_queue=max_queue, name="val") as batches:
        for batch in batches:
            if callbacks is not None:
                callbacks.on_test_batch_begin(batch.index)
            logs = model.test_on_batch(batch.x, batch.y, sample_weight=batch.sample_weight, return_dict=True)
            sums.take()
            if callbacks is not None:
                callbacks.on_test_batch_end(batch.index, pythonify(logs))
    logs = sums.result()
    if callbacks is not None:
        callbacks.on_test_end(logs)
    return logs


def _one_line(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (SourceError, RunError)):
        return text
    return f"{type(exc).__name__}: {text}"

