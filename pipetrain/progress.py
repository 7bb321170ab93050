"""The console view of a run: what its records say, in words, for the console.

Separation of concerns:

- :class:`RunState` is fed a run's records one by one and knows what they say so far:
  the run, its finished epochs, the epoch in progress (batches done, ETA, running
  means), the latest batch and system sample, the end. It is pure (no I/O, no clock)
  and keeps no per-batch history, so it can watch a job of any length.
- The formatters turn a state or a record into text: :func:`run_line`,
  :func:`epoch_line`, :func:`position_line`, :func:`summary`; :func:`lines_for` says
  which plain lines a record adds (the run, one line per epoch, the closing summary);
  :func:`epoch_bar` draws the epoch in progress as a rich progress bar.
- :class:`Progress` is the sink that ``Run`` feeds during training; ``pipetrain tail``
  (:mod:`pipetrain.tail`) feeds the same state from the history file and prints the
  same lines and the same bar, so a run looks the same watched from either side.

Example::

    state = RunState()
    for record in pipetrain.follow("runs/exp1"):   # until the run ends
        state.add(record)
        for line in lines_for(record, state):
            print(line)
"""

from __future__ import annotations

import contextlib
import os
import sys
import textwrap
import threading
import time
from collections import deque
from collections.abc import Iterable

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from pipetrain.history import is_number, is_shown, numeric_view, resume_point, superseded
from pipetrain.outcome import best_epoch

REFRESH_S = 0.1  # the bar redraws at most ten times a second
RATE_S = 2.0  # samples/s "now" is measured over the batches of the last two seconds
BAR_WIDTH = 30
ETA_EPOCHS = 5  # finished epochs that the run's ETA averages over

BULK_BATCHES = 256  # batches of one epoch summed over columns rather than one by one
BATCH_KEYS = {"type", "run", "t", "epoch", "batch", "step", "size", "step_s", "wait_s", "samples_per_s"}
EPOCH_KEYS = {
    "type", "run", "t", "epoch", "samples", "batches", "time_s", "samples_per_s", "wait_s",
    "input_bound_pct", "read_mb", "read_mb_s", "disk_mb", "val_time_s", "complete",
}


# -- numbers as text --------------------------------------------------------------------

def fmt(value) -> str:
    """A metric value for people: 4 significant digits, or '-'.

    >>> fmt(0.123456), fmt(None), fmt(3)
    ('0.1235', '-', '3')
    """
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def fmt_duration(seconds: float | None) -> str:
    """A duration as h:mm:ss, or '-:--:--' when unknown.

    >>> fmt_duration(83.4), fmt_duration(None)
    ('0:01:23', '-:--:--')
    """
    if seconds is None:
        return "-:--:--"
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def fmt_rate(samples_per_s: float | None) -> str:
    """A speed for people.

    >>> fmt_rate(21754.7)
    '21,755 samples/s'
    """
    return "-" if samples_per_s is None else f"{samples_per_s:,.0f} samples/s"


def batch_text(epoch: int, batch: int, steps: int | None = None) -> str:
    """A trained batch as people count it, from a record's 0-based ``epoch`` and
    ``batch``: epochs and batches from 1, as Keras' progress bar shows them.

    >>> batch_text(2, 818, 1563), batch_text(0, 4)
    ('epoch 3, batch 819/1563', 'epoch 1, batch 5')
    """
    return f"epoch {epoch + 1}, batch {batch + 1}" + (f"/{steps}" if steps else "")


def metric_items(record: dict, skip: set[str]) -> list[tuple[str, object]]:
    """The record's metrics (numbers and nulls under names not in ``skip``), in order.
    A null is a metric that was not finite (a NaN loss), shown as '-'."""
    return [(k, v) for k, v in record.items() if k not in skip and (v is None or is_number(v))]


def epoch_metrics(epochs: Iterable[dict]) -> list[str]:
    """The metric names of epoch records, as tables show them: the loss first, the other
    training metrics in Keras' order, then the ``val_*`` ones in the same way.

    >>> epoch_metrics([{"accuracy": 0.9, "loss": 0.2, "val_loss": 0.3, "val_accuracy": 0.8}])
    ['loss', 'accuracy', 'val_loss', 'val_accuracy']
    """
    names: dict[str, None] = {}
    for record in epochs:
        names.update((k, None) for k, _ in metric_items(record, EPOCH_KEYS))
    train = [n for n in names if not n.startswith("val_")]
    val = [n for n in names if n.startswith("val_")]
    return sorted(train, key=lambda n: n != "loss") + sorted(val, key=lambda n: n != "val_loss")


