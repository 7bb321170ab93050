"""Reading and training from a bucket: pipetrain against h5py on an s3fs file and against
the local disk, with a cloud region's latency added to every request.

    python benchmarks/bench_remote.py [--latency 0.02 0.05] [--bandwidth 0 90] [--repeat 3]
                                      [--out benchmarks/results/remote.json]

The W1 file (``pipetrain make-data``: 100,000 x 784 float32, gzip level 1, chunks of 256
rows) is served by a local S3 endpoint (a read-only, path-style S3 server over the file,
tests/remote_helpers.py ``FileServer``: moto, the tests' endpoint, reads the whole 117 MB
object for every ranged GET, 277 ms each, which would measure moto) that waits
``--latency`` seconds before each answer and, with ``--bandwidth`` (MB/s, 0 for none),
sends at most that many bytes per second on each connection: AWS's guidance for S3 is
one concurrent request per 85-90 MB/s of throughput wanted ("Best Practices Design
Patterns: Optimizing Amazon S3 Performance", Horizontal Scaling and Request
Parallelization), so 90 stands for a GET stream in a region, while 0 (latency only) is a
link of GB/s, where reading more bytes costs almost nothing. For each (latency,
bandwidth), in one process, variants run round-robin:

- ``read``: every batch of an epoch (batch 256, file order) through the producer pool,
  no training: pipetrain from the bucket, from the local disk, and h5py on an
  ``s3fs`` file object (``s3fs.open``, its default read-ahead cache), ``dset[a:b]``;
- ``epoch``: one training epoch of the W1 MLP (``pipetrain.train``, block shuffle, the
  default): from the bucket and from the local disk; and h5py on s3fs feeding
  ``train_on_batch`` (file order) as the peer. One untimed epoch first takes Keras'
  first-use costs; odd rounds run the variants in reverse order.

The metadata cache is on (the second run of a job is the usual case); the first open of
each file is timed apart (``open_s``, cold and warm). Reported: medians, ratios
(bucket / local, h5py-s3fs / pipetrain), requests made and bytes fetched, and the CPU
seconds the endpoint used (it shares this machine's cores with the client; a real
bucket does not).
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import h5py  # noqa: E402
import numpy as np  # noqa: E402

import pipetrain  # noqa: E402
from pipetrain.pipeline import Prefetcher  # noqa: E402
from pipetrain.plan import Plan  # noqa: E402
from pipetrain.synth import make_data  # noqa: E402

BATCH = 256
ROWS = 100_000


def build_model():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10, activation="softmax")])
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


class Env:
    """The S3 endpoint and its latency proxy, in a process of their own (so that serving
    takes no GIL time from the reader it measures), and their request and byte counts."""

    def __init__(self, folder: Path, latency: float, bandwidth: float = 0.0):
        root = Path(__file__).resolve().parent.parent
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.remote_helpers", str(folder), str(latency), str(bandwidth * 1e6)],
            cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        endpoint = self.process.stdout.readline().strip()
        self.options = {"key": "x", "secret": "x", "client_kwargs": {"endpoint_url": endpoint}}
        self.url = "s3://bench/w1.h5"

    def counts(self) -> dict:
        import psutil

        self.process.stdin.write("stats\n")
        self.process.stdin.flush()
        counts = json.loads(self.process.stdout.readline())
        cpu = psutil.Process(self.process.pid).cpu_times()
        return {**counts, "cpu_s": cpu.user + cpu.system}

    def stop(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)


def source(env: Env | None, local: Path) -> pipetrain.H5Source:
    if env is None:
        return pipetrain.H5Source(str(local), x="x", y="y")
    return pipetrain.H5Source(env.url, x="x", y="y", storage_options=env.options)


def v_read_pipetrain(env, local):
    with source(env, local) as src:
        plan = Plan(src.rows_per_file, BATCH, block_rows=src.block_rows())
        t0 = time.perf_counter()
        with Prefetcher(src, plan.batches(0), plan.blocks, BATCH, workers=2) as stream:
            for _ in stream:
                pass
        return time.perf_counter() - t0


def h5py_s3fs(env):
    import s3fs

    fs = s3fs.S3FileSystem(**env.options)
    return fs.open("bench/w1.h5", "rb")


def v_read_h5py_s3fs(env, local):
    t0 = time.perf_counter()
    with h5py_s3fs(env) as fobj, h5py.File(fobj, "r") as f:
        xs, ys = f["x"], f["y"]
        for a in range(0, ROWS, BATCH):
            xs[a : a + BATCH], ys[a : a + BATCH]
    return time.perf_counter() - t0


def v_epoch_pipetrain(env, local):
    import keras

    model = build_model()

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.t0

    timer = Timer()
    with source(env, local) as src:
        # One batch traces the model first: the epoch is timed without the tracing.
        model.train_on_batch(np.zeros((BATCH, 784), np.float32), np.zeros(BATCH, np.int64))
        pipetrain.train(model, src, epochs=1, batch_size=BATCH, shuffle="block", verbose=0, workers=2,
                        callbacks=[timer], monitor_interval=None)
    return timer.seconds


def v_epoch_h5py_s3fs(env, local):
    model = build_model()
    model.train_on_batch(np.zeros((BATCH, 784), np.float32), np.zeros(BATCH, np.int64))
    t0 = time.perf_counter()
    with h5py_s3fs(env) as fobj, h5py.File(fobj, "r") as f:
        xs, ys = f["x"], f["y"]
        for a in range(0, ROWS, BATCH):
            model.train_on_batch(xs[a : a + BATCH], ys[a : a + BATCH])
    return time.perf_counter() - t0


def open_times(env: Env, cache: Path) -> dict:
    """Seconds to open the source: cold (no metadata cache) and warm (cached)."""
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    out = {}
    for kind in ("cold", "warm"):
        before = env.counts()["requests"]
        t0 = time.perf_counter()
        pipetrain.H5Source(env.url, x="x", y="y", storage_options=env.options).close()
        out[kind] = {"seconds": round(time.perf_counter() - t0, 3), "requests": env.counts()["requests"] - before}
    return out


VARIANTS = {
    "read/pipetrain-bucket": ("bucket", v_read_pipetrain),
    "read/pipetrain-local": ("local", v_read_pipetrain),
    "read/h5py-s3fs": ("bucket", v_read_h5py_s3fs),
    "epoch/pipetrain-bucket": ("bucket", v_epoch_pipetrain),
    "epoch/pipetrain-local": ("local", v_epoch_pipetrain),
    "epoch/h5py-s3fs": ("bucket", v_epoch_h5py_s3fs),
}


def bench(folder: Path, latency: float, bandwidth: float, repeat: int, skip: set[str]) -> dict:
    env = Env(folder, latency, bandwidth)
    label = f"{latency * 1000:.0f} ms{f', {bandwidth:g} MB/s' if bandwidth else ''}"
    try:
        result = {"latency_s": latency, "bandwidth_mb_s": bandwidth or None,
                  "open": open_times(env, Path(os.environ["PIPETRAIN_CACHE"]))}
        runs = {v: [] for v in VARIANTS if v not in skip}
        requests = {v: [] for v in runs}
        fetched = {v: [] for v in runs}
        server_cpu = {v: [] for v in runs}
        if any(v.startswith("epoch/") for v in runs):  # the process's first training pays Keras' first-use costs
            v_epoch_pipetrain(None, folder / "bench" / "w1.h5")
        for r in range(repeat):
            # Odd rounds run the variants in reverse order: none always runs first or last.
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                where, fn = VARIANTS[name]
                before = env.counts()
                seconds = fn(env if where == "bucket" else None, folder / "bench" / "w1.h5")
                after = env.counts()
                runs[name].append(seconds)
                requests[name].append(after["requests"] - before["requests"])
                fetched[name].append(after["bytes"] - before["bytes"])
                server_cpu[name].append(after["cpu_s"] - before["cpu_s"])
                print(f"  {label} round {r + 1}/{repeat} {name:24s} {seconds:7.3f} s", flush=True)
        median = {v: statistics.median(t) for v, t in runs.items()}
        result["seconds"] = {v: round(t, 3) for v, t in median.items()}
        result["runs"] = {v: [round(t, 3) for t in ts] for v, ts in runs.items()}
        result["endpoint_cpu_s"] = {v: round(statistics.median(c), 2) for v, c in server_cpu.items() if max(c) > 0.05}
        result["requests"] = {v: max(n) for v, n in requests.items() if max(n)}
        result["fetched_mb"] = {v: round(max(n) / 2**20, 1) for v, n in fetched.items() if max(n)}
        ratios = {}
        for kind in ("read", "epoch"):
            bucket, local, peer = (median.get(f"{kind}/{x}") for x in ("pipetrain-bucket", "pipetrain-local", "h5py-s3fs"))
            if bucket and local:
                ratios[f"{kind}: bucket / local"] = round(bucket / local, 3)
                # Each round's bucket and local runs are neighbours in time: their ratio
                # sees the same load on the shared machine.
                pairs = zip(runs[f"{kind}/pipetrain-bucket"], runs[f"{kind}/pipetrain-local"], strict=True)
                ratios[f"{kind}: bucket / local, median of rounds"] = round(statistics.median(b / a for b, a in pairs), 3)
            if bucket and peer:
                ratios[f"{kind}: h5py-s3fs / pipetrain-bucket"] = round(peer / bucket, 2)
        result["ratios"] = ratios
        return result
    finally:
        env.stop()


def table(results: dict) -> str:
    def label(r):
        bandwidth = r.get("bandwidth_mb_s")
        return f"{r['latency_s'] * 1000:.0f} ms{f', {bandwidth:g} MB/s' if bandwidth else ''}"

    lines = ["| network | variant | s | requests | MB fetched | endpoint CPU s |", "|---|---|---:|---:|---:|---:|"]
    for r in results["latencies"]:
        for v, t in r["seconds"].items():
            lines.append(f"| {label(r)} | {v} | {t:.3f} | {r['requests'].get(v, '')} | "
                         f"{r['fetched_mb'].get(v, '')} | {r.get('endpoint_cpu_s', {}).get(v, '')} |")
    lines.append("")
    for r in results["latencies"]:
        lines.append(f"{label(r)}: " + "; ".join(f"{k} = {v}" for k, v in r["ratios"].items())
                     + f"; open cold {r['open']['cold']}, warm {r['open']['warm']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, nargs="+", default=[0.02, 0.05])
    parser.add_argument("--bandwidth", type=float, nargs="+", default=[0.0, 90.0],
                        help="MB/s per connection (0: no limit, latency only)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data-dir", help="keep the W1 file here (default: a temporary folder)")
    parser.add_argument("--skip", nargs="*", default=[], help="variants to leave out")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "remote.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.data_dir or tmp)
        (folder / "bench").mkdir(parents=True, exist_ok=True)
        path = folder / "bench" / "w1.h5"
        if not path.exists():
            make_data(path, ROWS, (784,), 10, "float32", "gzip:1", False, 256)
        os.environ["PIPETRAIN_CACHE"] = str(Path(tmp) / "cache")
        import tensorflow as tf

        results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                               "tensorflow": tf.__version__, "h5py": h5py.__version__,
                               "load_1min_before": round(os.getloadavg()[0], 2)},
                   "file_mb": round(path.stat().st_size / 2**20, 1), "repeat": args.repeat, "latencies": []}
        for bandwidth in args.bandwidth:
            for latency in args.latency:
                print(f"latency {latency * 1000:.0f} ms, bandwidth {bandwidth or 'unlimited'}:", flush=True)
                results["latencies"].append(bench(folder, latency, bandwidth, args.repeat, set(args.skip)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(results))


if __name__ == "__main__":
    main()
