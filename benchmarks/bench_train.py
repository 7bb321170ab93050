"""pipetrain against the tools people would otherwise use, on the same files and model.

    python benchmarks/bench_train.py [--workload w1 w2] [--repeat 3] [--out benchmarks/results/train.json]
    python benchmarks/bench_train.py --workload w1-raw --out benchmarks/results/train-w1-raw.json
    python benchmarks/bench_train.py --workload w3 --out benchmarks/results/train-w3.json
    KERAS_BACKEND=torch python benchmarks/bench_train.py     # -> results/train-torch.json
    KERAS_BACKEND=jax python benchmarks/bench_train.py       # -> results/train-jax.json
    python benchmarks/bench_train.py --backends-table         # README's Backends table from the three

One Keras backend per process (``KERAS_BACKEND``; the peers need ``pip install
"pipetrain[bench,jax,torch]"``). For each workload, in one process, variants run
round-robin (so machine noise spreads evenly), each for ``--epochs`` epochs of which the
first is warm-up (tracing, page cache, worker start); the time of the others is the
measure. On every backend:

- ``read``: pipetrain's producer pool delivering every batch, no training;
- ``train``: ``train_on_batch`` on one in-memory batch, as many steps as an epoch;
- ``sync``: the plain loop: ``dset[a:b]`` from h5py, then ``train_on_batch``;
- ``PyDataset``: ``fit`` on a ``keras.utils.PyDataset`` with 2 worker threads;
- ``pipetrain``: ``pipetrain.train`` (file order, like the peers; history of every batch
  and the system monitor on);
- ``pipetrain-bare``: the same without history and monitor (their cost);
- ``pipetrain-block``: ``pipetrain.train`` with the block shuffle;
- on torch, ``train-1thread`` and ``pipetrain-1thread``: ``train`` and ``pipetrain`` with
  PyTorch's ops on one thread (``pipetrain train --compute-threads 1``).

and each backend's own loader (benchmarks/peers.py), all in file order with 2 workers:

- tensorflow: ``tf.data``: ``fit`` on ``tf.data.Dataset.from_generator`` + ``prefetch(AUTOTUNE)``;
- torch: ``DataLoader``: a ``torch.utils.data.DataLoader`` over an h5py-backed map-style
  ``Dataset`` (2 worker processes, ``batch_size`` as ours, no pinned memory) feeding
  ``train_on_batch``; ``DataLoader-fit``: the same loader given to ``fit``;
- jax: ``Grain``: ``grain.MapDataset`` over the same h5py-backed source, batched,
  prefetched by 2 worker processes, feeding ``train_on_batch``.

The limit a perfect pipeline approaches is max(read, train). Reported: median epoch
seconds, samples/s, ratios to the limit and to each peer, pipetrain's input-bound %
(its own measure), and the peak RSS growth of each variant.
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
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402

import pipetrain  # noqa: E402
import peers  # noqa: E402  (benchmarks/peers.py)
from pipetrain.pipeline import Prefetcher  # noqa: E402
from pipetrain.plan import Plan  # noqa: E402
from pipetrain.synth import make_data  # noqa: E402

WORKLOADS = {
    # W1 of DESIGN.md: 100,000 x 784 float32, gzip level 1, chunks of 256 rows; an MLP.
    "w1": {"rows": 100_000, "features": (784,), "dtype": "float32", "compression": "gzip:1",
           "shuffle_filter": False, "batch": 256, "model": "mlp"},
    # W1 uncompressed: producers only copy from the page cache (is decoding the cost?).
    "w1-raw": {"rows": 100_000, "features": (784,), "dtype": "float32", "compression": "none",
               "shuffle_filter": False, "batch": 256, "model": "mlp"},
    # Images as uint8 with the shuffle filter, and a small CNN (compute-heavy).
    "w2": {"rows": 20_000, "features": (32, 32, 3), "dtype": "uint8", "compression": "gzip:1",
           "shuffle_filter": True, "batch": 128, "model": "cnn"},
    # W2's images with a CNN of 6.5x the multiply-adds (3x the step time): decoding is a few percent
    # of the step, so what is left between pipetrain and training alone is the consumer.
    "w3": {"rows": 8_000, "features": (32, 32, 3), "dtype": "uint8", "compression": "gzip:1",
           "shuffle_filter": True, "batch": 128, "model": "cnn-heavy"},
}


def build_model(kind: str, shape: tuple[int, ...]):
    keras.utils.set_random_seed(0)
    if kind == "mlp":
        layers = [keras.Input(shape), keras.layers.Dense(256, activation="relu"),
                  keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10, activation="softmax")]
    elif kind == "cnn":
        layers = [keras.Input(shape), keras.layers.Rescaling(1 / 255),
                  keras.layers.Conv2D(16, 3, activation="relu"), keras.layers.MaxPooling2D(),
                  keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(),
                  keras.layers.Flatten(), keras.layers.Dense(64, activation="relu"),
                  keras.layers.Dense(10, activation="softmax")]
    else:  # cnn-heavy
        layers = [keras.Input(shape), keras.layers.Rescaling(1 / 255),
                  keras.layers.Conv2D(32, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
                  keras.layers.Conv2D(64, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
                  keras.layers.Conv2D(64, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
                  keras.layers.Flatten(), keras.layers.Dense(64, activation="relu"),
                  keras.layers.Dense(10, activation="softmax")]
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


class PeakRss:
    """Largest RSS seen while a variant runs (sampled every 20 ms), minus where it began."""

    def __init__(self):
        self.process = psutil.Process()

    def __enter__(self):
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.growth_mb = (self.peak - self.start) / 2**20


class EpochTimes(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._t0)


# -- the variants: each returns the seconds of its measured epochs ---------------------------


def v_read(path, spec, epochs):
    source = pipetrain.H5Source(path, x="x", y="y")
    plan = Plan(source.rows_per_file, spec["batch"], block_rows=source.block_rows())
    times = []
    for e in range(epochs):
        t0 = time.perf_counter()
        with Prefetcher(source, plan.batches(e), plan.blocks, spec["batch"], workers=2) as stream:
            for _ in stream:
                pass
        times.append(time.perf_counter() - t0)
    source.close()
    return times[1:], None


def v_train(path, spec, epochs):
    model = build_model(spec["model"], spec["features"])
    with h5py.File(path) as f:
        x, y = f["x"][: spec["batch"]], f["y"][: spec["batch"]]
    steps = -(-spec["rows"] // spec["batch"])
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for _ in range(steps):
            model.train_on_batch(x, y)
        times.append(time.perf_counter() - t0)
    return times[1:], None


def v_sync(path, spec, epochs):
    model = build_model(spec["model"], spec["features"])
    times = []
    with h5py.File(path) as f:
        xs, ys = f["x"], f["y"]
        for _ in range(epochs):
            t0 = time.perf_counter()
            for a in range(0, spec["rows"], spec["batch"]):
                model.train_on_batch(xs[a : a + spec["batch"]], ys[a : a + spec["batch"]])
            times.append(time.perf_counter() - t0)
    return times[1:], None


def v_tfdata(path, spec, epochs):
    model = build_model(spec["model"], spec["features"])
    timer = EpochTimes()
    model.fit(peers.tf_dataset(path, spec["batch"]), epochs=epochs, verbose=0, callbacks=[timer])
    return timer.times[1:], None


class H5Batches(keras.utils.PyDataset):
    def __init__(self, path, batch, rows, **kwargs):
        super().__init__(**kwargs)
        self.file = h5py.File(path)
        self.batch, self.rows = batch, rows

    def __len__(self):
        return -(-self.rows // self.batch)

    def __getitem__(self, i):
        a = i * self.batch
        return self.file["x"][a : a + self.batch], self.file["y"][a : a + self.batch]


def v_pydataset(path, spec, epochs):
    model = build_model(spec["model"], spec["features"])
    data = H5Batches(path, spec["batch"], spec["rows"], workers=2, use_multiprocessing=False, max_queue_size=8)
    timer = EpochTimes()
    model.fit(data, epochs=epochs, verbose=0, callbacks=[timer], shuffle=False)
    data.file.close()
    return timer.times[1:], None


def v_torch_loader(path, spec, epochs):
    model = build_model(spec["model"], spec["features"])
    loader = peers.torch_loader(path, spec["batch"])
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for x, y in loader:
            model.train_on_batch(x, y)
        times.append(time.perf_counter() - t0)
    del loader  # its persistent workers exit
    return times[1:], None


def v_torch_loader_fit(path, spec, epochs):
    model = build_model(spec["model"], spec["features"])
    loader = peers.torch_loader(path, spec["batch"])
    timer = EpochTimes()
    model.fit(loader, epochs=epochs, verbose=0, callbacks=[timer])
    del loader
    return timer.times[1:], None


def v_grain(path, spec, epochs):
    model = build_model(spec["model"], spec["features"])
    batches = peers.grain_batches(path, spec["batch"], epochs)
    steps = -(-spec["rows"] // spec["batch"])
    times = []
    try:
        for _ in range(epochs):
            t0 = time.perf_counter()
            for _ in range(steps):
                x, y = next(batches)
                model.train_on_batch(x, y)
            times.append(time.perf_counter() - t0)
    finally:
        batches.close()  # its worker processes exit
    return times[1:], None


class RecordingTime:
    """Seconds spent recording (building and writing history records, sampling the
    system) while a variant runs: the direct measure of what logging costs."""

    def __init__(self):
        self.seconds = 0.0
        self._lock = threading.Lock()

    def __enter__(self):
        from pipetrain.monitor import Monitor
        from pipetrain.run import Run

        self._saved = [(Run, "emit", Run.emit), (Monitor, "sample", Monitor.sample)]
        for owner, name, original in self._saved:
            setattr(owner, name, self._timed(original))
        return self

    def _timed(self, original):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds += time.perf_counter() - t0
        return timed

    def __exit__(self, *exc):
        for owner, name, original in self._saved:
            setattr(owner, name, original)


LOGGING = {}  # variant -> (recording seconds, total epoch seconds) of the last run


def _pipetrain(path, spec, epochs, shuffle="none", history=True):
    model = build_model(spec["model"], spec["features"])
    timer = EpochTimes()
    with tempfile.TemporaryDirectory() as tmp:
        history_path = Path(tmp) / "history.jsonl" if history else None
        t0 = time.perf_counter()
        with RecordingTime() as recording:
            pipetrain.train(model, pipetrain.H5Source(path, x="x", y="y"), epochs=epochs,
                            batch_size=spec["batch"], shuffle=shuffle, workers=2, max_queue=8,
                            history=history_path, verbose=0, callbacks=[timer],
                            monitor_interval=2.0 if history else None)
        LOGGING.setdefault((shuffle, history), []).append(100 * recording.seconds / (time.perf_counter() - t0))
        bound = None
        if history_path is not None:
            records = pipetrain.read_history(history_path).epochs[1:]
            bound = statistics.median(r["input_bound_pct"] for r in records)
    return timer.times[1:], bound


BACKEND = keras.backend.backend()
# Each backend's own loaders: the peers pipetrain must beat on that backend.
LOADERS = {
    "tensorflow": {"tf.data": v_tfdata},
    "torch": {"DataLoader": v_torch_loader, "DataLoader-fit": v_torch_loader_fit},
    "jax": {"Grain": v_grain},
}
OWN_LOADERS = LOADERS[BACKEND]
VARIANTS = {
    "read": v_read,
    "train": v_train,
    "sync": v_sync,
    **OWN_LOADERS,
    "PyDataset": v_pydataset,
    "pipetrain": lambda p, s, e: _pipetrain(p, s, e),
    "pipetrain-bare": lambda p, s, e: _pipetrain(p, s, e, history=False),
    "pipetrain-block": lambda p, s, e: _pipetrain(p, s, e, shuffle="block"),
}
PEERS = ("sync", *OWN_LOADERS, "PyDataset")


def _one_compute_thread(variant):
    """A variant with PyTorch's ops on one thread (``--compute-threads 1``), the other
    core left to the producers; PyTorch takes the setting at any time, so it runs beside
    the others in this process."""
    def run(path, spec, epochs):
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return variant(path, spec, epochs)
        finally:
            torch.set_num_threads(threads)
    return run


if BACKEND == "torch":
    VARIANTS["train-1thread"] = _one_compute_thread(v_train)
    VARIANTS["pipetrain-1thread"] = _one_compute_thread(VARIANTS["pipetrain"])


def bench(name: str, spec: dict, folder: Path, repeat: int, epochs: int) -> dict:
    path = folder / f"{name}.h5"
    if not path.exists():
        make_data(path, spec["rows"], spec["features"], 10, spec["dtype"], spec["compression"],
                  spec["shuffle_filter"], 256)
    LOGGING.clear()
    runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    bound: dict[str, list[float]] = {v: [] for v in VARIANTS}
    rss: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(repeat):
        for variant, fn in VARIANTS.items():
            with PeakRss() as peak:
                times, input_bound = fn(path, spec, epochs)
            runs[variant].extend(times)
            rss[variant].append(peak.growth_mb)
            if input_bound is not None:
                bound[variant].append(input_bound)
            print(f"  {name} round {r + 1}/{repeat} {variant:16s} {statistics.median(times):7.3f} s/epoch",
                  flush=True)
    median = {v: statistics.median(t) for v, t in runs.items()}
    limit = max(median["read"], median["train"])
    result = {
        "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.items()},
        "file_mb": round(path.stat().st_size / 2**20, 1),
        "epoch_s": {v: round(t, 3) for v, t in median.items()},
        "samples_per_s": {v: round(spec["rows"] / t) for v, t in median.items()},
        "limit_s": round(limit, 3),
        "vs_limit": {v: round(t / limit, 3) for v, t in median.items()},
        "pipetrain_speedup": {peer: round(median[peer] / median["pipetrain"], 3)
                              for peer in PEERS},
        "vs_train_alone": round(median["pipetrain"] / median["train"], 3),
        **({"vs_train_alone_1thread": round(median["pipetrain-1thread"] / median["train"], 3)}
           if "pipetrain-1thread" in median else {}),
        "logging_cost_pct": round(100 * (median["pipetrain"] / median["pipetrain-bare"] - 1), 2),
        # Time inside Run.emit (records built and written) and Monitor.sample, as a share
        # of the run: the direct measure, free of the machine's noise.
        "recording_time_pct": round(statistics.median(LOGGING.pop(("none", True))), 2),
        "input_bound_pct": {v: round(statistics.median(b), 1) for v, b in bound.items() if b},
        "peak_rss_growth_mb": {v: round(max(m), 1) for v, m in rss.items()},
        "epochs_measured": {v: len(t) for v, t in runs.items()},
    }
    return result


def table(name: str, r: dict) -> str:
    lines = [f"### {name} on {BACKEND}: {r['spec']['rows']:,} rows {tuple(r['spec']['features'])} {r['spec']['dtype']}, "
             f"{r['spec']['compression']}{' +shuffle' if r['spec']['shuffle_filter'] else ''}, "
             f"batch {r['spec']['batch']}, {r['spec']['model']} ({r['file_mb']} MB file)",
             "", "| variant | s/epoch | samples/s | × limit | pipetrain is faster by | peak RSS growth MB |",
             "|---|---:|---:|---:|---:|---:|"]
    for v, t in r["epoch_s"].items():
        speedup = r["pipetrain_speedup"].get(v)
        lines.append(f"| {v} | {t:.3f} | {r['samples_per_s'][v]:,} | {r['vs_limit'][v]:.2f} | "
                     f"{f'{speedup:.2f}×' if speedup else ''} | {r['peak_rss_growth_mb'][v]} |")
    lines += ["", f"limit max(read, train) = {r['limit_s']:.3f} s; pipetrain / train alone = "
              f"{r['vs_train_alone']:.3f}; history + monitor: {r['recording_time_pct']:.2f}% of the run's time "
              f"(epochs with and without them differ by {r['logging_cost_pct']:+.1f}%, within noise); "
              f"input-bound % (pipetrain's own measure): {r['input_bound_pct']}"]
    return "\n".join(lines)


def backends_table(folder: Path) -> str:
    """README's Backends table from the results of each backend's run (train.json,
    train-jax.json, train-torch.json in ``folder``), with the goals: pipetrain 1.10x faster
    than the backend's own loader on W1 and not slower on W2, within 1.10x of training alone."""
    lines = ["| backend | workload | training alone s/epoch | own loader | its s/epoch | pipetrain s/epoch | "
             "pipetrain faster by | pipetrain / training alone |", "|---|---|---:|---|---:|---:|---:|---:|"]
    for backend, name in (("tensorflow", "train.json"), ("jax", "train-jax.json"), ("torch", "train-torch.json")):
        if not (folder / name).exists():
            lines.append(f"| {backend} | not measured ({name} missing) | | | | | | |")
            continue
        results = json.loads((folder / name).read_text())
        for workload in ("w1", "w2"):
            r = results["workloads"].get(workload)
            if r is None:
                continue
            need = 1.10 if workload == "w1" else 1.0
            within = r["vs_train_alone"] <= 1.10
            for loader in LOADERS[backend]:
                speedup = r["pipetrain_speedup"][loader]
                lines.append(
                    f"| {backend} | {workload.upper()} | {r['epoch_s']['train']:.3f} | {loader} | "
                    f"{r['epoch_s'][loader]:.3f} | {r['epoch_s']['pipetrain']:.3f} | "
                    f"{speedup:.2f}×{'' if speedup >= need else ' (goal ' + format(need, '.2f') + '×)'} | "
                    f"{r['vs_train_alone']:.2f}{'' if within else ' (goal 1.10)'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="+", default=["w1", "w2"], choices=list(WORKLOADS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="per variant and round; the first is warm-up")
    parser.add_argument("--data-dir", help="keep the generated files here (default: a temporary folder)")
    results_name = "train.json" if BACKEND == "tensorflow" else f"train-{BACKEND}.json"
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / results_name))
    parser.add_argument("--compute-threads", type=int, help="threads within one op, TensorFlow or PyTorch (default: all cores)")
    parser.add_argument("--backends-table", action="store_true",
                        help="print README's Backends table from the results of each backend, and exit")
    args = parser.parse_args()
    if args.backends_table:
        print(backends_table(Path(args.out).parent))
        return
    if args.compute_threads:
        from pipetrain.cli import BadInput, set_compute_threads

        try:
            set_compute_threads(args.compute_threads)
        except BadInput as e:
            parser.error(str(e))

    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "backend": BACKEND, BACKEND: sys.modules[BACKEND].__version__,
                           "keras": keras.__version__, "h5py": h5py.__version__},
               "repeat": args.repeat, "epochs": args.epochs, "compute_threads": args.compute_threads,
               "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.data_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name in args.workload:
            print(f"{name}:", flush=True)
            results["workloads"][name] = bench(name, WORKLOADS[name], folder, args.repeat, args.epochs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print()
    for name, r in results["workloads"].items():
        print(table(name, r))
        print()


if __name__ == "__main__":
    main()