class RecentRate:
    """Samples/s now: the one definition the batch records carry (``samples_per_s``),
    which the training bar and ``pipetrain tail`` show. The samples of the latest
    batches of the epoch - those that ended in the last :data:`RATE_S` seconds, and at
    least the latest one - over the wall time from the start of the first of them
    (when the loop began waiting for it) to the end of the last.

    >>> rate = RecentRate(window_s=1.0)
    >>> [rate.add(t, t + 0.25, 100) for t in (0.0, 0.25, 0.5)]
    [400.0, 400.0, 400.0]
    """

    def __init__(self, window_s: float | None = None):
        self.window_s = RATE_S if window_s is None else window_s
        self._batches: deque = deque()  # (began, ended, size)
        self._samples = 0

    def add(self, began: float, ended: float, size: int) -> float | None:
        """Add a batch (its start and end, seconds on one clock); the rate after it."""
        self._batches.append((began, ended, size))
        self._samples += size
        while len(self._batches) > 1 and ended - self._batches[1][0] >= self.window_s:
            self._samples -= self._batches.popleft()[2]
        wall = ended - self._batches[0][0]
        return self._samples / wall if wall > 0 else None


# -- the state ----------------------------------------------------------------------------

class RunState:
    """What a run's records say so far; fed records one by one with :meth:`add`.

    A resumed segment (a ``run`` record with ``resume``) continues the same state: the
    epochs it trains again are dropped exactly as :func:`pipetrain.read_history` drops
    them; its system samples replace the earlier segment's (other processes run it), while
    the peak RSS stays the whole run's. Everything here is derived from the records
    alone, so a view of it is the same whenever and wherever it is drawn.

    Example::

        # every record written so far (timeout=0: read what is there, then return)
        state = RunState().extend(pipetrain.follow("runs/exp1", until_end=False, timeout=0))
        state.current_epoch, state.batches_done, state.eta_s, [e["loss"] for e in state.epochs]
    """

    def __init__(self):
        self.runs: list[dict] = []
        self.epochs: list[dict] = []
        self.batch: dict | None = None  # the latest batch record
        # The latest segment's (since the latest run record: the processes running now):
        self.system: dict | None = None  # its latest system sample (process 0's in a distributed run)
        self.processes: dict[int, dict] = {}  # a distributed run: the latest sample of each process, by index
        self.first_rss_mb: float | None = None  # the RSS of its first sample shown (process 0's)
        # The whole run's: the most memory a sample shown or an end record says it held.
        self.peak_rss_mb = 0.0
        self.end: dict | None = None
        self.last_t: float | None = None
        self.position = (0, 0)  # the next (epoch, batch) to train
        self._current = _EpochSoFar()

    def add(self, record: dict) -> None:
        record = numeric_view(record)
        if is_number(record.get("t")):
            self.last_t = record["t"]
        handler = {"run": self._run, "batch": self._batch, "epoch": self._epoch,
                   "system": self._system, "end": self._end}.get(record.get("type"))
        if handler is not None:  # unknown record types are ignored (forward compatible)
            handler(record)

    def extend(self, records: Iterable[dict]) -> RunState:
        for record in records:
            self.add(record)
        return self

    def add_epoch_batches(self, records: list[dict]) -> None:
        """Feed consecutive batch records of one epoch: the same as :meth:`add` on each,
        in order, with the epoch's sums taken over columns (a long epoch seen from the
        end at once). Records that the columns cannot sum exactly go one by one."""
        if len(records) < BULK_BATCHES or not self._bulk(records):
            self.extend(records)

    def add_samples(self, records: list[dict]) -> None:
        """Feed consecutive system samples: the same as :meth:`add` on each, in order,
        with one dict made per process rather than per sample (a long run's thousands
        of samples, seen from the end at once)."""
        latest: dict[int, dict] = {}
        shown = None
        for record in records:  # as _system, on the raw records: numeric_view changes no field read here
            if is_number(record.get("t")):
                self.last_t = record["t"]
            process = record.get("process")
            if isinstance(process, int):
                latest[int(process)] = record
            if is_shown(record):
                shown = record
                self._rss(record)
        if latest:
            self._processes({process: numeric_view(record) for process, record in latest.items()})
        if shown is not None:
            self.system = numeric_view(shown)

    def _bulk(self, records: list[dict]) -> bool:
        from pipetrain.table import Table  # numpy columns; the console itself needs none

        table = Table.from_records(records)
        epochs = table.columns.get("epoch")
        if len(table.shapes) != 1 or epochs is None or epochs.kind != "i" or len(set(epochs.values.tolist())) != 1:
            return False
        size = table.columns.get("size")
        if size is None or size.kind != "i":
            return False
        sizes = size.values.astype(np.float64)
        shape = table.shapes[0]
        sums = {}  # name: (first row with a number, its products)
        for position, name in enumerate(shape):
            if name in BATCH_KEYS:
                continue
            column = table.columns[name]
            if column.kind in ("s", "b"):  # text shows as missing, a bool is no metric: nothing to sum
                continue
            if column.kind == "o":  # lists, dicts, mixed values: summed here only if none is a number
                if any(map(is_number, column.values.tolist())):
                    return False
                continue
            valid = ~column.null if column.null is not None else np.ones(len(table), dtype=bool)
            values = column.values.astype(np.float64)
            if np.isnan(values[valid]).any():  # a NaN in the file (json reads one): summed one by one
                return False
            rows = np.flatnonzero(valid)
            if len(rows):
                sums[name] = (int(rows[0]), position, values[rows] * sizes[rows], int(size.values[rows].sum()))
        wait = table.columns.get("wait_s")
        if wait is not None and (wait.kind not in ("f", "i") or np.isnan(wait.values[
                ~wait.null if wait.null is not None else slice(None)]).any()):
            return False
        first, last = numeric_view(records[0]), numeric_view(records[-1])
        epoch = int(first.get("epoch") or 0)
        if epoch != self._current.epoch:
            self._current = _EpochSoFar(epoch)
        current = self._current
        for name, (_, _, products, samples) in sorted(sums.items(), key=lambda item: item[1][:2]):
            current.sums[name] = float(np.add.accumulate(np.r_[current.sums.get(name, 0.0), products])[-1])
            current.samples[name] = current.samples.get(name, 0) + samples
        if wait is not None:
            waits = np.where(wait.null, 0.0, wait.values) if wait.null is not None else wait.values
            current.wait_s = float(np.add.accumulate(np.r_[current.wait_s, waits.astype(np.float64)])[-1])
        if current.began is None:
            current.began = first["t"] - (first.get("wait_s") or 0.0) - (first.get("step_s") or 0.0)
        current.last_t = self.last_t = last["t"]
        self.batch = last
        self.position = (epoch, int(last.get("batch") or 0) + 1)
        return True

    def _run(self, record: dict) -> None:
        at = resume_point(record)
        if at is not None:
            self.epochs = [e for e in self.epochs if not superseded(e, at)]
            if self.batch is not None and superseded(self.batch, at):
                self.batch = None
        self.position = at or (0, 0)
        self._current = _EpochSoFar()  # a resumed epoch's figures start at the resume
        self.end = None
        # New processes: the old ones' samples say nothing of them (a dead process is not
        # shown, nor growth since another process started); the peak stays the run's.
        self.system, self.processes, self.first_rss_mb = None, {}, None
        self.runs.append(record)

    def _batch(self, record: dict) -> None:
        epoch, index = int(record.get("epoch") or 0), int(record.get("batch") or 0)
        if epoch != self._current.epoch:
            self._current = _EpochSoFar(epoch)
        self._current.add(record)
        self.batch = record
        self.position = (epoch, index + 1)

    def _epoch(self, record: dict) -> None:
        self.epochs.append(record)
        self.position = (int(record.get("epoch") or 0) + 1, 0)

    def _system(self, record: dict) -> None:
        process = record.get("process")
        if isinstance(process, int):
            self._processes({int(process): record})
        if is_shown(record):  # memory and CPU shown are process 0's; the others' in processes
            self.system = record
            self._rss(record)

    def _processes(self, latest: dict[int, dict]) -> None:
        """Note the latest samples of processes; ``processes`` stays in process order (a
        bool counts as the int it is), whatever order the processes' samples came in."""
        new = not latest.keys() <= self.processes.keys()
        self.processes.update(latest)
        if new:
            self.processes = dict(sorted(self.processes.items()))

    def _rss(self, sample: dict) -> None:
        """The first RSS of the samples shown (process 0's) and the peak: of their RSS and
        of the peak each says (the process's peak so far, from the kernel)."""
        rss, peak = sample.get("rss_mb"), sample.get("peak_rss_mb")
        if is_number(rss):
            self.first_rss_mb = rss if self.first_rss_mb is None else self.first_rss_mb
            self.peak_rss_mb = max(self.peak_rss_mb, rss)
        if is_number(peak):
            self.peak_rss_mb = max(self.peak_rss_mb, peak)

    def _end(self, record: dict) -> None:
        self.end = record
        if is_number(record.get("peak_rss_mb")):
            self.peak_rss_mb = max(self.peak_rss_mb, record["peak_rss_mb"])

    # -- what the records say -------------------------------------------------------------

    @property
    def run(self) -> dict:
        """The latest run record (segment), or {} before the first."""
        return self.runs[-1] if self.runs else {}

    @property
    def data(self) -> dict:
        return self.run.get("data") or {}

    @property
    def best(self) -> tuple[str, str, dict] | None:
        """(metric, "min"/"max", epoch record) of the best finished epoch: by the metric
        the run's callbacks monitor, else val_loss, else loss."""
        return best_epoch(self.epochs, self.run.get("monitor"))

    @property
    def epochs_total(self) -> int | None:
        return self.data.get("epochs") or (self.run.get("config") or {}).get("epochs")

    @property
    def steps(self) -> int | None:
        return self.data.get("steps_per_epoch")

    @property
    def started_t(self) -> float | None:
        return self.runs[0].get("t") if self.runs else None

    @property
    def elapsed_s(self) -> float | None:
        """Seconds from the first run record to the latest record."""
        if self.started_t is None or self.last_t is None:
            return None
        return self.last_t - self.started_t

    @property
    def current_epoch(self) -> int | None:
        """The epoch being trained (or about to be), or None when the run has ended."""
        epoch = self.position[0]
        if not self.runs or self.end is not None:
            return None
        if self.epochs_total is not None and epoch >= self.epochs_total:
            return None
        return epoch

    @property
    def batches_done(self) -> int:
        return self.position[1]

    def _so_far(self) -> _EpochSoFar | None:
        """The figures of the epoch in progress, if it has batches."""
        return self._current if self._current.epoch == self.current_epoch else None

    @property
    def means(self) -> dict[str, float]:
        """The current epoch's metrics so far: batch values averaged by batch size."""
        so_far = self._so_far()
        return so_far.result() if so_far else {}

    @property
    def input_bound_pct(self) -> float | None:
        """The current epoch's share of wall time spent waiting for data, so far."""
        so_far = self._so_far()
        return so_far.input_bound_pct() if so_far else None

    @property
    def rate(self) -> float | None:
        """Samples/s of the latest batches of the current epoch: the latest batch
        record's own ``samples_per_s`` (the run measures it over its recent batches)."""
        if self._so_far() is None:
            return None
        rate = (self.batch or {}).get("samples_per_s")
        return rate if is_number(rate) and rate > 0 else None

    @property
    def eta_s(self) -> float | None:
        """Seconds to the end of the current epoch's batches, at the recent rate."""
        size = self.data.get("batch_size")
        if self.current_epoch is None or not self.steps or not self.rate or not size:
            return None
        return max(0, self.steps - self.batches_done) * size / self.rate

    @property
    def run_eta_s(self) -> float | None:
        """Seconds to the end of the run: this epoch, then the epochs left at the pace
        of the latest ones (training and validation)."""
        if self.current_epoch is None or not self.epochs_total or self.eta_s is None:
            return None
        recent = [(e.get("time_s") or 0.0) + (e.get("val_time_s") or 0.0) for e in self.epochs[-ETA_EPOCHS:]]
        if not recent:
            return None
        left = self.epochs_total - self.current_epoch - 1
        return self.eta_s + left * sum(recent) / len(recent)


