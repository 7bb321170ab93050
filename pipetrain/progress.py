"""The console view of a run: a progress bar per epoch, a line per epoch, a summary.

A sink of history records, like the JSONL writer: it shows what the run recorded and
knows nothing of models. On a terminal the bar (rich) redraws in place, at most ten
times a second; into a pipe or a file it prints one plain line per epoch.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

REFRESH_S = 0.1
SHOWN_METRICS = 4  # metrics on the bar; the epoch line shows them all


def fmt(value) -> str:
    """A metric value for people: 4 significant digits, or '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def metric_items(record: dict, skip: set[str]) -> list[tuple[str, object]]:
    return [(k, v) for k, v in record.items() if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)]


BATCH_KEYS = {"type", "run", "t", "epoch", "batch", "step", "size", "step_s", "wait_s", "samples_per_s"}
EPOCH_KEYS = {
    "type", "run", "t", "epoch", "samples", "batches", "time_s", "samples_per_s", "wait_s",
    "input_bound_pct", "read_mb", "read_mb_s", "disk_mb", "val_time_s", "complete",
}


def epoch_line(record: dict, epochs: int | None) -> str:
    """One line for a finished epoch."""
    n = record.get("epoch", 0) + 1
    head = f"Epoch {n}/{epochs}" if epochs else f"Epoch {n}"
    metrics = "  ".join(f"{k} {fmt(v)}" for k, v in metric_items(record, EPOCH_KEYS))
    rate = record.get("samples_per_s")
    bound = record.get("input_bound_pct")
    tail = f"{fmt(record.get('time_s'))} s  {rate:,.0f} samples/s" if rate else ""
    if bound is not None:
        tail += f"  input-bound {bound:.1f}%"
    return "  ".join(p for p in (head, metrics, tail) if p)


class Progress:
    """Shows records on the console as they arrive."""

    def __init__(self, verbose: int = 1, console: Console | None = None, history_path=None):
        self.verbose = verbose
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.history_path = history_path
        self.live = self.console.is_terminal
        self.epochs: int | None = None
        self.steps: int | None = None
        self._bar: RichProgress | None = None
        self._task = None
        self._last_refresh = 0.0
        self._loss = [0.0, 0]  # running loss of the epoch on the bar: total, samples
        self.epoch_records: list[dict] = []
        self.peak_rss_mb = 0.0

    def handle(self, record: dict) -> None:
        kind = record.get("type")
        if kind == "run":
            self._start(record)
        elif kind == "batch":
            self._batch(record)
        elif kind == "epoch":
            self._epoch(record)
        elif kind == "system":
            self.peak_rss_mb = max(self.peak_rss_mb, record.get("rss_mb") or 0.0)
        elif kind == "end":
            self._end(record)

    def _start(self, record: dict) -> None:
        data, model = record.get("data") or {}, record.get("model") or {}
        self.epochs, self.steps = data.get("epochs"), data.get("steps_per_epoch")
        resume = record.get("resume")
        what = f"model {model.get('name')!r}" if model.get("name") else "a custom loop"
        if model.get("params"):
            what += f" ({model['params']:,} params)"
        files = data.get("files") or []
        self.console.print(
            f"pipetrain: {what} on {data.get('rows', 0):,} rows from {len(files)} file(s), "
            f"batch {data.get('batch_size')}, {self.steps} steps/epoch, shuffle {data.get('shuffle')}"
            + (f"; resuming at epoch {resume['epoch'] + 1}, batch {resume['batch']}" if resume else "")
        )

    def _bar_for(self, record: dict) -> None:
        if self._bar is None and self.live:
            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=self.console, auto_refresh=False, transient=True,
            )
            self._bar.start()
            n = record.get("epoch", 0) + 1
            self._task = self._bar.add_task(
                f"Epoch {n}/{self.epochs}" if self.epochs else f"Epoch {n}",
                total=self.steps, completed=record.get("batch", 0), info="",
            )

    def _batch(self, record: dict) -> None:
        size = record.get("size") or 0
        loss = next((v for k, v in record.items() if k.endswith("loss") and isinstance(v, (int, float))), None)
        if loss is not None:
            self._loss[0] += loss * size
            self._loss[1] += size
        if not self.live:
            return
        self._bar_for(record)
        now = time.monotonic()
        last = self.steps is not None and record.get("batch", 0) + 1 >= self.steps
        if now - self._last_refresh < REFRESH_S and not last:
            return
        self._last_refresh = now
        info = []
        if self._loss[1]:
            info.append(f"loss {self._loss[0] / self._loss[1]:.4g}")
        rate = record.get("samples_per_s")
        if rate:
            info.append(f"{rate:,.0f} samples/s")
        step, wait = record.get("step_s") or 0.0, record.get("wait_s") or 0.0
        if step + wait > 0:
            info.append(f"waiting {100 * wait / (step + wait):.0f}%")
        self._bar.update(self._task, completed=record.get("batch", 0) + 1, info="  ".join(info))
        self._bar.refresh()

    def _stop_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar, self._task = None, None

    def _epoch(self, record: dict) -> None:
        self._stop_bar()
        self._loss = [0.0, 0]
        self.epoch_records.append(record)
        self.console.print(epoch_line(record, self.epochs))

    def _end(self, record: dict) -> None:
        self._stop_bar()
        self.console.print(summary(record, self.epoch_records, self.peak_rss_mb, self.history_path))

    def close(self) -> None:
        self._stop_bar()


def summary(end: dict, epochs: list[dict], peak_rss_mb: float = 0.0, history_path=None) -> str:
    """The closing lines: how it ended, the final validation metric, speed, memory."""
    status = end.get("status", "?")
    lines = [f"{status}: {end.get('epochs', 0)} epoch(s), {end.get('steps', 0):,} steps"]
    if end.get("error"):
        lines[0] += f" - {end['error']}"
    if epochs:
        last = epochs[-1]
        val = [(k, v) for k, v in metric_items(last, EPOCH_KEYS) if k.startswith("val_") and k != "val_loss"]
        shown = val[:1] or [(k, v) for k, v in metric_items(last, EPOCH_KEYS) if k.startswith("val_")][:1]
        if shown:
            lines.append("final " + ", ".join(f"{k} {fmt(v)}" for k, v in shown))
        samples = sum(e.get("samples", 0) for e in epochs)
        seconds = sum(e.get("time_s") or 0.0 for e in epochs)
        waits = sum(e.get("wait_s") or 0.0 for e in epochs)
        if seconds > 0:
            lines.append(f"{samples / seconds:,.0f} samples/s, input-bound {100 * waits / seconds:.1f}%")
    peak = max(peak_rss_mb, end.get("peak_rss_mb") or 0.0)
    if peak:
        lines.append(f"peak RSS {peak:,.0f} MB")
    if history_path:
        lines.append(f"history: {history_path}")
    return "\n".join(lines)
