"""Soak: 20,000 steps of a tiny model with every batch logged. Memory must not creep
and threads must not pile up.

    python benchmarks/soak.py [--steps 20000] [--out benchmarks/results/soak.json]

It trains a tiny MLP on a synthetic file (validation every epoch, a checkpoint every
1,000 batches, the system monitor sampling every 0.5 s) and reads the run's own
history: RSS growth after warm-up (target < 50 MB) and the thread count (target: no
growth; validation's producers come and go each epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import pipetrain  # noqa: E402

WARM_UP = 0.1  # the first tenth of the steps is warm-up (traces, allocator pools)


def make_file(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 16)).astype("float32")
    y = (x[:, :4].sum(axis=1) > 0).astype("int64")
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(256, 16), compression="gzip")
        f.create_dataset("y", data=y, chunks=(256,), compression="gzip")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "soak.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        steps_per_epoch = 500
        make_file(tmp / "train.h5", steps_per_epoch * args.batch_size)
        make_file(tmp / "val.h5", 2_000, seed=1)
        epochs = -(-args.steps // steps_per_epoch)
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dense(2, activation="softmax")])
        model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        history = tmp / "run" / "history.jsonl"
        t0 = time.perf_counter()
        pipetrain.train(
            model, pipetrain.H5Source(tmp / "train.h5", x="x", y="y"), epochs=epochs,
            batch_size=args.batch_size, validation=pipetrain.H5Source(tmp / "val.h5", x="x", y="y"),
            history=history, monitor_interval=0.5, checkpoint_every=1000, verbose=0,
        )
        seconds = time.perf_counter() - t0
        h = pipetrain.read_history(history)

    samples = h.system
    start_t = samples[0]["t"]
    end_t = samples[-1]["t"]
    warm = [s for s in samples if s["t"] >= start_t + WARM_UP * (end_t - start_t)]
    rss = [s["rss_mb"] for s in warm]
    threads = [s["threads"] for s in warm]
    result = {
        "steps": len(h.batches),
        "batch_records": len(h.batches),
        "epochs": len(h.epochs),
        "seconds": round(seconds, 1),
        "system_samples": len(samples),
        "rss_after_warm_up_mb": rss[0],
        "rss_end_mb": rss[-1],
        "rss_max_after_warm_up_mb": max(rss),
        "rss_growth_mb": round(max(rss) - rss[0], 1),
        # Validation starts and stops its own producers each epoch, so the count moves
        # between two levels; flat means the second half never goes above the first.
        "threads_min": min(threads),
        "threads_max": max(threads),
        "threads_max_first_half": max(threads[: len(threads) // 2]),
        "threads_max_second_half": max(threads[len(threads) // 2:]),
        "status": h.end["status"],
    }
    result["targets"] = {
        "rss_growth_mb < 50": result["rss_growth_mb"] < 50,
        "threads flat": result["threads_max_second_half"] <= result["threads_max_first_half"],
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