class _EpochSoFar:
    """One epoch's figures so far: running means of its batch metrics (weighted by batch
    size) and its time waiting for data."""

    def __init__(self, epoch: int | None = None):
        self.epoch = epoch
        self.sums: dict[str, float] = {}
        self.samples: dict[str, int] = {}
        self.wait_s = 0.0
        self.began: float | None = None  # when the first batch was handed out
        self.last_t: float | None = None

    def add(self, batch: dict) -> None:
        size = batch.get("size") or 0
        for name, value in metric_items(batch, BATCH_KEYS):
            if value is not None:
                self.sums[name] = self.sums.get(name, 0.0) + value * size
                self.samples[name] = self.samples.get(name, 0) + size
        wait = batch.get("wait_s") or 0.0
        self.wait_s += wait
        t = batch.get("t")
        if is_number(t):
            if self.began is None:
                self.began = t - wait - (batch.get("step_s") or 0.0)
            self.last_t = t

    def result(self) -> dict[str, float]:
        return {name: total / self.samples[name] for name, total in self.sums.items() if self.samples[name]}

    def input_bound_pct(self) -> float | None:
        if self.began is None or self.last_t is None or self.last_t <= self.began:
            return None
        return 100 * self.wait_s / (self.last_t - self.began)



# -- plain text -----------------------------------------------------------------------------

