"""``pipetrain plot``: one or several histories as one picture, for a report.

Panels: the loss and each metric per epoch (training solid, validation dashed), the
per-batch training loss smoothed, samples/s and the input-bound share over time,
process RSS, system available memory and CPU over time. Several histories overlay in
one colour each, named by their run folder (else their run id).

The series are computed by plain functions of a :class:`~pipetrain.history.History`
(testable without matplotlib); :func:`draw` lays them out. matplotlib is an optional
extra (``pip install "pipetrain[plot]"``); it is imported only here, with the Agg
canvas, so no display is needed.

Example::

    pipetrain plot runs/exp1 runs/exp2 -o compare.png

    from pipetrain.plot import plot
    plot(["runs/exp1/history.jsonl"], "exp1.png")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipetrain.cli import EXIT_OK, BadInput
from pipetrain.history import History, history_file, numeric_view, read_history, run_name
from pipetrain.progress import epoch_metrics

MAX_POINTS = 4000  # points drawn per line: enough for the eye, quick for a long run
MAX_METRIC_PANELS = 8
SMOOTH_EPOCHS = 10  # rolling means span a tenth of an epoch
VAL_STYLE = {"linestyle": (0, (5, 2)), "linewidth": 1.8}
TRAIN_STYLE = {"linestyle": "-", "linewidth": 1.8}


# -- the series -----------------------------------------------------------------------------

@dataclass
class Series:
    """One run's curves, in plain numpy arrays."""

    label: str
    history: History
    t0: float  # the run's start (its first run record), Unix seconds

    @property
    def duration_s(self) -> float:
        """Seconds from the start to the latest record."""
        h = self.history
        last = [r[-1]["t"] for r in (h.batches, h.epochs, h.system) if r and "t" in r[-1]]
        if h.end and "t" in h.end:
            last.append(h.end["t"])
        return max(last, default=self.t0) - self.t0

    def epoch_values(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(epoch number from 1, value) of an epoch metric; NaN where it was null."""
        rows = [((e.get("epoch") or 0) + 1, e.get(name)) for e in self.history.epochs if name in e]
        return _arrays(rows)

    def batch_losses(self) -> tuple[np.ndarray, np.ndarray]:
        """(position in epochs, loss) of every batch: batch b of epoch e (from 0) sits
        at e + (b + 1) / steps, so the end of epoch n is at n, as on the epoch panels."""
        steps = _steps_per_epoch(self.history)
        rows = [((b.get("epoch") or 0) + ((b.get("batch") or 0) + 1) / steps, b.get("loss"))
                for b in self.history.batches if "loss" in b]
        return _arrays(rows)

    @property
    def window(self) -> int:
        """Batches in a rolling mean: a tenth of an epoch."""
        return max(1, round(_steps_per_epoch(self.history) / SMOOTH_EPOCHS))

    @property
    def resumed_at(self) -> list[float]:
        """When each resumed segment started (Unix seconds): time lines break there."""
        return [r["t"] for r in self.history.runs[1:] if "t" in r]

    def over_time(self, records: list[dict], name: str) -> tuple[np.ndarray, np.ndarray]:
        """(seconds since the start, value) of a field of time-stamped records; NaN
        where a resumed segment starts, so no line is drawn across the pause."""
        t, y = _arrays([(r["t"], r.get(name)) for r in records if name in r and "t" in r])
        cut = np.unique(np.searchsorted(t, self.resumed_at))
        cut = cut[(cut > 0) & (cut < len(t))]
        return np.insert(t, cut, np.nan) - self.t0, np.insert(y, cut, np.nan)

    def rates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(seconds since the start, samples/s, % of the time waiting for data) after
        each batch, over the wall time of the last :attr:`window` batches of its epoch
        (the definitions of the epoch records). NaN separates epochs and segments: no
        line is drawn across validation or a pause."""
        groups = _runs_of(self.history.batches, self.resumed_at)
        parts = [_epoch_rates(group, self.window, self.t0) for group in groups]
        if not parts:
            return np.array([]), np.array([]), np.array([])
        gap = np.full((3, 1), np.nan)
        joined = np.concatenate([c for part in parts for c in (part, gap)][:-1], axis=1)
        return joined[0], joined[1], joined[2]


def _runs_of(batches: list[dict], resumed_at: list[float]) -> list[list[dict]]:
    """The batch records in runs of one epoch of one segment each."""
    groups: list[list[dict]] = []
    key = None
    for b in batches:
        if "t" not in b:
            continue
        this = (b.get("epoch"), int(np.searchsorted(resumed_at, b["t"])))
        if groups and this == key:
            groups[-1].append(b)
        else:
            groups.append([b])
        key = this
    return groups


def _epoch_rates(batches: list[dict], window: int, t0: float) -> np.ndarray:
    t = np.array([b["t"] for b in batches], dtype=float)
    size = np.array([b.get("size") or 0 for b in batches], dtype=float)
    wait = np.array([b.get("wait_s") or 0.0 for b in batches], dtype=float)
    began = t - wait - np.array([b.get("step_s") or 0.0 for b in batches], dtype=float)
    first = np.maximum(np.arange(len(t)) - window + 1, 0)
    wall = t - began[first]
    wall = np.where(wall > 0, wall, np.nan)  # no time measured: no rate
    rate = _window_sums(size, first) / wall
    bound = 100 * _window_sums(wait, first) / wall
    return np.vstack([t - t0, rate, bound])


def _window_sums(values: np.ndarray, first: np.ndarray) -> np.ndarray:
    """values[first[i]] + ... + values[i], for each i."""
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    return cumulative[1:] - cumulative[first]


def _arrays(rows) -> tuple[np.ndarray, np.ndarray]:
    if not rows:
        return np.array([]), np.array([])
    x, y = zip(*rows, strict=True)
    return np.asarray(x, dtype=float), np.asarray([np.nan if v is None else v for v in y], dtype=float)


def _steps_per_epoch(history: History) -> int:
    steps = [r.get("data", {}).get("steps_per_epoch") for r in history.runs]
    known = [s for s in steps if s]
    if known:
        return known[-1]
    return max((b.get("batch", 0) for b in history.batches), default=0) + 1


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of each value and the ``window - 1`` before it, NaNs left out.

    >>> rolling_mean(np.array([1.0, 3.0, np.nan, 5.0]), 2).tolist()
    [1.0, 2.0, 3.0, 5.0]
    """
    first = np.maximum(np.arange(len(values)) - window + 1, 0)
    valid = ~np.isnan(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _window_sums(np.where(valid, values, 0.0), first) / _window_sums(valid.astype(float), first)


def thin(x: np.ndarray, y: np.ndarray, limit: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``limit`` evenly spaced points of a long line (the last one kept)."""
    if len(x) <= limit:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, limit).round().astype(int))
    return x[keep], y[keep]


