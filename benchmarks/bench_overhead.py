"""Per-step cost of pipetrain against a bare ``train_on_batch`` loop (issue 15).

    python benchmarks/bench_overhead.py [--backends tensorflow jax torch] [--repeat 3]
                                        [--out benchmarks/results/overhead.json]

The model is the digits MLP (8x8 -> 128 -> 10, batch 32) on the sample digits (1,438
rows, 45 steps an epoch). A variant's per-step cost is the time of epochs ``--short`` + 1
to ``--long`` of one run, from the clock at each epoch's end, divided by their steps: the
first ``--short`` epochs take the start-up (tracing and compiling, threads, files) and
are not timed. (Timing two runs of different lengths and taking the difference, as this
script did first, let JAX's compile-time jitter exceed the whole difference for its
fastest variants: a negative time per step.) Each backend runs in its own process (the backend is
chosen at import); within it, the variants run round-robin, ``--repeat`` times, and the
table shows the median of the repeats (and the best, as issue 15 measured it):

- ``bare``: ``model.train_on_batch`` on in-memory slices of the same data;
- ``fit-spe16``: ``model.fit(steps_per_execution=16)`` on the in-memory arrays (the peer
  that beats the bare loop);
- ``train``: ``pipetrain.train``, no history, no monitor;
- ``train+hist``: ``pipetrain.train`` with the history and the system monitor on;
- ``run+hist``: a ``pipetrain.Run`` loop calling ``epoch.train_on_batch``, history and
  monitor on;
- ``train+hist spe16``: ``pipetrain.train(steps_per_execution=16)``, history and monitor on.

The device each backend computed on is recorded. Ratios are to ``bare`` of the same
repeat. The machine may be shared: compare ratios, not absolute times.
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
BATCH = 32
VARIANTS = ["bare", "fit-spe16", "train", "train+hist", "run+hist", "train+hist spe16"]


def _device() -> str:
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        return f"{d.platform}:{d.device_kind}"
    if backend == "torch":
        import torch

        return f"cuda:{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return f"gpu:{gpus[0].name}" if gpus else "cpu"


def _model(seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((8, 8)), keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _one(variant: str, epochs: int, x, y, source, folder: Path) -> list[float]:
    """The clock at the end of each of ``epochs`` epochs of ``variant`` on a fresh model."""
    import keras

    import pipetrain

    ends: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            ends.append(time.perf_counter())

    model = _model()
    history = str(folder / f"{time.monotonic_ns()}" / "history.jsonl") if "hist" in variant else None
    monitor = 2.0 if "hist" in variant else None
    if variant == "bare":
        n = len(x)
        for _ in range(epochs):
            for start in range(0, n, BATCH):
                model.train_on_batch(x[start:start + BATCH], y[start:start + BATCH])
            ends.append(time.perf_counter())
    elif variant == "fit-spe16":
        model.compile(model.optimizer, model.loss, metrics=["accuracy"], steps_per_execution=16)
        model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=[Clock()])
    elif variant.startswith("train"):
        fused = {"steps_per_execution": 16} if "spe16" in variant else {}
        pipetrain.train(model, source, epochs=epochs, batch_size=BATCH, shuffle="none", history=history,
                        monitor_interval=monitor, verbose=0, checkpoint_every=None, callbacks=[Clock()], **fused)
    elif variant == "run+hist":
        with pipetrain.Run(source, batch_size=BATCH, epochs=epochs, shuffle="none", history=history,
                           models=model, monitor_interval=monitor, verbose=0, checkpoint_every=None) as run:
            for epoch in run.epochs():
                for batch in epoch:
                    epoch.train_on_batch(model, batch.x, batch.y)
                ends.append(time.perf_counter())
    else:
        raise ValueError(variant)
    return ends


def run_backend(repeat: int, short: int, long: int, variants: list[str]) -> dict:
    """In this process (KERAS_BACKEND already set): the per-step ms of each variant."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT))
    import keras
    import numpy as np

    import pipetrain

    train_path, _ = pipetrain.sample_data()
    source = pipetrain.H5Source(train_path, x="images", y="labels")
    import h5py

    with h5py.File(train_path, "r") as f:
        x, y = f["images"][...], f["labels"][...]
    steps = -(-len(x) // BATCH)
    if keras.backend.backend() == "torch":  # Keras: "steps_per_execution must be 1 with the PyTorch backend"
        variants = [v for v in variants if v != "fit-spe16"]
    per_step: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeat):
            for variant in variants:  # round-robin: the machine's noise spreads over all
                ends = _one(variant, long, x, y, source, Path(tmp))
                per_step[variant].append(1000 * (ends[long - 1] - ends[short - 1]) / ((long - short) * steps))
    bare = per_step.get("bare")
    out = {"backend": keras.backend.backend(), "device": _device(), "steps_per_epoch": steps,
           "variants": {}}
    for variant, values in per_step.items():
        entry = {"ms_per_step": values, "median_ms": statistics.median(values), "best_ms": min(values)}
        if bare:
            entry["ratio_to_bare"] = statistics.median(v / b for v, b in zip(values, bare, strict=True))
            entry["overhead_pct"] = 100 * (entry["ratio_to_bare"] - 1)
        out["variants"][variant] = entry
    return out


def table(results: list[dict]) -> str:
    head = "| backend (device) | " + " | ".join(VARIANTS) + " |"
    rule = "|---|" + "---:|" * len(VARIANTS)
    rows = []
    for r in results:
        cells = []
        for v in VARIANTS:
            e = r["variants"].get(v)
            if e is None:
                cells.append("n/a" if v == "fit-spe16" and r["backend"] == "torch" else "")
            elif v == "bare":
                cells.append(f"{e['median_ms']:.2f}")
            else:
                cells.append(f"{e['median_ms']:.2f} ({e.get('ratio_to_bare', float('nan')):.2f}x)")
        rows.append(f"| {r['backend']} ({r['device']}) | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", nargs="+", default=["tensorflow", "jax", "torch"])
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--short", type=int, default=4, help="first epochs, not timed: the start-up (default 4)")
    p.add_argument("--long", type=int, default=24, help="epochs of each run (default 24)")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.in_process:
        json.dump(run_backend(args.repeat, args.short, args.long, args.variants), sys.stdout)
        return 0
    results = []
    for backend in args.backends:
        env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, __file__, "--in-process", "--repeat", str(args.repeat), "--short", str(args.short),
               "--long", str(args.long), "--variants", *args.variants]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(table(results[-1:]), flush=True)
    print()
    print(f"ms per step, median of {args.repeat} repeats (epochs {args.short + 1}-{args.long}); "
          "in brackets the ratio to bare")
    print(table(results))
    if args.out:
        meta = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                "repeat": args.repeat, "short": args.short, "long": args.long, "argv": sys.argv[1:]}
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