def backend_text(host: dict) -> str:
    """The Keras backend a run trained on, with its version ('' for a record without it).

    >>> backend_text({"backend": "jax", "backend_version": "0.10.2"})
    'jax 0.10.2'
    """
    return f"{host.get('backend') or ''} {host.get('backend_version') or ''}".strip() if host.get("backend") else ""


def run_line(record: dict) -> str:
    """One line for a run record: what trains on what; where a resumed segment starts."""
    data, model = record.get("data") or {}, record.get("model") or {}
    models = record.get("models") or {}
    what = f"model {model.get('name')!r}" if model.get("name") else "a custom loop"
    if len(models) > 1:
        what = "models " + ", ".join(repr(name) for name in models)
    elif model.get("params"):
        what += f" ({model['params']:,} params)"
    files = data.get("files") or []
    line = (
        f"pipetrain: {what} on {data.get('rows') or 0:,} rows from {len(files)} file(s), "
        f"batch {data.get('batch_size')}, {data.get('steps_per_epoch')} steps/epoch, "
        f"shuffle {data.get('shuffle')}"
    )
    at = resume_point(record)
    if at is not None:
        steps = data.get("steps_per_epoch")
        line += (f"; resuming at the end of epoch {at[0] + 1}" if steps and at[1] >= steps  # its batches all done
                 else f"; resuming at {batch_text(*at, steps)}")  # the next batch
    return line


