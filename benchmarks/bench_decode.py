"""Read throughput of pipetrain's raw-chunk reader against h5py's own read, per filter and thread count.

    python benchmarks/bench_decode.py [--rows N] [--repeat R] [--data images|make-data] [--out results.json]

Writes W1-like files to a temporary folder (N x 784 float32, chunks of 256 rows, one file
per filter), then reads every row in 256-row batches with 1, 2 and 4 threads. The rows
(``--data``): ``images`` (the default), MNIST-like pixels that compress like images do; or
``make-data``, the rows `pipetrain make-data` writes and bench_train.py's W1 reads (class
prototypes plus noise in steps of 1/16, which gzip shrinks about 2.7x and inflates several
times slower):

- ``pipetrain``       ChunkReader.read(a, b), a new array per batch
- ``pipetrain out=``  ChunkReader.read(a, b, out=buf), one reused buffer per thread
- ``h5py slice``      dset[a:b]
- ``h5py read_direct`` dset.read_direct(buf, ...), one reused buffer per thread

All variants run side by side in one process, interleaved, `--repeat` times. The first
table shows medians of decoded MB/s per thread count; the 2-thread/1-thread ratio of the
medians and of the best passes (other processes only ever slow a pass down, so on a
shared machine the best passes show what the code can do); and how many CPUs the process
kept busy with 2 threads (process CPU time / wall time: 2.0 means both threads ran all
the time). A second table compares the gzip decoders on the gzip-1 file; a third shows
how long a second thread waits for the GIL and for h5py's lock while one thread reads.
The files sit in the page cache, so this measures decoding and copying, not the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipetrain import chunks, codecs  # noqa: E402

FEATURES = 784
CHUNK_ROWS = 256
BATCH = 256


def filter_options() -> dict[str, dict]:
    """h5py create_dataset options per filter; plugin filters only when hdf5plugin is installed."""
    options = {
        "none": {},
        "gzip-1": {"compression": "gzip", "compression_opts": 1},
        "shuffle+gzip-1": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
        "lzf": {"compression": "lzf"},
    }
    try:
        import hdf5plugin
    except ImportError:
        print("hdf5plugin not installed: skipping blosc, zstd, lz4", file=sys.stderr)
        return options
    options["blosc-lz4"] = dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=1))
    options["zstd"] = dict(hdf5plugin.Zstd(clevel=1))
    options["lz4"] = dict(hdf5plugin.LZ4())
    return options


def w1_like(rows: int, seed: int = 0) -> np.ndarray:
    """MNIST-like pixels: 80% zeros, the rest k/255. Random, but compresses like images do."""
    rng = np.random.default_rng(seed)
    data = np.empty((rows, FEATURES), np.float32)
    for start in range(0, rows, 10_000):
        block = data[start : start + 10_000]
        levels = rng.integers(1, 256, block.shape, dtype=np.uint8)
        levels[rng.random(block.shape) < 0.8] = 0
        np.divide(levels, 255, out=block, dtype=np.float32)
    return data


def make_data_rows(rows: int, folder: Path) -> np.ndarray:
    """The rows `pipetrain make-data` writes (bench_train.py's W1), uncompressed."""
    from pipetrain.synth import make_data

    path = make_data(folder / "make-data.h5", rows, (FEATURES,), compression="none", chunk_rows=CHUNK_ROWS)
    with h5py.File(path) as f:
        data = f["x"][:]
    path.unlink()
    return data


def write_files(folder: Path, rows: int, options: dict[str, dict], kind: str = "images") -> dict[str, Path]:
    data = w1_like(rows) if kind == "images" else make_data_rows(rows, folder)
    paths = {}
    for name, opts in options.items():
        path = folder / f"{name}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=data, chunks=(CHUNK_ROWS, FEATURES), **opts)
        paths[name] = path
    return paths


class Timer:
    """Runs one read function over all batches with a fixed pool, timing wall and CPU."""

    def __init__(self, threads: tuple[int, ...]):
        self.pools = {n: ThreadPoolExecutor(n) for n in threads}

    def run(self, read, batches, threads: int) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in self.pools[threads].map(read, batches):
            pass
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return wall, cpu / wall

    def close(self):
        for pool in self.pools.values():
            pool.shutdown()


def thread_buffer():
    """A per-thread output buffer getter, like a producer thread would keep."""
    local = threading.local()

    def get(rows: int) -> np.ndarray:
        buf = getattr(local, "buf", None)
        if buf is None or buf.shape[0] != rows:
            buf = local.buf = np.empty((rows, FEATURES), np.float32)
        return buf

    return get


def reading_into(reader):
    """read(batch) into a reused per-thread buffer."""
    buf = thread_buffer()
    return lambda batch: reader.read(*batch, out=buf(batch[1] - batch[0]))


def methods(dset, reader) -> dict:
    """name -> read(batch) for one dataset."""
    h5py_buf = thread_buffer()

    def read_direct(batch):
        a, b = batch
        buf = h5py_buf(b - a)
        dset.read_direct(buf, np.s_[a:b], np.s_[0 : b - a])

    found = {}
    if not isinstance(reader, str):
        found["pipetrain"] = lambda batch: reader.read(*batch)
        found["pipetrain out="] = reading_into(reader)
    found["h5py slice"] = lambda batch: dset[batch[0] : batch[1]]
    found["h5py read_direct"] = read_direct
    return found


def measure(paths, rows, repeat, threads, timer) -> list[dict]:
    batches = [(a, min(a + BATCH, rows)) for a in range(0, rows, BATCH)]
    nbytes = rows * FEATURES * 4
    files = {name: h5py.File(path, "r") for name, path in paths.items()}
    readers = {name: chunks.open_chunk_reader(f["x"]) for name, f in files.items()}
    runs: dict[tuple, list] = {}
    try:
        table = {name: methods(files[name]["x"], readers[name]) for name in paths}
        for reads in table.values():  # warm the page cache and the per-thread buffers
            for read in reads.values():
                timer.run(read, batches, max(threads))
        for rep in range(repeat):
            for name, reads in table.items():
                for method, read in reads.items():
                    for n in threads:
                        runs.setdefault((name, method, n), []).append(timer.run(read, batches, n))
            print(
                f"  repeat {rep + 1}/{repeat} done, load average {os.getloadavg()[0]:.2f}",
                file=sys.stderr,
            )
    finally:
        for reader in readers.values():
            if not isinstance(reader, str):
                reader.close()
        for f in files.values():
            f.close()
    results = []
    for (name, method, n), timings in runs.items():
        walls = [w for w, _ in timings]
        results.append(
            {
                "filter": name,
                "method": method,
                "threads": n,
                "mb_s": nbytes / statistics.median(walls) / 1e6,
                "best_mb_s": nbytes / min(walls) / 1e6,
                "cpus_busy": statistics.median(c for _, c in timings),
                "wall_s": walls,
                "path": readers[name] if isinstance(readers[name], str) else readers[name].codec,
            }
        )
    return results


def measure_gzip_decoders(path, rows, repeat, threads, timer) -> list[dict]:
    batches = [(a, min(a + BATCH, rows)) for a in range(0, rows, BATCH)]
    nbytes = rows * FEATURES * 4
    results = []
    with h5py.File(path, "r") as f:
        readers = {}
        for backend in codecs._BACKENDS["gzip"]:
            reader = chunks._open_chunk_reader(f["x"], {"gzip": backend})
            if isinstance(reader, str):
                print(f"  gzip decoder {backend}: {reader}", file=sys.stderr)
            else:
                readers[backend] = reader
        reads = {backend: reading_into(reader) for backend, reader in readers.items()}
        for read in reads.values():
            timer.run(read, batches, max(threads))
        runs: dict[tuple, list] = {}
        for _ in range(repeat):
            for backend, read in reads.items():
                for n in threads:
                    runs.setdefault((backend, n), []).append(timer.run(read, batches, n))
        for (backend, n), timings in runs.items():
            walls = [w for w, _ in timings]
            results.append(
                {
                    "decoder": backend,
                    "via": readers[backend].codec,
                    "threads": n,
                    "mb_s": nbytes / statistics.median(walls) / 1e6,
                    "best_mb_s": nbytes / min(walls) / 1e6,
                    "cpus_busy": statistics.median(c for _, c in timings),
                    "wall_s": walls,
                }
            )
        for reader in readers.values():
            reader.close()
    return results


def measure_waits(path, rows, seconds: float = 1.5) -> list[dict]:
    """While one thread reads batches in a loop, how long does a second thread wait for
    the GIL (an oversleep of time.sleep) and for h5py's lock (a trivial h5py call)?

    Unlike throughput, this shows whether a reader holds a lock even when other
    processes keep the CPUs busy.
    """
    results = []
    with h5py.File(path, "r") as f:
        dset = f["x"]
        reader = chunks.open_chunk_reader(dset)
        buf = np.empty((BATCH, FEATURES), np.float32)
        loops = {
            "nothing": None,
            "pipetrain out=": lambda a: reader.read(a, a + BATCH, out=buf),
            "h5py read_direct": lambda a: dset.read_direct(buf, np.s_[a : a + BATCH]),
        }
        for name, read in loops.items():
            stop = threading.Event()

            def loop(read=read, stop=stop):
                a = 0
                while read is not None and not stop.is_set():
                    read(a)
                    a = (a + BATCH) % (rows - BATCH)

            worker = threading.Thread(target=loop)
            worker.start()
            gil, lock = [], []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                t = time.perf_counter()
                time.sleep(0.001)
                gil.append(time.perf_counter() - t - 0.001)
                t = time.perf_counter()
                dset.id.get_space()
                lock.append(time.perf_counter() - t)
            stop.set()
            worker.join()
            results.append(
                {
                    "while reading with": name,
                    "gil_wait_us": statistics.median(gil) * 1e6,
                    "h5py_lock_wait_us": statistics.median(lock) * 1e6,
                }
            )
        if not isinstance(reader, str):
            reader.close()
    return results


def scaling(rows: dict, threads) -> tuple[str, str, str]:
    """Cells: median MB/s per thread count, median 2thr/1thr, best-pass 2thr/1thr."""
    cells = " | ".join(f"{rows[n]['mb_s']:,.0f}" for n in threads)
    if 2 not in rows:
        return cells, "-", "-"
    one, two = rows[threads[0]], rows[2]
    return cells, f"{two['mb_s'] / one['mb_s']:.2f}x", f"{two['best_mb_s'] / one['best_mb_s']:.2f}x"


def print_tables(results, decoders, threads, waits=()) -> None:
    """Markdown tables. 'best' ratios use each variant's fastest pass: other processes
    only ever slow a pass down, so on a shared machine they show what the code can do."""
    head = " | ".join(f"{n} thr MB/s" for n in threads)
    by: dict = {}
    for r in results:
        by.setdefault((r["filter"], r["method"]), {})[r["threads"]] = r
    print(f"\n| filter | method | {head} | 2thr/1thr | best 2thr/1thr | CPUs busy at 2thr |")
    print("|---|---|" + "---:|" * len(threads) + "---:|---:|---:|")
    for (name, method), rows in by.items():
        cells, ratio, best = scaling(rows, threads)
        busy = f"{rows[2]['cpus_busy']:.2f}" if 2 in rows else "-"
        print(f"| {name} | {method} | {cells} | {ratio} | {best} | {busy} |")
    if decoders:
        by = {}
        for r in decoders:
            by.setdefault(r["decoder"], {})[r["threads"]] = r
        print(f"\n| gzip-1 decoder (out=) | {head} | 2thr/1thr | best 2thr/1thr |")
        print("|---|" + "---:|" * len(threads) + "---:|---:|")
        for backend, rows in by.items():
            cells, ratio, best = scaling(rows, threads)
            print(f"| {backend} | {cells} | {ratio} | {best} |")
    if waits:
        print(
            "\n| one thread reads gzip-1 with | 2nd thread waits for the GIL (µs) "
            "| 2nd thread waits for h5py's lock (µs) |"
        )
        print("|---|---:|---:|")
        for w in waits:
            print(
                f"| {w['while reading with']} | {w['gil_wait_us']:,.0f} "
                f"| {w['h5py_lock_wait_us']:,.0f} |"
            )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows per file (default 100000)")
    parser.add_argument(
        "--repeat", type=int, default=5, help="timed passes per variant (default 5)"
    )
    parser.add_argument("--threads", default="1,2,4", help="thread counts (default 1,2,4)")
    parser.add_argument("--filters", default="", help="comma-separated subset of the filters")
    parser.add_argument("--data", choices=("images", "make-data"), default="images",
                        help="the rows: image-like pixels (default) or those of `pipetrain make-data` (W1 of bench_train)")
    parser.add_argument("--out", type=Path, help="write all timings as JSON here")
    args = parser.parse_args(argv)
    threads = tuple(int(n) for n in args.threads.split(","))
    options = filter_options()
    if args.filters:
        options = {k: v for k, v in options.items() if k in args.filters.split(",")}

    load_before = os.getloadavg()
    timer = Timer(threads)
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as folder:
        print(
            f"writing {len(options)} files of {args.rows} x {FEATURES} float32 ({args.data}) ...", file=sys.stderr
        )
        paths = write_files(Path(folder), args.rows, options, args.data)
        results = measure(paths, args.rows, args.repeat, threads, timer)
        decoders, waits = [], []
        if "gzip-1" in paths:
            decoders = measure_gzip_decoders(
                paths["gzip-1"], args.rows, args.repeat, threads, timer
            )
            waits = measure_waits(paths["gzip-1"], args.rows)
    timer.close()
    print_tables(results, decoders, threads, waits)
    print(
        f"\nload average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} CPUs; medians of {args.repeat} passes over {args.rows} rows"
    )
    if args.out:
        report = {
            "rows": args.rows,
            "data": args.data,
            "features": FEATURES,
            "chunk_rows": CHUNK_ROWS,
            "batch": BATCH,
            "repeat": args.repeat,
            "threads": threads,
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "versions": {
                "python": platform.python_version(),
                "numpy": np.__version__,
                "h5py": h5py.__version__,
                "hdf5": h5py.version.hdf5_version,
            },
            "results": results,
            "gzip_decoders": decoders,
            "waits": waits,
        }
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