def metric_names(series: Sequence[Series]) -> list[str]:
    """The metrics other than the loss that get a panel each (``val_x`` is drawn with
    ``x``, or alone when there is no ``x``)."""
    names = epoch_metrics(e for s in series for e in s.history.epochs)
    bases = [n.removeprefix("val_") for n in names]
    return [n for n in dict.fromkeys(bases) if n != "loss"]


def time_unit(series: Sequence[Series]) -> tuple[str, float]:
    """The unit of the time axes, from the longest run: seconds, minutes or hours."""
    longest = max((s.duration_s for s in series), default=0.0)
    if longest < 180:
        return "s", 1.0
    if longest < 3 * 3600:
        return "min", 60.0
    return "h", 3600.0


def load(paths: Sequence[str | os.PathLike]) -> list[Series]:
    """The histories to plot, each named by its run; a clear error for a bad file."""
    series, folders = [], []
    for given in paths:
        path = history_file(given)
        if not path.exists():
            raise BadInput(f"{path}: no such history file")
        try:
            history = read_history(path)
        except OSError as e:
            raise BadInput(f"{path}: cannot read the history: {e.strerror or e}") from None
        for table in ("batches", "epochs", "system"):
            setattr(history, table, [numeric_view(r) for r in getattr(history, table)])
        if not history.runs:
            problem = f"{history.skipped} line(s) are not JSON records" if history.skipped else "it is empty"
            raise BadInput(f"{path}: no run to plot ({problem})")
        series.append(Series(run_name(path, history.runs[0]), history, history.runs[0]["t"]))
        folders.append(str(path.parent if path.name == "history.jsonl" else path))
    names = [s.label for s in series]
    for i, s in enumerate(series):  # runs of the same name: told apart by their path as given
        if names.count(s.label) > 1:
            s.label = folders[i] if folders.count(folders[i]) == 1 else f"{folders[i]} #{i + 1}"
    return series