def epoch_title(epoch: int, epochs: int | None) -> str:
    """An epoch as Keras names it, counting from 1.

    >>> epoch_title(0, 5)
    'Epoch 1/5'
    """
    return f"Epoch {epoch + 1}/{epochs}" if epochs else f"Epoch {epoch + 1}"


def epoch_line(record: dict, epochs: int | None) -> str:
    """One line for a finished epoch: its metrics, time, speed and input-bound share."""
    head = epoch_title(int(record.get("epoch") or 0), epochs)
    metrics = "  ".join(f"{k} {fmt(v)}" for k, v in metric_items(record, EPOCH_KEYS))
    rate, bound = record.get("samples_per_s"), record.get("input_bound_pct")
    tail = f"{fmt(record.get('time_s'))} s  {fmt_rate(rate)}" if rate else ""
    if bound is not None:
        tail += f"  input-bound {bound:.1f}%"
    if record.get("complete") is False:
        tail += f"  (partial: {record.get('batches', 0)} batches)"
    return "  ".join(p for p in (head, metrics, tail) if p)


def loss_items(values: dict) -> list[tuple[str, object]]:
    """The losses to show of a record or running means: ``loss``, or, when several
    models train under prefixes (a GAN's ``d_loss`` and ``g_loss``), each of theirs.

    >>> loss_items({"d_loss": 0.7, "d_accuracy": 0.5, "g_loss": 0.9}), loss_items({"loss": 1, "out_loss": 2})
    ([('d_loss', 0.7), ('g_loss', 0.9)], [('loss', 1)])
    """
    if "loss" in values:
        return [("loss", values["loss"])]
    return [(k, v) for k, v in values.items() if k.endswith("loss") and not k.startswith("val_")][:4]


