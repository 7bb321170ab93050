"""``pipetrain tail``: watch a run from its history file, live or once, as a view or raw.

One loop reads the file (:func:`updates`: complete lines only; first the records that
decide the view, found from the end without parsing every batch line; then each line
as it is appended; waiting for the file, starting over if it is replaced) and feeds a :class:`~pipetrain.progress.RunState`;
views draw that state:

- :func:`dashboard`: the run (model, data, config, host), the epoch in progress (the same
  bar ``pipetrain train`` shows), the latest batch, the finished epochs, throughput,
  memory and CPU. On a terminal it redraws in place (``--follow``) or prints once.
- plain lines (into a pipe or a file): the lines ``pipetrain train`` itself prints,
  from :func:`pipetrain.progress.lines_for` - the run, one per epoch, the summary.
- ``--raw``: the complete lines of the file as they are, copied as bytes.

Example (a shell)::

    pipetrain tail runs/exp1 --follow          # live; exits 0 after the run's end
    pipetrain tail runs/exp1 | grep Epoch      # one line per finished epoch
    pipetrain tail runs/exp1 --raw --follow | jq -c 'select(.type == "epoch")'
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from pipetrain import index, scan
from pipetrain.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, BadInput
from pipetrain.history import Follower, HistoryPathError, history_file, resume_point, run_name
from pipetrain.progress import (
    BATCH_KEYS,
    RunState,
    backend_text,
    batch_text,
    best_text,
    ending_text,
    epoch_bar,
    epoch_metrics,
    fmt,
    fold,
    fmt_duration,
    fmt_rate,
    is_number,
    lines_for,
    metric_items,
    position_line,
)
from pipetrain.reading import last_look
from pipetrain.runfolder import writer

STALE_S = 60.0  # a running job silent for this long is flagged in the live view
DRAW_S = 0.25  # the live view redraws at most this often while catching up on a long file
CONFIG_SHOWN_ELSEWHERE = {"data", "val", "validation", "history", "argv", "epochs", "batch_size",
                          "shuffle", "seed"}
SEP = " · "
STATUS_STYLE = {"completed": "bold green", "stopped": "bold yellow", "interrupted": "bold yellow",
                "failed": "bold red"}
# `tail --follow` exits with the run's status, so that a script can wait on it.
EXIT_FOR_STATUS = {"completed": EXIT_OK, "stopped": EXIT_OK, "failed": EXIT_FAILED, "interrupted": EXIT_INTERRUPTED}


def exit_status(end: dict | None) -> int:
    """The exit status for a run that ended with ``end``: 0 completed or stopped, 1
    failed, 130 interrupted (0 without an end record: a view of a running job)."""
    status = (end or {}).get("status")
    return EXIT_FOR_STATUS.get(status, EXIT_OK) if isinstance(status, str) else EXIT_OK  # (a list: not a key)


def gone_text(run: dict, path: Path) -> str:
    """What to say of a run whose process is gone without writing its end record."""
    process = run.get("process") or {}
    where = path.parent if path.name == "history.jsonl" else path
    again = (f"pipetrain train --resume {where}" if (run.get("config") or {}).get("cli")
             else "run it again with resume=True (or 'auto')")
    return (f"the run's process (pid {process.get('pid')} on {process.get('host')}) is gone without an end "
            f"record (killed?); resume with: {again}")


# -- reading ------------------------------------------------------------------------------

@dataclass
class Update:
    """The state after one look at the file, and what that look added."""

    state: RunState
    lines: list[str] = field(default_factory=list)  # the plain lines of the new records
    waiting: bool = False  # the file does not exist yet
    restarted: bool = False  # the file was truncated or replaced: the state starts over
    at_eof: bool = True
    writer: str = "unknown"  # the process writing the run: "alive", "gone" or "unknown" (elsewhere)


def updates(path: Path, *, follow: bool = True, poll: float = 0.25) -> Iterator[Update]:
    """Look at the history file until the run ends (``follow``) or until its end now.

    The first look starts from the end (:func:`pipetrain.reading.last_look`): the state
    is fed the records that decide it - every record but the batches and the system
    samples, the samples that decide it (the latest, the peak RSS) and the batches that
    still count (the latest, and its epoch's after the last resume) - so a long history
    costs what the view shows. Each later look feeds every record appended
    since. Yields after each look; sleeps ``poll`` seconds between looks that found
    nothing more to read. A run without its end record whose process is known to be
    gone (on this host) ends the updates too (``writer`` says "gone"). Raises
    :class:`BadInput` for a file that holds lines but no records.
    """
    state = RunState()
    lines_seen = records_seen = 0
    caught_up = False
    with Follower(path) as follower:
        while True:
            restarts = follower.restarts
            present = follower.look()
            restarted = follower.restarts != restarts
            if restarted:
                state, lines_seen, records_seen, caught_up = RunState(), 0, 0, False
            update = Update(state, waiting=not follower.exists, restarted=restarted)
            if present and not caught_up:
                stop = scan.line_end(follower.fd, os.fstat(follower.fd).st_size)
                records, not_records = last_look(follower.fd, stop, index.path_for(path))
                if not records and not_records:
                    raise BadInput(f"{path}: not a pipetrain history (no pipetrain records in {not_records} line(s))")
                ended = False
                # The batches of the epoch in progress are summed at once, and so are the
                # system samples between two other records (neither touches the other's
                # figures): a long run's view costs what it shows.
                epoch_batches: list[dict] = []
                samples: list[dict] = []
                for _, record in records:
                    if record["type"] in ("batch", "system"):
                        (epoch_batches if record["type"] == "batch" else samples).append(record)
                        continue
                    state.add_samples(samples)
                    state.add_epoch_batches(epoch_batches)
                    epoch_batches, samples = [], []
                    state.add(record)
                    update.lines += lines_for(record, state, path)
                    if record["type"] in ("end", "run"):
                        ended = record["type"] == "end"
                state.add_samples(samples)
                state.add_epoch_batches(epoch_batches)
                if records:
                    state.last_t = records[-1][1]["t"]  # the latest record's time, whatever its type
                records_seen += len(records)
                follower.skip_to(stop, ended)
                caught_up = True
            new = follower.read()
            update.at_eof = follower.at_eof
            for line, record in new:
                lines_seen += bool(line.strip())
                if record is not None:
                    records_seen += 1
                    state.add(record)
                    update.lines += lines_for(record, state, path)
            if follower.at_eof and lines_seen and not records_seen:
                raise BadInput(f"{path}: not a pipetrain history (no pipetrain records in {lines_seen} line(s))")
            if follower.at_eof and state.runs and state.end is None:
                update.writer = writer(state.run, path)
            yield update
            if follower.finished or (not follow and follower.at_eof) or update.writer == "gone":
                return
            if follower.at_eof:
                time.sleep(poll)


# -- the dashboard ------------------------------------------------------------------------------

def dashboard(state: RunState, path: Path, *, now: float | None = None, waiting: bool = False,
              max_epochs: int | None = None, writer: str = "unknown", width: int | None = None):
    """The whole view of ``state``: a pure function of it (and of ``now``, for the
    'no new record for ...' warning, and of ``writer``: whether the run's process is
    "alive", "gone" or "unknown"), so a known history always draws the same. ``width``:
    the columns the finished-epochs table must fit in."""
    if waiting:
        return Text(f"Waiting for {path} to appear...", style="yellow")
    if not state.runs:
        return Text(f"Waiting for the first record of {path}...", style="yellow")
    parts = [run_panel(state, path), progress_view(state, now, writer, path)]
    if state.batch is not None and state.current_epoch is not None:
        parts.append(batch_line(state.batch, state.steps, width))
    if state.epochs:
        parts.append(epochs_table(state, max_epochs, width))
    parts.append(resources(state))
    return Group(*parts)


def _grid() -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    return grid


def run_panel(state: RunState, path: Path) -> Panel:
    first, run = state.runs[0], state.run
    grid = _grid()
    model, models = run.get("model") or {}, run.get("models") or {}
    if len(models) > 1:  # several models (a GAN): each by its name in the run, with its size
        params = run.get("model_params") or {}
        grid.add_row("models", SEP.join(f"{name}" + (f" ({params[name]:,} params)" if params.get(name) else "")
                                        for name in models))
    elif model.get("name"):
        params = f" ({model['params']:,} params)" if model.get("params") else ""
        grid.add_row("model", f"{model['name']}{params}")
    grid.add_row("data", data_text(run))
    config = config_text(run.get("config") or {})
    if config:
        grid.add_row("config", config)
    grid.add_row("host", host_text(run.get("host") or {}))
    started = f"{first.get('started', '?')}{SEP}elapsed {fmt_duration(state.elapsed_s)}"
    resumes = [r for r in state.runs if resume_point(r) is not None]
    if resumes:
        at = resume_point(resumes[-1])
        started += f"{SEP}resumed {len(resumes)}x, last at {batch_text(*at, state.steps)}"
    grid.add_row("started", started)
    title = f"[bold]{run_name(path, first)}[/]  {first.get('run', '')}"
    return Panel(grid, title=title, title_align="left", subtitle=str(path), subtitle_align="right")


def data_text(run: dict) -> str:
    data = run.get("data") or {}
    files = data.get("files") or []
    rows = f"{data.get('rows') or 0:,} rows in {_files(files)}"
    if isinstance(data.get("row_range"), list) and len(data["row_range"]) == 2:
        rows = f"rows {data['row_range'][0]:,}-{data['row_range'][1]:,} of {_files(files)}"
    parts = [rows, f"batch {data.get('batch_size')}",
             f"{data.get('steps_per_epoch')} steps/epoch",
             f"shuffle {data.get('shuffle')} (seed {data.get('seed')})"]
    config = run.get("config") or {}
    split = (config.get("cli") or {}).get("val_split")
    if split:
        parts.append(f"validation the last {split:g} of the rows")
    elif config.get("validation"):
        parts.append(f"validation {_files(config['validation'])}")
    return SEP.join(parts)


def _files(paths: list) -> str:
    """One file by its name, several by their number.

    >>> _files(["/d/train.h5"]), _files(["a.h5", "b.h5"])
    ('train.h5', '2 files')
    """
    return Path(paths[0]).name if len(paths) == 1 else f"{len(paths)} files"


def config_text(config: dict) -> str:
    """The settings not shown elsewhere, those with a short value."""
    shown = [f"{k} {v}" for k, v in config.items()
             if k not in CONFIG_SHOWN_ELSEWHERE and v is not None and isinstance(v, (str, int, float, bool))]
    return SEP.join(shown)


def host_text(host: dict) -> str:
    parts = [host.get("hostname") or "?"]
    if host.get("cpus"):
        parts.append(f"{host['cpus']} CPUs")
    if host.get("memory_mb"):
        parts.append(f"{host['memory_mb']:,} MB")
    versions = [f"{name} {host[name]}" for name in ("python", "keras") if host.get(name)]
    if host.get("backend"):
        versions.append(backend_text(host))
    return SEP.join(parts + versions)


def progress_view(state: RunState, now: float | None, writer: str = "unknown", path: Path | None = None):
    """The epoch in progress with its bar, or how the run ended (and why), and its best
    epoch; a run whose process is gone says so instead of an ETA."""
    end = state.end
    best = best_text(state)
    if end is not None:
        status = end.get("status", "?")
        head, _, why = ending_text(end).partition(" - ")
        text = Text(f"{status}: ", style=STATUS_STYLE.get(status, "bold"))
        text.append(head.removeprefix(f"{status}: "))
        if why:
            text.append(f" - {why}", style="red" if end.get("error") else None)
        return Group(text, Text(best)) if best else text
    if writer == "gone":
        where = batch_text(*state.position, state.steps)  # the next batch
        text = Text(f"not running: {gone_text(state.run, path or Path('history.jsonl'))}", style="bold red")
        text.append(f"\nlast record {fmt_duration(now - state.last_t) if now and state.last_t else '?'} ago; "
                    f"it would go on at {where}", style="red")
        return Group(text, Text(best)) if best else text
    rows = [epoch_bar(state)]
    run_eta = state.run_eta_s
    if run_eta is not None:
        rows.append(Text(f"run ETA {fmt_duration(run_eta)}", style="cyan"))
    if now is not None and state.last_t is not None and now - state.last_t > STALE_S:
        rows.append(Text(f"no new record for {fmt_duration(now - state.last_t)}", style="bold yellow"))
    if best:
        rows.append(Text(best))
    return Group(*rows)


def batch_line(batch: dict, steps: int | None = None, width: int | None = None) -> Text:
    """The latest batch: where it is (counted from 1, as Keras does) and its own metrics;
    within ``width`` columns, cut between its parts."""
    step = f", step {int(batch['step']) + 1:,}" if is_number(batch.get("step")) else ""
    parts = [f"last batch  {batch_text(int(batch.get('epoch') or 0), int(batch.get('batch') or 0), steps)}{step}:",
             *(f"{k} {fmt(v)}" for k, v in metric_items(batch, BATCH_KEYS))]
    step, wait = batch.get("step_s"), batch.get("wait_s")
    timing = f"step {1000 * step:.1f} ms, waited {1000 * wait:.1f} ms" if is_number(step) and is_number(wait) else ""
    line = "  ".join([*parts, timing] if timing else parts)
    text = Text()
    for i, piece in enumerate(fold(line, width) if width else [line]):
        if i:
            text.append("\n")
        text.append(piece)
    text.stylize("bold", 0, len("last batch"))
    if timing:
        text.highlight_words([timing], style="dim")
    return text


def epochs_table(state: RunState, max_epochs: int | None = None, width: int | None = None) -> Table:
    """The finished epochs: metrics, time, samples/s, input-bound share (the latest
    ``max_epochs`` of them when given). Within ``width`` columns: headers break after
    their prefix (``val_`` / ``accuracy``), then the columns that fit least are left
    out, the caption naming them - never a header cut to ``accura…``."""
    epochs = state.epochs
    shown = epochs[-max_epochs:] if max_epochs else epochs
    names = epoch_metrics(epochs)
    columns: dict[str, list[str]] = {"epoch": [str(int(r.get("epoch") or 0) + 1) + ("*" if r.get("complete") is False
                                                                                   else "") for r in shown]}
    for name in names:
        columns[name] = [fmt(r.get(name)) for r in shown]
    columns["time"] = [f"{r['time_s']:.2f} s" if is_number(r.get("time_s")) else "-" for r in shown]
    columns["samples/s"] = [f"{r['samples_per_s']:,.0f}" if is_number(r.get("samples_per_s")) else "-" for r in shown]
    columns["input-bound"] = [f"{r['input_bound_pct']:.1f}%" if is_number(r.get("input_bound_pct")) else "-"
                              for r in shown]
    headers = {name: name for name in columns}
    left_out: list[str] = []
    if width is not None and _table_width(columns, headers) > width:
        headers = {name: _broken(name) for name in columns}
        best = state.best
        keep = {"epoch", "loss", "val_loss", *([best[0]] if best else [])}
        # Least needed first: the timing columns, then each metric with its val_ twin,
        # from the last (the first metric, the one the summary names, goes last).
        bases = list(dict.fromkeys(n.removeprefix("val_") for n in names if n not in ("loss", "val_loss")))
        order = ["input-bound", "samples/s", "time", *(n for b in reversed(bases) for n in (f"val_{b}", b))]
        for name in order:
            if _table_width(columns, headers) <= width:
                break
            if name not in keep:
                left_out.append(name)
                del columns[name], headers[name]
    earlier = f"{len(epochs) - len(shown)} earlier epoch(s) not shown" if len(shown) < len(epochs) else ""
    narrow = f"not shown at this width: {', '.join(reversed(left_out))}" if left_out else ""
    caption = "; ".join(p for p in (earlier, narrow) if p) or None
    table = Table(title="Finished epochs", title_justify="left", title_style="bold", caption=caption,
                  caption_justify="left", header_style="bold")
    for name in columns:
        table.add_column(headers[name], justify="right", no_wrap=True,
                         style="magenta" if name.startswith("val_") else None)
    for row in zip(*columns.values(), strict=True):
        table.add_row(*row)
    return table


def _broken(name: str) -> str:
    """A header in two lines after its prefix: 'val_accuracy' -> 'val_\\naccuracy'."""
    head, sep, rest = name.partition("_")
    return f"{head}{sep}\n{rest}" if sep and rest else name


def _table_width(columns: dict[str, list[str]], headers: dict[str, str]) -> int:
    """Columns a rich table of these cells takes: each column its widest line plus a
    border and a space either side, and the closing border."""
    return 1 + sum(3 + max([len(line) for line in headers[name].splitlines()] + [len(c) for c in cells])
                   for name, cells in columns.items())


def resources(state: RunState) -> Table:
    """Throughput, memory and CPU, latest and over the run."""
    grid = _grid()
    last = state.epochs[-1] if state.epochs else None
    speed = []
    if state.rate and state.current_epoch is not None:
        speed.append(f"now {fmt_rate(state.rate)}")
    if last is not None:
        speed.append(f"last epoch {fmt_rate(last.get('samples_per_s'))}")
        if is_number(last.get("input_bound_pct")):
            speed.append(f"input-bound {last['input_bound_pct']:.1f}%")
        if is_number(last.get("read_mb_s")):
            speed.append(f"read {last['read_mb_s']:,.1f} MB/s")
    if speed:
        grid.add_row("throughput", SEP.join(speed))
    if len(state.processes) > 1:
        grid.add_row("processes", processes_text(state))
    system = state.system
    if system is not None:
        grid.add_row("memory", memory_text(state))
        cpu = f"{fmt(system.get('cpu_pct'))}% of one core{SEP}{system.get('threads', '?')} threads"
        grid.add_row("cpu", cpu)
        gpu = system.get("gpu_mb")
        if isinstance(gpu, dict):
            grid.add_row("gpu", f"{gpu.get('current', 0):,.0f} MB (peak {gpu.get('peak', 0):,.0f} MB)")
    return grid


def processes_text(state: RunState) -> str:
    """A distributed run: how many processes, which waits most for data (an input-bound
    run is usually one slow host), which holds the most memory; from their latest samples."""
    latest = state.processes
    run = state.runs[-1] if state.runs else {}
    hosts = {h.get("process"): h.get("hostname") for h in (run.get("distributed") or {}).get("hosts", [])
             if isinstance(h, dict)}
    parts = [f"{len(latest)} processes"]
    for label, field, unit in (("most input-bound", "input_bound_pct", "%"), ("largest RSS", "rss_mb", " MB")):
        values = [(s[field], p) for p, s in latest.items() if is_number(s.get(field))]
        if values:
            value, p = max(values)
            parts.append(f"{label}: process {p} ({hosts.get(p) or '?'}) {value:,.1f}{unit}")
    return SEP.join(parts)


def memory_text(state: RunState) -> str:
    system = state.system or {}
    rss = system.get("rss_mb")
    parts = []
    if is_number(rss):
        growth = f", {rss - state.first_rss_mb:+,.0f} MB since start" if state.first_rss_mb is not None else ""
        parts.append(f"RSS {rss:,.0f} MB (peak {state.peak_rss_mb:,.0f} MB{growth})")
    if is_number(system.get("sys_available_mb")):
        parts.append(f"system available {system['sys_available_mb']:,.0f} MB")
    return SEP.join(parts)


# -- the command ------------------------------------------------------------------------------

def cmd_tail(args) -> int:
    """``pipetrain tail FILE [--follow] [--raw] [--poll S]``. With ``--follow``, exits
    with the run's status: 0 completed or stopped, 1 failed (or its process gone without
    an end record), 130 interrupted."""
    try:
        path = history_file(args.file)
    except HistoryPathError as e:
        raise BadInput(str(e)) from None
    if not args.follow and not path.exists():
        raise BadInput(f"{path}: no such history file (--follow waits for it)")
    try:
        if args.raw:
            return tail_raw(path, follow=args.follow, poll=args.poll)
        console = Console(highlight=False)
        if not console.is_terminal:
            return tail_plain(path, follow=args.follow, poll=args.poll)
        if args.follow:
            return tail_live(path, console, poll=args.poll)
        return tail_once(path, console)
    except BrokenPipeError:  # `pipetrain tail ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as e:  # a folder in the way, no permission: bad input, not a crash
        raise BadInput(f"{path}: cannot read the history: {e.strerror or e}") from None


def tail_raw(path: Path, *, follow: bool, poll: float, out=None) -> int:
    """The complete lines of the file as they are, copied as bytes (only the lines that
    can end a run are parsed); with ``follow``, until the run ends."""
    out = out or sys.stdout.buffer
    waiting_said = False
    with Follower(path) as follower:
        while True:
            restarts = follower.restarts
            data = follower.read_bytes()
            if not follower.exists and not waiting_said:
                print(f"pipetrain: waiting for {path} to appear", file=sys.stderr, flush=True)
                waiting_said = True
            if follower.restarts != restarts:
                _say_restarted(path)
            if data:
                out.write(data)
                out.flush()
            if follower.at_eof and follower.lines_seen and not follower.records_seen:
                raise BadInput(f"{path}: not a pipetrain history (no JSON records in {follower.lines_seen} line(s))")
            if follower.finished:
                return exit_status(follower.last_end) if follow else EXIT_OK
            if not follow and follower.at_eof:
                return EXIT_OK
            if follower.at_eof and follower.last_run is not None and writer(follower.last_run, path) == "gone":
                print(f"pipetrain: {gone_text(follower.last_run, path)}", file=sys.stderr, flush=True)
                return EXIT_FAILED
            if follower.at_eof:
                time.sleep(poll)


def _say_restarted(path: Path) -> None:
    print(f"pipetrain: {path} was truncated or replaced: reading it again from the top", file=sys.stderr, flush=True)


def tail_plain(path: Path, *, follow: bool, poll: float, out=None) -> int:
    """The plain lines, as ``pipetrain train`` prints them into a file; without
    ``follow``, those so far and, while the run goes on, where it is now."""
    out = out or sys.stdout
    update = None
    for update in announced(updates(path, follow=follow, poll=poll), path):
        for line in update.lines:
            print(line, file=out, flush=True)
    state = update.state if update is not None else None
    if state is not None and state.runs and state.end is None:
        if update.writer == "gone":
            if not follow:
                print(position_line(state) + "  (not running)", file=out, flush=True)
            print(f"pipetrain: {gone_text(state.run, path)}", file=sys.stderr, flush=True)
            return EXIT_FAILED if follow else EXIT_OK
        if not follow:
            print(position_line(state), file=out, flush=True)
    return exit_status(state.end if state is not None else None) if follow else EXIT_OK


def announced(stream: Iterator[Update], path: Path) -> Iterator[Update]:
    """The updates, saying on stderr (not in the output) when the file is not there yet
    and when it was truncated or replaced."""
    waiting_said = False
    for update in stream:
        if update.waiting and not waiting_said:
            print(f"pipetrain: waiting for {path} to appear", file=sys.stderr, flush=True)
            waiting_said = True
        if update.restarted:
            _say_restarted(path)
        yield update


def epochs_on_screen(console: Console) -> int:
    """How many finished epochs the dashboard lists: those that fit on the terminal
    beside the rest of the view (a long run's older epochs are counted in the caption,
    and its whole table is one `pipetrain tail FILE | cat` or `read_history` away)."""
    return max(3, console.height - 24)


def tail_once(path: Path, console: Console) -> int:
    """The dashboard of the history as it is now (on a terminal: the latest epochs that fit)."""
    update = Update(RunState())
    for update in updates(path, follow=False):
        pass
    console.print(dashboard(update.state, path, now=time.time(), max_epochs=epochs_on_screen(console),
                            writer=update.writer, width=console.width))
    return EXIT_OK


def tail_live(path: Path, console: Console, *, poll: float) -> int:
    """The dashboard, redrawn in place as records arrive, until the run ends."""
    with Live(console=console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False) as live:
        drawn = 0.0
        update = None
        for update in updates(path, follow=True, poll=poll):
            if update.at_eof or time.monotonic() - drawn > DRAW_S:
                view = dashboard(update.state, path, now=time.time(), waiting=update.waiting,
                                 max_epochs=epochs_on_screen(console), writer=update.writer, width=console.width)
                live.update(view, refresh=True)
                drawn = time.monotonic()
    if update is not None and update.writer == "gone":
        return EXIT_FAILED
    return exit_status(update.state.end if update is not None else None)


__all__ = ["cmd_tail", "dashboard", "updates", "Update"]
