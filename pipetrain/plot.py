"""``pipetrain plot``: one or several histories as one picture, for a report.

Panels: the loss and each metric per epoch (training solid, validation dashed), the
per-batch training loss smoothed (per-batch lines of any length are drawn as the
smallest and largest value in each pixel column, so spikes stay visible), samples/s and the input-bound share over time,
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
from functools import cached_property
from pathlib import Path

import numpy as np

from pipetrain.cli import EXIT_OK, BadInput
from pipetrain.history import History, history_file, is_number, numeric_view, read_history, run_name
from pipetrain.progress import epoch_metrics
from pipetrain.table import Table

COLUMNS = 1500  # spans per line drawn: more than a panel has pixel columns
MAX_METRIC_PANELS = 8
SMOOTH_EPOCHS = 10  # rolling means span a tenth of an epoch
VAL_STYLE = {"linestyle": (0, (5, 2)), "linewidth": 1.8}
TRAIN_STYLE = {"linestyle": "-", "linewidth": 1.8}


# -- the series -----------------------------------------------------------------------------

@dataclass
class Series:
    """One run's curves, in plain numpy arrays (from the history's columns: a long run's
    batches are never turned into dicts here)."""

    label: str
    history: History
    t0: float  # the run's start (its first run record), Unix seconds

    @property
    def duration_s(self) -> float:
        """Seconds from the start to the latest record."""
        h = self.history
        last = [float(np.nanmax(_table(r).array("t"))) for r in (h.batches, h.system) if len(r)]
        last += [e["t"] for e in h.epochs[-1:] if is_number(e.get("t"))]
        if h.end and is_number(h.end.get("t")):
            last.append(h.end["t"])
        return max(last, default=self.t0) - self.t0

    def epoch_values(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(epoch number from 1, value) of an epoch metric; NaN where it was null."""
        rows = [((e.get("epoch") or 0) + 1, e.get(name)) for e in self.history.epochs if name in e]
        return _arrays(rows)

    def batch_losses(self, name: str = "loss") -> tuple[np.ndarray, np.ndarray]:
        """(position in epochs, loss) of every batch: batch b of epoch e (from 0) sits
        at e + (b + 1) / steps, so the end of epoch n is at n, as on the epoch panels."""
        batches = _table(self.history.batches)
        steps = _steps_per_epoch(self.history)
        has = batches.has(name)
        x = batches.ints("epoch") + (batches.ints("batch") + 1) / steps
        return x[has].astype(float), batches.array(name)[has]

    @property
    def window(self) -> int:
        """Batches in a rolling mean: a tenth of an epoch."""
        return max(1, round(_steps_per_epoch(self.history) / SMOOTH_EPOCHS))

    @property
    def resumed_at(self) -> list[float]:
        """When each resumed segment started (Unix seconds): time lines break there."""
        return [r["t"] for r in self.history.runs[1:] if "t" in r]

    def over_time(self, records, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(seconds since the start, value) of a field of time-stamped records; NaN
        where a resumed segment starts, so no line is drawn across the pause."""
        table = _table(records)
        has = table.has(name) & table.has("t")
        t, y = table.array("t")[has], table.array(name)[has]
        cut = np.unique(np.searchsorted(t, self.resumed_at))
        cut = cut[(cut > 0) & (cut < len(t))]
        return np.insert(t, cut, np.nan) - self.t0, np.insert(y, cut, np.nan)

    def rates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(seconds since the start, samples/s, % of the time waiting for data) after
        each batch, over the wall time of the last :attr:`window` batches of its epoch
        (the definitions of the epoch records). NaN separates epochs and segments: no
        line is drawn across validation or a pause. (Computed once: two panels draw them.)"""
        return self._rates

    @cached_property
    def _rates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        batches = _table(self.history.batches)
        if not len(batches):
            return np.array([]), np.array([]), np.array([])
        t = batches.array("t")
        columns = [t, _zero(batches.array("size")), _zero(batches.array("wait_s")), _zero(batches.array("step_s"))]
        key = np.vstack([batches.ints("epoch"), np.searchsorted(self.resumed_at, t)])
        starts = np.flatnonzero(np.r_[True, (key[:, 1:] != key[:, :-1]).any(axis=0)])
        parts = [_epoch_rates(*(c[a:b] for c in columns), self.window, self.t0)
                 for a, b in zip(starts, np.r_[starts[1:], len(t)], strict=True)]
        gap = np.full((3, 1), np.nan)
        joined = np.concatenate([c for part in parts for c in (part, gap)][:-1], axis=1)
        return joined[0], joined[1], joined[2]


def _table(records) -> Table:
    return records if isinstance(records, Table) else Table.from_records(list(records))


def _zero(values: np.ndarray) -> np.ndarray:
    """A missing size or time counts as 0, as the epoch records count them."""
    return np.where(np.isnan(values), 0.0, values)


def _epoch_rates(t, size, wait, step, window: int, t0: float) -> np.ndarray:
    began = t - wait - step
    first = np.maximum(np.arange(len(t)) - window + 1, 0)
    wall = t - began[first]
    wall = np.where(wall > 0, wall, np.nan)  # no time measured: no rate
    with np.errstate(over="ignore", invalid="ignore"):  # (a hand-edited 1e308 s: missing, not an axis of inf)
        rates = np.vstack([_window_sums(size, first) / wall, 100 * _window_sums(wait, first) / wall])
    return np.vstack([t - t0, np.where(np.isfinite(rates), rates, np.nan)])


def _window_sums(values: np.ndarray, first: np.ndarray) -> np.ndarray:
    """values[first[i]] + ... + values[i], for each i."""
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    return cumulative[1:] - cumulative[first]


def _arrays(rows) -> tuple[np.ndarray, np.ndarray]:
    if not rows:
        return np.array([]), np.array([])
    x, y = zip(*rows, strict=True)
    return np.asarray(x, dtype=float), np.array([_number(v) for v in y], dtype=float)


def _number(value) -> float:
    """A value as drawn: a number, or NaN (missing) for a null, a list, an object, a
    number beyond a float's range."""
    try:
        return float(value) if is_number(value) else np.nan
    except OverflowError:
        return np.nan


def _steps_per_epoch(history: History) -> int:
    steps = [r.get("data", {}).get("steps_per_epoch") for r in history.runs]
    known = [s for s in steps if s]
    if known:
        return known[-1]
    batches = _table(history.batches)
    return int(batches.ints("batch").max(initial=0)) + 1


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of each value and the ``window - 1`` before it, NaNs left out.

    >>> rolling_mean(np.array([1.0, 3.0, np.nan, 5.0]), 2).tolist()
    [1.0, 2.0, 3.0, 5.0]
    """
    first = np.maximum(np.arange(len(values)) - window + 1, 0)
    valid = ~np.isnan(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _window_sums(np.where(valid, values, 0.0), first) / _window_sums(valid.astype(float), first)


def envelope(x: np.ndarray, y: np.ndarray, columns: int = COLUMNS) -> tuple[np.ndarray, np.ndarray]:
    """A long line as drawn: the smallest and the largest ``y`` in each of ``columns``
    equal spans of ``x`` (two points each), so a spike of one batch in millions stays
    visible; a NaN in ``x`` (a break in the line) stays a break. Short lines are whole.

    >>> envelope(np.arange(8.0), np.array([0, 5, 1, 1, 2, -3, 2, 2.0]), columns=2)[1].tolist()
    [0.0, 5.0, -3.0, 2.0]
    """
    if len(x) <= 2 * columns:
        return x, y
    finite = ~np.isnan(x)
    low, high = np.nanmin(x), np.nanmax(x)
    edges = np.linspace(low, high, columns + 1)[1:-1]
    parts_x, parts_y = [], []
    breaks = np.flatnonzero(~finite)
    for a, b in zip(np.r_[0, breaks + 1], np.r_[breaks, len(x)], strict=True):
        if b <= a:
            continue
        px, py = x[a:b], y[a:b]
        starts = np.unique(np.r_[0, np.searchsorted(px, edges)])
        starts = starts[starts < len(px)]
        ends = np.r_[starts[1:], len(px)] - 1
        with np.errstate(invalid="ignore"):
            lo, hi = np.fmin.reduceat(py, starts), np.fmax.reduceat(py, starts)
        parts_x.append(np.column_stack([px[starts], px[ends]]).ravel())
        parts_y.append(np.column_stack([lo, hi]).ravel())
        parts_x.append([np.nan])
        parts_y.append([np.nan])
    if not parts_x:
        return x[:0], y[:0]
    return np.concatenate(parts_x[:-1]), np.concatenate(parts_y[:-1])


def loss_names(series: Sequence[Series]) -> list[str]:
    """The losses the loss panels draw: ``loss``, or, for runs of several models that
    record theirs under prefixes (a GAN's ``d_loss`` and ``g_loss``), each of those."""
    names = epoch_metrics(e for s in series for e in s.history.epochs)
    if "loss" in names or not names:
        return ["loss"]
    found = [n for n in names if n.endswith("loss") and not n.startswith("val_")]
    return found or ["loss"]


def metric_names(series: Sequence[Series], chosen: Sequence[str] | None = None) -> list[str]:
    """The metrics other than the losses that get a panel each (``val_x`` is drawn with
    ``x``, or alone when there is no ``x``); ``chosen`` picks some (by name, with or
    without ``val_``) in the order given."""
    names = epoch_metrics(e for s in series for e in s.history.epochs)
    losses = loss_names(series)
    bases = [n for n in dict.fromkeys(n.removeprefix("val_") for n in names) if n not in losses]
    if chosen is None:
        return bases
    picked = list(dict.fromkeys(n.removeprefix("val_") for n in chosen))
    unknown = [n for n in picked if n not in bases and n not in losses]
    if unknown:
        raise BadInput(f"--metrics {' '.join(chosen)}: no epoch metric named {', '.join(unknown)} "
                       f"(the histories have {', '.join([*losses, *bases]) or 'none'})")
    return [n for n in picked if n not in losses]


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
        history.epochs = [numeric_view(r) for r in history.epochs]  # the tables give numbers already
        history.runs = [numeric_view(r) for r in history.runs]  # (a model given as text: its name left out)
        if not history.runs:
            found = len(history.epochs) + len(history.batches) + len(history.system)
            problem = (f"{found} record(s) but no run record before them" if found
                       else f"{history.skipped} line(s) are not pipetrain records" if history.skipped else "it is empty")
            raise BadInput(f"{path}: no run to plot ({problem})")
        series.append(Series(run_name(path, history.runs[0]), history, history.runs[0]["t"]))
        folders.append(str(path.parent if path.name == "history.jsonl" else path))
    names = [s.label for s in series]
    for i, s in enumerate(series):  # runs of the same name: told apart by their path as given
        if names.count(s.label) > 1:
            s.label = folders[i] if folders.count(folders[i]) == 1 else f"{folders[i]} #{i + 1}"
    return series


# -- the picture ------------------------------------------------------------------------------

def plot(paths: Sequence[str | os.PathLike], output: str | os.PathLike, *, metrics: Sequence[str] | None = None,
         log: bool = False) -> Path:
    """Draw the histories at ``paths`` into ``output`` (PNG, SVG or PDF, by its suffix):
    every metric, or the ``metrics`` named; ``log``: losses and metrics on a log scale."""
    figure_class = _matplotlib()
    output = Path(output)
    if not output.parent.is_dir():
        raise BadInput(f"{output}: cannot write the plot ({output.parent} is not a folder)")
    from pipetrain.runfolder import HDF5, HISTORY, describe

    kind = describe(output)  # a history or data given as -o (one of the histories plotted, even) was replaced
    if kind in (HISTORY, HDF5):
        raise BadInput(f"{output}: is {kind}, not a picture; give the plot another path")
    figure = draw(load(paths), figure_class, metrics=metrics, log=log)
    formats = figure.canvas.get_supported_filetypes()
    if output.suffix.lower().lstrip(".") not in formats:
        raise BadInput(f"{output}: unknown picture format {output.suffix!r} (use .png, .svg or .pdf)")
    try:
        figure.savefig(output, dpi=110)
    except OSError as e:  # a folder of that name, no permission, a full disk: the flag's fault, not the plot's
        raise BadInput(f"{output}: cannot write the plot: {e.strerror or e}") from None
    return output


def _matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise BadInput('pipetrain plot needs matplotlib: pip install "pipetrain[plot]"') from None
    return Figure


def draw(series: Sequence[Series], figure_class, *, metrics: Sequence[str] | None = None, log: bool = False):
    """The figure: a grid of panels, two wide, one colour per run; the epoch panels
    share one x-range, the time panels another."""
    losses = loss_names(series)
    metrics = metric_names(series, metrics)[:MAX_METRIC_PANELS]
    panels = ["loss", "batch_loss", *metrics, *TIME_PANELS]
    rows = (len(panels) + 1) // 2
    figure = figure_class(figsize=(13, 3.2 * rows + 1.2), layout="constrained")
    axes = figure.subplots(rows, 2, squeeze=False).ravel()
    colors = run_colors(len(series))
    unit, scale = time_unit(series)
    epoch_axes, time_axes = [], []
    for ax, panel in zip(axes, panels, strict=False):
        if panel == "loss":
            title = "Loss per epoch" if losses == ["loss"] else f"Losses per epoch ({', '.join(losses)})"
            _epoch_panel(ax, series, colors, losses, title, log)
        elif panel == "batch_loss":
            _batch_loss_panel(ax, series, colors, losses, log)
        elif panel in metrics:
            _epoch_panel(ax, series, colors, [panel], f"{panel.replace('_', ' ').capitalize()} per epoch", log)
        else:
            _time_panel(ax, series, colors, panel, unit, scale)
            time_axes.append(ax)
            continue
        epoch_axes.append(ax)
    for group in (epoch_axes, time_axes):  # one x-range for each kind of panel
        for ax in group[1:]:
            ax.sharex(group[0])
    if time_axes:
        time_axes[0].set_xlim(0, max(max((s.duration_s for s in series), default=0.0) / scale, 1e-9) * 1.02)
    if epoch_axes:  # from the start (the batch panel's 0) to the last epoch of any run
        last = max((float(np.nanmax(s.epoch_values(n)[0], initial=0.0)) for s in series for n in [*losses, *metrics]),
                   default=1.0)
        epoch_axes[0].set_xlim(0, max(last, 1.0) * 1.02)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    figure.suptitle(_title(series), fontsize=14, fontweight="bold")
    _legend(figure, series, colors)
    for text in figure.findobj(lambda o: hasattr(o, "get_text") and hasattr(o, "set_text")):
        _drawable(text)
    return figure


def _drawable(text) -> None:
    """Matplotlib refuses a lone surrogate (a run folder named in bytes that are not
    UTF-8, as Python decodes it; a hand-edited metric name): such text is drawn with
    the byte replaced, any other surrogate escaped (cli's error handler)."""
    value = text.get_text()
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            text.set_text(value.encode("utf-8", "pipetrain.shown").decode("utf-8", "replace"))


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, loc="left", fontweight="bold", fontsize=11.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


MARKERS = "osD^v<>ph*"  # one per loss of a run with several (d_loss, g_loss)


def _epoch_panel(ax, series, colors, names: Sequence[str], title: str, log: bool = False) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    for s, color in zip(series, colors, strict=True):
        for name, marker in zip(names, MARKERS * len(names), strict=False):
            for key, style in ((name, TRAIN_STYLE), (f"val_{name}", VAL_STYLE)):
                x, y = s.epoch_values(key)
                if len(x):
                    ax.plot(x, y, color=color, marker=marker, markersize=4, **style)
    _style(ax, title, "epoch", names[0] if len(names) == 1 else "loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(names) > 1:  # which line is which loss: by its marker
        ax.legend([Line2D([], [], color="0.3", marker=m, **TRAIN_STYLE) for m in MARKERS[:len(names)]], names,
                  frameon=False, fontsize=9)
    _log_scale(ax, log)


def _batch_loss_panel(ax, series, colors, names: Sequence[str] = ("loss",), log: bool = False) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    styles = ["-", (0, (1, 1)), (0, (3, 1, 1, 1)), (0, (6, 2))]  # one per loss of a run with several
    for s, color in zip(series, colors, strict=True):
        for name, line in zip(names, styles * len(names), strict=False):
            x, y = s.batch_losses(name)
            if len(x):
                ax.plot(*envelope(x, y), color=color, alpha=0.15, linewidth=0.6)
                ax.plot(*envelope(x, rolling_mean(y, s.window)), color=color, linewidth=1.8, linestyle=line)
    what = "Training loss" if list(names) == ["loss"] else "Training losses"
    _style(ax, f"{what} per batch (faint), mean over 1/{SMOOTH_EPOCHS} epoch", "epoch", "loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(names) > 1:
        ax.legend([Line2D([], [], color="0.3", linewidth=1.8, linestyle=line) for line in styles[:len(names)]],
                  names, frameon=False, fontsize=9)
    _log_scale(ax, log)


def _log_scale(ax, log: bool) -> None:
    """A log y-axis when asked and every value drawn is above zero (else it stays linear)."""
    if not log:
        return
    values = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]
    values = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
    if len(values) and (values > 0).all():
        ax.set_yscale("log")


def run_colors(n: int) -> list:
    """A colour per run that stays distinguishable beyond ten: matplotlib's ten, then
    twenty paired shades, then evenly spaced hues."""
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    from matplotlib import colormaps

    if n <= 20:
        cmap = colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    cmap = colormaps["turbo"]
    return [cmap(0.05 + 0.9 * i / (n - 1)) for i in range(n)]


TIME_PANELS = {
    # panel: title, y label, where the values come from
    "throughput": (f"Throughput (over 1/{SMOOTH_EPOCHS} epoch)", "samples/s", "rates"),
    "input_bound": (f"Input-bound: time waiting for data (over 1/{SMOOTH_EPOCHS} epoch)", "% of wall time", "rates"),
    "rss_mb": ("Process memory (RSS)", "MB", "system"),
    "sys_available_mb": ("System memory available", "MB", "system"),
    "cpu_pct": ("CPU use of the process", "% of one core", "system"),
}


def by_process(records) -> dict[int | None, Table]:
    """System records by the process that sampled them (a distributed run tags each)."""
    table = _table(records)
    if not len(table):
        return {}
    process = np.where(table.has("process"), table.array("process"), np.nan)
    groups: dict[int | None, Table] = {}
    if np.isnan(process).any():
        groups[None] = table.take(np.flatnonzero(np.isnan(process)))
    for value in np.unique(process[~np.isnan(process)]).tolist():
        groups[int(value)] = table.take(np.flatnonzero(process == value))
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
            alpha = 1.0 if process is None else min(0.9, max(0.35, 0.9 - 0.15 * process))  # each process a shade
            ax.plot(*envelope(t / scale, y), color=color, marker=marker, markersize=3, alpha=alpha, **TRAIN_STYLE)
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
    model, data, models = run.get("model") or {}, run.get("data") or {}, run.get("models") or {}
    parts = [f"pipetrain: {s.label}"]
    if len(models) > 1:
        parts.append("models " + ", ".join(models))
    elif model.get("name"):
        parts.append(f"{model['name']}" + (f" ({model['params']:,} params)" if model.get("params") else ""))
    if data.get("rows"):
        parts.append(f"{data['rows']:,} rows, batch {data.get('batch_size')}")
    end = s.history.end
    parts.append(f"{end['status']} after {end.get('epochs', 0)} epoch(s)" if end else "running")
    return " | ".join(parts)


def cmd_plot(args) -> int:
    """``pipetrain plot FILE... -o OUT.png [--metrics NAME...] [--log]``."""
    output = plot(args.files, args.output, metrics=args.metrics, log=args.log)
    print(f"wrote {output}")
    return EXIT_OK