def speed_text(state: RunState) -> str:
    """The epoch in progress in words: running loss(es), samples/s, input-bound share."""
    parts = [f"{k} {fmt(v)}" for k, v in loss_items(state.means)]
    if state.rate:
        parts.append(fmt_rate(state.rate))
    if state.input_bound_pct is not None:
        parts.append(f"input-bound {state.input_bound_pct:.1f}%")
    return "  ".join(parts)


def position_line(state: RunState) -> str:
    """Where a run that has not ended is: the epoch in progress, its batches and ETA."""
    epoch = state.current_epoch
    if epoch is None:
        return "running"
    done = f"{state.batches_done}/{state.steps}" if state.steps else str(state.batches_done)
    parts = [epoch_title(epoch, state.epochs_total), f"{done} batches", f"ETA {fmt_duration(state.eta_s)}"]
    return "  ".join(p for p in (*parts, speed_text(state)) if p)


def ending_text(end: dict, backend: str = "") -> str:
    """How a run ended, in one line: status, epochs, steps (on which backend), and why
    (an error, the signal, or what stopped it before its last epoch)."""
    line = f"{end.get('status', '?')}: {end.get('epochs', 0)} epoch(s), {end.get('steps') or 0:,} steps"
    if backend:
        line += f" on {backend}"
    if end.get("error"):
        line += f" - {end['error']}"
    elif end.get("reason") and end.get("status") != "completed":
        line += f" - {end['reason']}"
    return line


def best_text(state: RunState) -> str | None:
    """'best val_loss 0.2345 at epoch 5' (epochs counted from 1), or None."""
    best = state.best
    if best is None:
        return None
    name, _, record = best
    return f"best {name} {fmt(record[name])} at epoch {int(record.get('epoch') or 0) + 1}"


def summary(state: RunState, history_path=None) -> str:
    """The closing lines: how it ended and why, the best epoch, the final validation
    metric, speed, memory."""
    end = state.end or {}
    lines = [ending_text(end, backend_text(state.run.get("host") or {}))]
    epochs = state.epochs
    best = best_text(state)
    if best:
        lines.append(best)
    if epochs:
        val = [(k, v) for k, v in metric_items(epochs[-1], EPOCH_KEYS) if k.startswith("val_")]
        shown = [(k, v) for k, v in val if k != "val_loss"][:1] or val[:1]
        if shown:
            lines.append("final " + ", ".join(f"{k} {fmt(v)}" for k, v in shown))
        samples = sum(e.get("samples") or 0 for e in epochs)
        seconds = sum(e.get("time_s") or 0.0 for e in epochs)
        waits = sum(e.get("wait_s") or 0.0 for e in epochs)
        if seconds > 0:
            lines.append(f"{fmt_rate(samples / seconds)}, input-bound {100 * waits / seconds:.1f}%")
    if state.peak_rss_mb:
        lines.append(f"peak RSS {state.peak_rss_mb:,.0f} MB")
    if history_path:
        lines.append(f"history: {history_path}")
    return "\n".join(lines)


def lines_for(record: dict, state: RunState, history_path=None) -> list[str]:
    """The plain lines that ``record`` adds to a log of the run, once ``state`` has it:
    the run line, one line per epoch, and the closing summary."""
    kind = record.get("type")
    if kind == "run":
        return [run_line(numeric_view(record))]
    if kind == "epoch":
        return [epoch_line(numeric_view(record), state.epochs_total)]
    if kind == "end":
        return summary(state, history_path).splitlines()
    return []


def fold(line: str, width: int, indent: int = 4) -> list[str]:
    """A line cut to ``width`` columns between its parts (separated by two spaces), so a
    terminal never wraps it in the middle of a number; the continuation lines indented.

    >>> fold("Epoch 1/5  loss 0.5  accuracy 0.9", 20)
    ['Epoch 1/5  loss 0.5', '    accuracy 0.9']
    """
    if len(line) <= width:
        return [line]
    lines, current = [], ""
    for part in line.split("  "):
        if current and len(current) + 2 + len(part) > width:
            lines.append(current)
            current = " " * indent + part
        else:
            current = f"{current}  {part}" if current else part
    lines.append(current)
    # A part longer than the width on its own (the run line) is cut between its words.
    return [piece for text in lines for piece in
            (textwrap.wrap(text, width, subsequent_indent=" " * indent, break_long_words=False,
                           break_on_hyphens=False) if len(text) > width else [text])]


