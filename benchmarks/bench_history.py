"""Long histories: `tail`, `read_history`, `to_pandas()` and `plot` at 20k, 200k and 2M
batch records, against counting the file's lines in Python.

    python benchmarks/bench_history.py [--sizes 20000 200000 2000000] [--repeat 3]
                                       [--folder /tmp/pipetrain-histories]
                                       [--out benchmarks/results/history.json]

The histories are written as a run writes them (history_maker.py, through HistoryWriter,
with the history's index: epochs of 10,000 batches, a system sample every 200 batches,
one resume in the middle after a torn line) and kept in --folder for the next time.
``tail_noindex`` and ``read_epochs_noindex`` are ``tail`` and ``read_epochs`` with the
index out of the way (the scan they fall back to). Each operation runs in a fresh process
(pipetrain compiled to bytecode first, as installed); its time is measured inside that
process from after the imports (``s``, and ``cpu_s``: the CPU time it used, which a busy
shared machine disturbs less) and from outside
(``process_s``: start, imports and all), with the process's peak RSS (``ru_maxrss``)
and the CPU time of the helper processes it made (``helpers_cpu_s``: read_history's
parts; on a busy machine ``s`` is at least the larger of ``cpu_s`` and that) and the
largest one's peak RSS (``helper_peak_rss_mb``, pages shared with this process counted
in both). ``imports`` only imports what the readers import (pandas, pipetrain's reader; its ``s``
is the imports' time): a Python with them holds about 80 MB before it reads a byte, 19x
a 20k history's file,
so the readers' memory is also given beyond that (``x_file_above_imports``: the peak
less the imports' peak, over the file's size).
Goals: tail <= 1 s and the same at every size; read_history and to_pandas <= 10x the line
count's time and <= 2x the file size in memory; plot <= 10 s at 2M.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READERS = ("read_all", "read_epochs", "read_epochs_noindex", "to_pandas")
OPERATIONS = ["lines", "imports", "tail", "tail_noindex", "tail_plain", "read_all", "read_epochs", "read_epochs_noindex",
              "to_pandas", "plot"]


def child(operation: str, path: str) -> None:
    """One operation in this process; print its time and peak RSS as JSON."""
    sys.path.insert(0, str(ROOT))
    import resource

    if operation.endswith("_noindex"):  # as if the history had no index: the scan readers fall back to
        from pipetrain import index

        index.read = lambda *args, **kwargs: index.Known()
        operation = operation.removesuffix("_noindex")
    start, cpu = time.perf_counter(), time.process_time()
    if operation == "lines":
        n = 0
        with open(path, "rb") as f:
            for _ in f:
                n += 1
    elif operation in ("tail", "tail_plain"):
        from rich.console import Console

        from pipetrain import tail

        with open(os.devnull, "w") as out:
            start, cpu = time.perf_counter(), time.process_time()
            if operation == "tail":  # the view on a terminal, once
                tail.tail_once(Path(path), Console(file=out, force_terminal=True, width=100, height=50))
            else:  # into a pipe: the plain lines
                tail.tail_plain(Path(path), follow=False, poll=0.25, out=out)
    elif operation == "imports":  # what read_all holds before it reads: the memory the file's data adds to
        import pandas  # noqa: F401

        import pipetrain.reading  # noqa: F401
    elif operation in ("read_all", "read_epochs", "to_pandas"):
        import pandas  # noqa: F401 - imported before the clock, as a user has it

        import pipetrain

        start, cpu = time.perf_counter(), time.process_time()
        if operation == "read_epochs":
            h = pipetrain.read_history(path, tables=("epochs",))
        else:
            h = pipetrain.read_history(path)
            if operation == "to_pandas":
                h.to_pandas()
    elif operation == "plot":
        import matplotlib  # noqa: F401

        from pipetrain.plot import plot

        with tempfile.TemporaryDirectory() as tmp:
            start, cpu = time.perf_counter(), time.process_time()
            plot([path], Path(tmp) / "plot.png")
    else:
        raise SystemExit(f"unknown operation {operation}")
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    helpers = resource.getrusage(resource.RUSAGE_CHILDREN)  # read_history's helper processes (none before)
    print(json.dumps({"s": round(seconds, 4), "cpu_s": round(cpu_s, 4), "helpers_cpu_s":
                      round(helpers.ru_utime + helpers.ru_stime, 3), "peak_rss_mb": round(peak, 1),
                      "helper_peak_rss_mb": round(helpers.ru_maxrss / 1024, 1)}))


def compile_package() -> None:
    """pipetrain's modules as bytecode, as an installed package has them (pip compiles at
    install): a machine that sets PYTHONDONTWRITEBYTECODE would otherwise compile each lazily
    imported module from source inside the clock, 15-20 ms that no user pays."""
    import compileall

    compileall.compile_dir(ROOT / "pipetrain", quiet=1)


def run_child(operation: str, path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", operation, str(path)], env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{operation} on {path}: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - start, 3)
    return result


def history_path(folder: Path, batches: int) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    from history_maker import write_history

    from pipetrain.index import path_for

    path = folder / f"history-{batches}.jsonl"
    done = folder / f"history-{batches}.done"
    if not done.exists() or not path_for(path).exists():  # (histories written before the index: again)
        print(f"writing {path} ...", flush=True)
        write_history(path, batches)
        done.write_text(str(path.stat().st_size))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000, 2_000_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--operations", nargs="+", default=OPERATIONS, choices=OPERATIONS)
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "pipetrain-histories"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "history.json"))
    parser.add_argument("--child", nargs=2, metavar=("OPERATION", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    compile_package()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "load_1min_at_start": round(os.getloadavg()[0], 2)},
               "repeat": args.repeat, "sizes": {}}
    for size in args.sizes:
        path = history_path(folder, size)
        runs: dict[str, list[dict]] = {op: [] for op in args.operations}
        for _ in range(args.repeat):  # operations side by side in each round
            for op in args.operations:
                runs[op].append(run_child(op, path))
        row = {"batches": size, "file_mb": round(path.stat().st_size / 2**20, 1), "operations": {}}
        for op, found in runs.items():
            row["operations"][op] = {k: statistics.median(r[k] for r in found) for k in found[0]}
        lines = row["operations"].get("lines", {})
        for op, figures in row["operations"].items():
            if lines:
                figures["x_lines"] = round(figures["s"] / lines["s"], 2)
                figures["cpu_x_lines"] = round(figures["cpu_s"] / max(lines["cpu_s"], 1e-3), 2)
            figures["x_file_size"] = round(figures["peak_rss_mb"] / row["file_mb"], 2)
            if op in READERS and "imports" in row["operations"]:  # the memory the data takes, beyond the imports'
                above = figures["peak_rss_mb"] - row["operations"]["imports"]["peak_rss_mb"]
                figures["x_file_above_imports"] = round(above / row["file_mb"], 2)
        results["sizes"][str(size)] = row
        print(f"\n{size:,} batch records, {row['file_mb']} MB")
        print(f"{'operation':<12} {'s':>8} {'cpu s':>8} {'helpers':>8} {'process s':>10} {'x lines':>8} "
              f"{'cpu x':>7} {'peak MB':>8} {'x file':>7} {'x file above imports':>21}")
        for op, f in row["operations"].items():
            print(f"{op:<12} {f['s']:>8.3f} {f['cpu_s']:>8.3f} {f['helpers_cpu_s']:>8.3f} {f['process_s']:>10.3f} "
                  f"{f.get('x_lines', float('nan')):>8.2f} {f.get('cpu_x_lines', float('nan')):>7.2f} "
                  f"{f['peak_rss_mb']:>8.1f} {f['x_file_size']:>7.2f} {f.get('x_file_above_imports', ''):>21}",
                  flush=True)
    results["machine"]["load_1min_at_end"] = round(os.getloadavg()[0], 2)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
