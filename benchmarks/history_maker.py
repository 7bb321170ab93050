"""Histories of a chosen length, written as a real run writes them, for bench_history.py.

A job at 100 steps/s with batch 32 and 10,000 steps per epoch: a batch record per step
(loss, accuracy, timings, recent samples/s), an epoch record (with validation) at each
epoch end, a system sample every 2 s (200 steps; with the process's peak RSS, as a
run's monitor writes it), and one resume in the middle: the first segment is killed 400
batches after its last checkpoint (every 1,000 batches), leaving a torn line, and the
second segment resumes at that checkpoint, trains those 400 batches again and runs to
the end. Each segment writes through
:class:`~pipetrain.history.HistoryWriter`, as a run does: the second one cuts the torn
line, and the history's index (``.index``) is kept as a run keeps it.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

from pipetrain.history import HistoryWriter
from pipetrain.index import path_for

STEPS_PER_EPOCH = 10_000
BATCH = 32
STEP_S = 0.01
SYSTEM_EVERY = 200
CHECKPOINT_EVERY = 1_000
KILLED_AFTER = 400  # batches after the last checkpoint


def run_record(run_id: str, t: float, epochs: int, resume: dict | None) -> dict:
    return {
        "type": "run", "run": run_id, "t": t, "schema": 1, "started": "2026-11-25T15:52:40+00:00",
        "config": {"epochs": epochs, "batch_size": BATCH, "workers": 2, "max_queue": 8, "shuffle": "block",
                   "seed": 0, "validation": ["/data/val.h5"], "model": "default"},
        "model": {"name": "pipetrain_mlp", "params": 101_773},
        "models": {"model": "pipetrain_mlp"},
        "data": {"files": ["/data/train.h5"], "rows": STEPS_PER_EPOCH * BATCH, "batch_size": BATCH,
                 "steps_per_epoch": STEPS_PER_EPOCH, "shuffle": "block", "seed": 0, "epochs": epochs,
                 "fields": {"x": {"shape": [784], "dtype": "float32"}, "y": {"shape": [], "dtype": "int64"}}},
        "host": {"hostname": "vm", "cpus": 2, "memory_mb": 24106, "python": "3.11.7", "keras": "3.15.1",
                 "backend": "tensorflow", "backend_version": "2.21.0"},
        "resume": resume,
    }


def write_history(path: str | Path, batches: int, seed: int = 0) -> Path:
    """A history of ``batches`` batch lines (the resumed segment's repeats included)."""
    path = Path(path)
    rng = random.Random(seed)
    run_id = "20261125-155240-942e8b"
    epochs = math.ceil((batches - KILLED_AFTER) / STEPS_PER_EPOCH)
    kill = (batches - KILLED_AFTER) // 2 // CHECKPOINT_EVERY * CHECKPOINT_EVERY + KILLED_AFTER
    t = 1_764_085_960.0
    rss = peak = 700.0
    written = 0
    path.unlink(missing_ok=True)
    path_for(path).unlink(missing_ok=True)
    f = HistoryWriter(path)
    try:

        def emit(record):
            f.write(record)

        def train(start: int, stop: int) -> None:
            nonlocal t, rss, peak, written
            for step in range(start, stop):
                epoch, index = divmod(step, STEPS_PER_EPOCH)
                t += STEP_S * (0.9 + 0.2 * rng.random())
                loss = 2.3 * math.exp(-step / 400_000) * (0.8 + 0.4 * rng.random())
                if rng.random() < 1e-4:
                    loss *= 20  # a rare spike, as plots must keep visible
                emit({"type": "batch", "run": run_id, "t": round(t, 6), "epoch": epoch, "batch": index,
                      "step": step, "size": BATCH, "accuracy": round(rng.random(), 6),
                      "loss": loss, "step_s": round(0.008 + 0.002 * rng.random(), 6),
                      "wait_s": round(0.0001 * rng.random(), 6), "samples_per_s": round(3200 * (0.9 + 0.2 * rng.random()), 1)})
                written += 1
                if step % SYSTEM_EVERY == SYSTEM_EVERY - 1:
                    rss += rng.uniform(-1, 1.05)
                    peak = max(peak, rss + 0.25 * (step // SYSTEM_EVERY % 5))  # the kernel's: spikes between samples
                    emit({"type": "system", "run": run_id, "t": round(t, 6), "rss_mb": round(rss, 2),
                          "peak_rss_mb": round(peak, 2), "cpu_pct": round(rng.uniform(90, 110), 1),
                          "sys_available_mb": round(22_000 - rss, 1), "threads": 11})
                if index == STEPS_PER_EPOCH - 1:
                    t += 3.0
                    emit({"type": "epoch", "run": run_id, "t": round(t, 6), "epoch": epoch,
                          "loss": round(loss, 6), "accuracy": round(rng.random(), 6),
                          "val_loss": round(loss * 1.1, 6), "val_accuracy": round(rng.random(), 6),
                          "samples": STEPS_PER_EPOCH * BATCH, "batches": STEPS_PER_EPOCH,
                          "time_s": 100.0, "samples_per_s": 3200.0, "wait_s": 0.5, "input_bound_pct": 0.5,
                          "read_mb": 1000.0, "read_mb_s": 100.0, "disk_mb": 500.0, "val_time_s": 3.0,
                          "complete": True})

        emit(run_record(run_id, t, epochs, None))
        train(0, kill)
        killed = f  # noqa: F841 - killed: nothing more of it is written, nothing sealed
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # killed mid-write: half a line
        os.write(fd, b'{"type":"batch","run":"' + run_id.encode() + b'","t":17')
        os.close(fd)
        f = HistoryWriter(path)  # the resumed run cuts the torn line and appends
        peak = rss  # (a new process)
        at = kill - KILLED_AFTER
        t += 30.0
        emit(run_record(run_id, t, epochs, {"epoch": at // STEPS_PER_EPOCH, "batch": at % STEPS_PER_EPOCH,
                                            "step": at}))
        train(at, at + batches - written)
        emit({"type": "end", "run": run_id, "t": round(t + 0.5, 6), "status": "stopped", "epochs": (at + batches - kill) // STEPS_PER_EPOCH,
              "steps": at + batches - kill, "error": None, "peak_rss_mb": round(rss + 5, 2),
              "checkpoint": None})
    finally:
        f.close()
    return path