# -- the bar ----------------------------------------------------------------------------------

def epoch_bar(state: RunState) -> EpochBar | Text:
    """The epoch in progress as one line: a bar, batches done, ETA, speed (or nothing
    when no epoch is in progress)."""
    return Text("") if state.current_epoch is None else EpochBar(state)


class EpochBar:
    """One line: 'Epoch 3/5 ━━━━━━━━━╸━━━━━━ 30/45 ETA 0:00:12 loss 0.12  900 samples/s ...';
    the bar takes the width the text leaves, up to BAR_WIDTH, and the line never wraps."""

    def __init__(self, state: RunState):
        self.title = epoch_title(state.current_epoch, state.epochs_total)
        self.steps, self.done = state.steps, state.batches_done
        self.after = f"{self.done}/{self.steps or '?'} ETA {fmt_duration(state.eta_s)}"
        self.speed = speed_text(state)

    def __rich_console__(self, console, options):
        spare = options.max_width - len(self.title) - len(self.after) - len(self.speed) - 3
        row = Table.grid(padding=(0, 1))
        row.add_column(no_wrap=True, min_width=len(self.title))
        row.add_column(width=max(10, min(BAR_WIDTH, spare)))
        row.add_column(no_wrap=True, min_width=len(self.after))
        row.add_column(no_wrap=True, overflow="ellipsis")  # the speed gives way first
        row.add_row(
            Text(self.title, style="bold"),
            ProgressBar(total=self.steps or None, completed=self.done),
            Text(self.after, style="cyan"),
            Text(self.speed),
        )
        yield row


# -- the sink of a training run ---------------------------------------------------------------

class _Console(Console):
    """The training's console: when the reader of its output leaves (``| head``), what
    it would print goes nowhere, and training goes on (rich's own would exit)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class Progress:
    """Shows a training run's records on the console as they arrive.

    On a terminal (``verbose=1``) the epoch in progress is a bar that redraws in place,
    at most ten times a second; each finished epoch leaves one line; the run ends with a
    summary. Into a pipe or a file (or with ``verbose=2``) only the lines are printed:
    the same lines ``pipetrain tail`` prints. ``Run`` creates none with ``verbose=0``.

    Example::

        progress = Progress(history_path="runs/a/history.jsonl")
        for record in records:
            progress.handle(record)
        progress.close()
    """

    def __init__(self, verbose: int = 1, console: Console | None = None, history_path=None):
        self.verbose = verbose
        self.console = console or _Console(highlight=False, soft_wrap=True)
        self.history_path = history_path
        self.live = verbose == 1 and self.console.is_terminal
        self.state = RunState()
        self._bar: Live | None = None
        self._last_draw = 0.0
        self._lock = threading.Lock()  # the monitor thread sends system records too

    def handle(self, record: dict) -> None:
        with self._lock:
            self.state.add(record)
            kind = record.get("type")
            if kind == "end":
                self._stop_bar()
            for line in lines_for(record, self.state, self.history_path):
                # On a terminal, cut at the width between parts; into a file, one line each.
                for part in fold(line, self.console.width) if self.console.is_terminal else [line]:
                    self.console.print(part, markup=False, highlight=False)
            if self.live and kind in ("run", "batch", "epoch"):
                self._draw_bar(force=kind != "batch")

    def _draw_bar(self, force: bool) -> None:
        now = time.monotonic()
        state = self.state
        last_batch = state.steps is not None and state.batches_done >= state.steps
        if not force and not last_batch and now - self._last_draw < REFRESH_S:
            return
        self._last_draw = now
        if self._bar is None:
            self._bar = Live(console=self.console, auto_refresh=False, transient=True)
            self._bar.start()
        self._bar.update(epoch_bar(state), refresh=True)

    def _stop_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def close(self) -> None:
        with self._lock:
            self._stop_bar()
