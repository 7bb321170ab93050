"""Thread hand-overs per step: what a pipetrain loop costs beyond Python calls (issue 15).

    KERAS_BACKEND=torch python benchmarks/bench_handoffs.py [--epochs 21] [--history]

Runs a ``pipetrain.Run`` loop on the digits MLP (batch 32, 45 steps an epoch) and counts,
per step after the first epoch: each thread's context switches (voluntary: it blocked,
on a lock, the GIL or a sleep; involuntary: it was preempted), from
``/proc/self/task/*/status``; how often the consumer waited for a batch; how many batches
the consumer copied itself (:meth:`pipetrain.pipeline.Prefetcher._build_here`); and the
producers' CPU time per batch. These are counts, not times: they do not drift with the
machine's speed as wall times do on a shared 2-core VM, and each hand-over of a batch or
of the GIL costs tens of microseconds there. Linux only.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def switches() -> dict[str, list[int]]:
    """(voluntary, involuntary) context switches so far, summed by thread kind."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, list[int]] = {}
    for task in glob.glob("/proc/self/task/*"):
        try:
            text = open(f"{task}/status").read()
        except OSError:
            continue
        name = names.get(int(task.rsplit("/", 1)[1]), "other (compute threads)")
        kind = "producers" if "-producer-" in name else name
        counts = out.setdefault(kind, [0, 0])
        counts[0] += int(text.split("\nvoluntary_ctxt_switches:")[1].split()[0])
        counts[1] += int(text.split("nonvoluntary_ctxt_switches:")[1].split()[0])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=21)
    p.add_argument("--history", action="store_true", help="with the history, monitor and checkpoints")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    import keras

    import bench_overhead
    import pipetrain
    from pipetrain import pipeline

    counts: collections.Counter = collections.Counter()
    producer_cpu: list[float] = []
    consumer = threading.main_thread()
    build, produce, wait = pipeline.Prefetcher._build, pipeline._produce, threading.Condition.wait

    def counted_build(self, plan, buffers):
        counts["built by the consumer" if threading.current_thread() is consumer else "built by producers"] += 1
        return build(self, plan, buffers)

    def counted_wait(self, timeout=None):
        if threading.current_thread() is consumer:
            counts["consumer waits"] += 1
        return wait(self, timeout)

    def timed_produce(*a):
        try:
            produce(*a)
        finally:
            producer_cpu.append(time.thread_time())

    pipeline.Prefetcher._build = counted_build
    pipeline._produce = timed_produce
    path, _ = pipetrain.sample_data()
    source = pipetrain.H5Source(path, x="images", y="labels")
    model = bench_overhead._model()
    steps = 0
    with tempfile.TemporaryDirectory() as tmp:
        history = f"{tmp}/history.jsonl" if args.history else None
        with pipetrain.Run(source, batch_size=bench_overhead.BATCH, epochs=args.epochs, shuffle="none", models=model,
                           history=history, monitor_interval=2.0 if args.history else None, verbose=0,
                           checkpoint_every=None) as run:
            for epoch in run.epochs():
                if epoch.index == 1:  # the first epoch builds, traces and starts threads
                    counts.clear()
                    start = switches()
                    threading.Condition.wait = counted_wait
                if epoch.index == args.epochs - 1:  # the last ends the threads: not counted
                    end, counted = switches(), dict(counts)
                    threading.Condition.wait = wait
                for batch in epoch:
                    epoch.train_on_batch(model, batch.x, batch.y)
                    steps += 1 <= epoch.index < args.epochs - 1
    pipeline.Prefetcher._build, pipeline._produce = build, produce
    per_step = {kind: [round((end[kind][i] - start.get(kind, [0, 0])[i]) / steps, 2) for i in (0, 1)] for kind in end}
    out = {"backend": keras.backend.backend(), "history": args.history, "steps": steps,
           "threads": os.environ.get("OMP_NUM_THREADS"),
           "switches_per_step (voluntary, involuntary)": per_step,
           "per_step": {k: round(v / steps, 3) for k, v in sorted(counted.items())},
           "producer_cpu_us_per_batch (whole run)": round(1e6 * sum(producer_cpu) / (steps * args.epochs / (args.epochs - 2)), 1)}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