# -- the picture ------------------------------------------------------------------------------

def plot(paths: Sequence[str | os.PathLike], output: str | os.PathLike) -> Path:
    """Draw the histories at ``paths`` into ``output`` (PNG, SVG or PDF, by its suffix)."""
    figure_class = _matplotlib()
    output = Path(output)
    if not output.parent.is_dir():
        raise BadInput(f"{output}: cannot write the plot ({output.parent} is not a folder)")
    figure = draw(load(paths), figure_class)
    formats = figure.canvas.get_supported_filetypes()
    if output.suffix.lower().lstrip(".") not in formats:
        raise BadInput(f"{output}: unknown picture format {output.suffix!r} (use .png, .svg or .pdf)")
    figure.savefig(output, dpi=110)
    return output


def _matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise BadInput('pipetrain plot needs matplotlib: pip install "pipetrain[plot]"') from None
    return Figure


def draw(series: Sequence[Series], figure_class):
    """The figure: a grid of panels, two wide, one colour per run."""
    metrics = metric_names(series)[:MAX_METRIC_PANELS]
    panels = ["loss", "batch_loss", *metrics, *TIME_PANELS]
    rows = (len(panels) + 1) // 2
    figure = figure_class(figsize=(13, 3.2 * rows + 1.2), layout="constrained")
    axes = figure.subplots(rows, 2, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(series))]
    unit, scale = time_unit(series)
    for ax, panel in zip(axes, panels, strict=False):
        if panel == "loss":
            _epoch_panel(ax, series, colors, "loss", "Loss per epoch")
        elif panel == "batch_loss":
            _batch_loss_panel(ax, series, colors)
        elif panel in metrics:
            _epoch_panel(ax, series, colors, panel, f"{panel.replace('_', ' ').capitalize()} per epoch")
        else:
            _time_panel(ax, series, colors, panel, unit, scale)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    figure.suptitle(_title(series), fontsize=14, fontweight="bold")
    _legend(figure, series, colors)
    return figure


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, loc="left", fontweight="bold", fontsize=11.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _epoch_panel(ax, series, colors, name: str, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    for s, color in zip(series, colors, strict=True):
        for key, style in ((name, TRAIN_STYLE), (f"val_{name}", VAL_STYLE)):
            x, y = s.epoch_values(key)
            if len(x):
                ax.plot(x, y, color=color, marker="o", markersize=4, **style)
    _style(ax, title, "epoch", name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _batch_loss_panel(ax, series, colors) -> None:
    from matplotlib.ticker import MaxNLocator

    for s, color in zip(series, colors, strict=True):
        x, y = s.batch_losses()
        if len(x):
            ax.plot(*thin(x, y), color=color, alpha=0.15, linewidth=0.6)
            ax.plot(*thin(x, rolling_mean(y, s.window)), color=color, **TRAIN_STYLE)
    _style(ax, f"Training loss per batch (faint), mean over 1/{SMOOTH_EPOCHS} epoch", "epoch", "loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


TIME_PANELS = {
    # panel: title, y label, where the values come from
    "throughput": (f"Throughput (over 1/{SMOOTH_EPOCHS} epoch)", "samples/s", "rates"),
    "input_bound": (f"Input-bound: time waiting for data (over 1/{SMOOTH_EPOCHS} epoch)", "% of wall time", "rates"),
    "rss_mb": ("Process memory (RSS)", "MB", "system"),
    "sys_available_mb": ("System memory available", "MB", "system"),
    "cpu_pct": ("CPU use of the process", "% of one core", "system"),
}


def by_process(records: list[dict]) -> dict[int | None, list[dict]]:
    """System records by the process that sampled them (a distributed run tags each)."""
    groups: dict[int | None, list[dict]] = {}
    for r in records:
        process = r.get("process")
        groups.setdefault(process if isinstance(process, int) else None, []).append(r)
    return groups




def _time_panel(ax, series, colors, panel: str, unit: str, scale: float) -> None:
    title, ylabel, source = TIME_PANELS[panel]
    top = 0.0
    for s, color in zip(series, colors, strict=True):
        lines = []
        if source == "rates":
            t, rate, bound = s.rates()
            lines.append((None, t, rate if panel == "throughput" else bound))
        groups = by_process(s.history.system)
        if source == "system" or (panel == "input_bound" and len(groups) > 1):
            # One line per process of a distributed run: the slowest host stands out.
            for process, records in sorted(groups.items(), key=lambda g: -1 if g[0] is None else g[0]):
                name = "input_bound_pct" if source == "rates" else panel
                lines.append((process if len(groups) > 1 else None, *s.over_time(records, name)))
        for process, t, y in lines:
            if not len(t):
                continue
            marker = "o" if source == "system" and len(t) <= 60 else None
            alpha = 1.0 if process is None else max(0.35, 0.9 - 0.15 * process)  # each process a shade
            ax.plot(*thin(t / scale, y), color=color, marker=marker, markersize=3, alpha=alpha, **TRAIN_STYLE)
            if process is not None and np.isfinite(y).any():
                last = np.flatnonzero(np.isfinite(y))[-1]
                ax.annotate(f"process {process}", (t[last] / scale, y[last]), fontsize=8, color=color,
                            xytext=(3, 0), textcoords="offset points", va="center")
            top = max(top, float(np.nanmax(y, initial=0.0)))
    _style(ax, title, f"time since start ({unit})", ylabel)
    if panel in ("throughput", "input_bound", "cpu_pct"):
        # rates read against zero (memory is read for its drift), with room above
        ax.set_ylim(0, max(top * 1.08, 1.0))
    ax.yaxis.set_major_formatter(_thousands())


def _thousands():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:,.0f}" if abs(v) >= 1000 else f"{v:g}")


def _legend(figure, series, colors) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.3", **TRAIN_STYLE), Line2D([], [], color="0.3", **VAL_STYLE)]
    labels = ["training", "validation"]
    if len(series) > 1:
        handles = [Line2D([], [], color=c, linewidth=3) for c in colors] + handles
        labels = [s.label for s in series] + labels
    style = {"ncols": min(len(labels), 6), "frameon": False, "fontsize": 11, "handlelength": 3}
    try:
        figure.legend(handles, labels, loc="outside lower center", **style)
    except ValueError:  # matplotlib < 3.7 has no legend outside the panels: the first panel
        figure.axes[0].legend(handles, labels, loc="upper right", **dict(style, ncols=1))


def _title(series: Sequence[Series]) -> str:
    if len(series) > 1:
        return "pipetrain: " + " vs ".join(s.label for s in series)
    s = series[0]
    run = s.history.runs[-1]
    model, data = run.get("model") or {}, run.get("data") or {}
    parts = [f"pipetrain: {s.label}"]
    if model.get("name"):
        parts.append(f"{model['name']}" + (f" ({model['params']:,} params)" if model.get("params") else ""))
    if data.get("rows"):
        parts.append(f"{data['rows']:,} rows, batch {data.get('batch_size')}")
    end = s.history.end
    parts.append(f"{end['status']} after {end.get('epochs', 0)} epoch(s)" if end else "running")
    return " | ".join(parts)


def cmd_plot(args) -> int:
    """``pipetrain plot FILE... -o OUT.png``."""
    output = plot(args.files, args.output)
    print(f"wrote {output}")
    return EXIT_OK
