"""One process against two: what each process reads and decodes, and what the
distributed step costs.

    python benchmarks/bench_scale.py [--rows 40000] [--repeat 3] [--out benchmarks/results/scale.json]

Two measures, side by side, each variant round-robin with the others, medians:

- **reading** (in this process, no model): for one process and for each of two
  processes' shares (:class:`pipetrain.plan.Share`), pipetrain's producer pool delivers
  every batch of one epoch; per process: MB decoded from the file (``disk_mb``, the
  compressed bytes fetched), MB assembled (``read_mb``), and the decode CPU-seconds (the
  process's CPU time over the pass, which is the producers'); for file order and for the
  block shuffle;
- **training** (fresh processes, ``KERAS_BACKEND=jax``, gloo collectives on 127.0.0.1):
  ``pipetrain.train`` on one process and on two, and a bare ``train_on_batch`` loop on
  one in-memory batch on one process and on two; per variant: epoch seconds (median of
  the epochs after the first) and the median step seconds of the batch records. The step
  overhead of the distributed step is two processes' step time minus one's, for the bare
  loop (Keras and JAX's share) and for pipetrain (what pipetrain adds on top).

On a machine of two cores, two processes share the same cores: the training side shows
the cost of the distributed step, not a speed-up (see docs/distributed.md).
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

import pipetrain  # noqa: E402
from pipetrain.pipeline import Prefetcher  # noqa: E402
from pipetrain.plan import Plan, Share  # noqa: E402
from pipetrain.synth import make_data  # noqa: E402
from tests.remote_helpers import free_port  # noqa: E402

BATCH = 256


def read_share(path: Path, shuffle: str, count: int, index: int) -> dict:
    """One epoch of one process's share, through the producer pool: bytes and CPU."""
    with pipetrain.H5Source(str(path), x="x", y="y") as source:
        plan = Plan(source.rows_per_file, BATCH, block_rows=source.block_rows(), shuffle=shuffle, seed=0,
                    share=Share(index, count))
        cpu0, t0 = time.process_time(), time.perf_counter()
        disk = nbytes = rows = 0
        with Prefetcher(source, plan.batches(0), plan.blocks, plan.local_batch_size, workers=2, max_queue=8,
                        lookahead=plan.window_batches + 1, priority="normal") as batches:
            for batch in batches:
                disk += batch.read_bytes
                nbytes += batch.nbytes
                rows += batch.size
        return {"disk_mb": disk / 2**20, "read_mb": nbytes / 2**20, "rows": rows,
                "cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - t0}


def bench_reading(path: Path, repeat: int) -> list[dict]:
    variants = [(shuffle, count, index) for shuffle in ("none", "block") for count in (1, 2) for index in range(count)]
    runs: dict[tuple, list[dict]] = {v: [] for v in variants}
    for _ in range(repeat):
        for v in variants:
            runs[v].append(read_share(path, *v))
    out = []
    for (shuffle, count, index), rs in runs.items():
        out.append({"shuffle": shuffle, "processes": count, "process": index, "rows": rs[0]["rows"],
                    **{k: statistics.median(r[k] for r in rs) for k in ("disk_mb", "read_mb", "cpu_s", "wall_s")}})
    return out


# -- training in fresh processes ----------------------------------------------------------

WORKER = r'''
import os, sys, time, json
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
out, coordinator, count, index, variant, data, epochs = sys.argv[1:8]
count, index, epochs = int(count), int(index), int(epochs)
import keras, numpy as np
import pipetrain, pipetrain.distributed
if count > 1:
    pipetrain.distributed.initialize(coordinator, num_processes=count, process_id=index, devices=None)
model = keras.Sequential([keras.Input((784,)),
                          keras.layers.Dense(256, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(1)),
                          keras.layers.Dense(10, activation="softmax", kernel_initializer=keras.initializers.GlorotUniform(2))])
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
source = pipetrain.H5Source(data, x="x", y="y")
if variant == "pipetrain":
    pipetrain.train(model, source, epochs=epochs, batch_size=%(batch)d, shuffle="block", verbose=0,
                    history=os.path.join(out, "history.jsonl"), checkpoint_every=None)
else:  # the bare loop: one in-memory batch, this process's share of it, as many steps as an epoch
    x, y = source.read(0, 0, %(batch)d)[0]["x"], source.read(0, 0, %(batch)d)[0]["y"]
    share = slice(index * %(batch)d // count, (index + 1) * %(batch)d // count)
    steps = -(-source.rows // %(batch)d)
    times = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        for _ in range(steps):
            s = time.perf_counter()
            model.train_on_batch(x[share], y[share])
            times.append(time.perf_counter() - s)
        times.append(("epoch", time.perf_counter() - t0))
    if index == 0:
        json.dump(times, open(os.path.join(out, "bare.json"), "w"))
''' % {"batch": BATCH}


def train_once(folder: Path, variant: str, count: int, data: Path, epochs: int) -> dict:
    out = Path(tempfile.mkdtemp(dir=folder))
    script = folder / "worker.py"
    script.write_text(WORKER)
    coordinator = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(out), coordinator, str(count), str(i), variant,
                               str(data), str(epochs)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in range(count)]
    for p in procs:
        _, err = p.communicate(timeout=3600)
        if p.returncode:
            raise RuntimeError(f"{variant} on {count} process(es) failed: {err.decode()[-2000:]}")
    if variant == "pipetrain":
        h = pipetrain.read_history(out)
        epochs_s = [e["time_s"] for e in h.epochs[1:]]
        steps = [b["step_s"] for b in h.batches if b["epoch"] > 0]
        per_process = h.epochs[-1].get("processes")
    else:
        times = json.loads((out / "bare.json").read_text())
        epochs_s = [t[1] for t in times if isinstance(t, list)][1:]
        per_epoch = (len(times) - epochs) // epochs
        steps = [t for t in times[per_epoch + 1:] if not isinstance(t, list)]
        per_process = None
    return {"epoch_s": statistics.median(epochs_s), "step_ms": 1000 * statistics.median(steps),
            "processes_detail": per_process}


def bench_training(folder: Path, data: Path, repeat: int, epochs: int) -> list[dict]:
    variants = [(v, c) for v in ("bare", "pipetrain") for c in (1, 2)]
    runs: dict[tuple, list[dict]] = {v: [] for v in variants}
    for _ in range(repeat):
        for v in variants:
            runs[v].append(train_once(folder, v[0], v[1], data, epochs))
    return [{"variant": v, "processes": c, "epoch_s": statistics.median(r["epoch_s"] for r in rs),
             "step_ms": statistics.median(r["step_ms"] for r in rs), "detail": rs[-1]["processes_detail"]}
            for (v, c), rs in runs.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per run (the first is warm-up)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = folder / "w1.h5"
        make_data(data, rows=args.rows, features=(784,), classes=10, dtype="float32", compression="gzip:1",
                  chunk_rows=256, seed=0)
        reading = bench_reading(data, args.repeat)
        training = bench_training(folder, data, args.repeat, args.epochs)
    result = {"rows": args.rows, "batch": BATCH, "repeat": args.repeat, "epochs": args.epochs,
              "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(),
              "versions": {"python": platform.python_version(), "numpy": np.__version__},
              "memory_mb": round(psutil.virtual_memory().total / 2**20), "reading": reading, "training": training}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("reading, per process (medians):")
    print(f"{'shuffle':8} {'procs':>5} {'proc':>4} {'rows':>7} {'disk MB':>8} {'read MB':>8} {'CPU s':>6} {'wall s':>6}")
    for r in reading:
        print(f"{r['shuffle']:8} {r['processes']:5} {r['process']:4} {r['rows']:7} {r['disk_mb']:8.1f} "
              f"{r['read_mb']:8.1f} {r['cpu_s']:6.2f} {r['wall_s']:6.2f}")
    print("training (medians):")
    for t in training:
        print(f"{t['variant']:10} {t['processes']} process(es): epoch {t['epoch_s']:.3f} s, step {t['step_ms']:.2f} ms")
    step = {(t["variant"], t["processes"]): t["step_ms"] for t in training}
    print(f"distributed step overhead: bare loop +{step['bare', 2] - step['bare', 1]:.2f} ms, "
          f"pipetrain +{step['pipetrain', 2] - step['pipetrain', 1]:.2f} ms per step")


if __name__ == "__main__":
    main()
