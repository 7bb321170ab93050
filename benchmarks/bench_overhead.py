"""Per-step cost of pipetrain against a bare ``train_on_batch`` loop (issue 15).

    python benchmarks/bench_overhead.py [--backends tensorflow jax torch] [--rounds 40]
                                        [--settle 0.05] [--out benchmarks/results/overhead.json]
    python benchmarks/bench_overhead.py --sequential [--repeat 3] [--long 24]

The model is the digits MLP (8x8 -> 128 -> 10, batch 32) on the sample digits (1,438
rows, 45 steps an epoch). Each backend runs in its own process (the backend is chosen at
import). Variants:

- ``bare``: ``model.train_on_batch`` on in-memory slices of the same data;
- ``fit-spe16``: ``model.fit(steps_per_execution=16)`` on the in-memory arrays (the peer
  that beats the bare loop);
- ``train``: ``pipetrain.train``, no history, no monitor;
- ``train+hist``: ``pipetrain.train`` with the history and the system monitor on (and so
  a checkpoint at each epoch's end);
- ``run+hist``: a ``pipetrain.Run`` loop calling ``epoch.train_on_batch``, history,
  monitor and checkpoints on;
- ``train+hist spe16``: ``pipetrain.train(steps_per_execution=16)``, history and monitor on.

By default the variants are interleaved: each trains in its own thread, all alive at
once, and they take turns of one epoch each (from one ``on_epoch_end`` to the next, so
each turn holds one epoch's end: its record, its checkpoint), the order rotating by
round, the others waiting meanwhile. On this shared machine the speed of the same work
drifts by 25-70% within minutes, so whole runs one after the other (``--sequential``: the
time of epochs ``--short`` + 1 to ``--long`` of each run, ``--repeat`` runs round-robin;
how this script measured first) compare moments minutes apart: the bare loop alone
measured 4.4 to 7.8 ms a step in five such runs. Turns a fraction of a second apart share
the machine's state; each round's ratio to ``bare`` is free of the drift, and the table
shows the median ms/step and the median of the rounds' ratios (the JSON adds their
interquartile range and the ratio of all rounds' sums). The first ``--short`` rounds take
the start-up (tracing, compiling, threads, files) and are not timed. After each turn the
process sleeps ``--settle`` seconds, so that a variant's background work after its
epoch (the history's sync, the next block's decoding) does not land in the next
variant's turn; the process CPU time spent in that sleep is recorded
(``after_epoch_cpu_ms``): its excess over ``bare``'s is the part of a variant's cost
this leaves out.

The device each backend computed on is recorded. The machine may be shared: compare
ratios, not absolute times.
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
import threading
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


def _one(variant: str, epochs: int, x, y, source, folder: Path, at_epoch_end) -> None:
    """Train ``variant`` on a fresh model for ``epochs`` epochs; ``at_epoch_end()`` is called
    at each epoch's end (from ``on_epoch_end`` where the loop is ``fit``'s or ``train``'s)."""
    import keras

    import pipetrain

    class Clock(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            at_epoch_end()

    model = _model()
    history = str(folder / f"{time.monotonic_ns()}" / "history.jsonl") if "hist" in variant else None
    monitor = 2.0 if "hist" in variant else None
    if variant == "bare":
        n = len(x)
        for _ in range(epochs):
            for start in range(0, n, BATCH):
                model.train_on_batch(x[start:start + BATCH], y[start:start + BATCH])
            at_epoch_end()
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
                at_epoch_end()
    else:
        raise ValueError(variant)


class _Turns:
    """A variant trained in its own thread one epoch per turn: :meth:`turn` lets it train
    until its next epoch's end and returns the seconds that took; meanwhile the other
    variants' threads wait. So variants measured in turn, a fraction of a second apart,
    share the machine's state, and each round's ratios to ``bare`` are free of its drift."""

    def __init__(self, name: str, train):
        self._go, self._back = threading.Semaphore(0), threading.Semaphore(0)
        self.error: BaseException | None = None
        self.done = False
        self._thread = threading.Thread(target=self._main, args=(train,), name=name, daemon=True)
        self._started = False

    def _main(self, train) -> None:
        self._go.acquire()
        try:
            train(self._pause)
        except BaseException as e:  # raised by turn(), in the main thread
            self.error = e
        self.done = True
        self._back.release()

    def _pause(self) -> None:
        self._back.release()
        self._go.acquire()

    def turn(self) -> float:
        if not self._started:
            self._started = True
            self._thread.start()
        t0 = time.perf_counter()
        self._go.release()
        self._back.acquire()
        seconds = time.perf_counter() - t0
        if self.error is not None:
            raise self.error
        return seconds

    def finish(self) -> None:
        while not self.done:
            self.turn()
        self._thread.join()


def run_interleaved(rounds: int, short: int, settle: float, variants: list[str], x, y, source, folder: Path) -> dict:
    """Every variant alive at once, one epoch each in turn (the order rotating by round),
    ``settle`` seconds of sleep after each turn: ``short`` warm-up rounds, then
    ``rounds`` timed ones. Returns, per variant, its epochs' seconds and the process CPU
    seconds spent in the settle before the next turn (its threads' work after the epoch)."""
    turns = {v: _Turns(v, lambda pause, v=v: _one(v, short + rounds, x, y, source, folder, pause)) for v in variants}
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    after: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(short + rounds):  # (on an error, the variants' daemon threads end with the process)
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for variant in order:
            took = turns[variant].turn()
            cpu = time.process_time()
            time.sleep(settle)  # the variant's threads finish its epoch's work here, not in the next turn
            if r >= short:
                seconds[variant].append(took)
                after[variant].append(time.process_time() - cpu)
    for t in turns.values():
        t.finish()
    return {"seconds": seconds, "after_cpu_s": after}


def run_backend(args) -> dict:
    """In this process (KERAS_BACKEND already set): the per-step ms of each variant."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT))
    import h5py
    import keras

    import pipetrain

    train_path, _ = pipetrain.sample_data()
    source = pipetrain.H5Source(train_path, x="images", y="labels")
    with h5py.File(train_path, "r") as f:
        x, y = f["images"][...], f["labels"][...]
    steps = -(-len(x) // BATCH)
    variants = args.variants
    if keras.backend.backend() == "torch":  # Keras: "steps_per_execution must be 1 with the PyTorch backend"
        variants = [v for v in variants if v != "fit-spe16"]
    per_step: dict[str, list[float]] = {v: [] for v in variants}
    after_ms: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.sequential:
            for _ in range(args.repeat):
                for variant in variants:  # round-robin: the machine's noise spreads over all
                    ends: list[float] = []
                    _one(variant, args.long, x, y, source, Path(tmp), lambda: ends.append(time.perf_counter()))
                    timed = ends[-1] - ends[args.short - 1]
                    per_step[variant].append(1000 * timed / ((args.long - args.short) * steps))
        else:
            done = run_interleaved(args.rounds, args.short, args.settle, variants, x, y, source, Path(tmp))
            for variant in variants:
                per_step[variant] = [1000 * s / steps for s in done["seconds"][variant]]
                after_ms[variant] = round(1000 * statistics.median(done["after_cpu_s"][variant]), 2)
    bare = per_step.get("bare")
    out = {"backend": keras.backend.backend(), "device": _device(), "steps_per_epoch": steps,
           "method": "sequential" if args.sequential else "interleaved", "variants": {}}
    for variant, values in per_step.items():
        entry = {"ms_per_step": [round(v, 4) for v in values], "median_ms": statistics.median(values),
                 "best_ms": min(values)}
        if bare:
            ratios = [v / b for v, b in zip(values, bare, strict=True)]
            entry["ratio_to_bare"] = statistics.median(ratios)
            if len(ratios) > 1:
                entry["ratio_iqr"] = [round(q, 4) for q in statistics.quantiles(ratios, n=4)[::2]]
            entry["overhead_pct"] = 100 * (entry["ratio_to_bare"] - 1)
            entry["ratio_of_sums"] = round(sum(values) / sum(bare), 4)  # all rounds' time over bare's
        if variant in after_ms:
            entry["after_epoch_cpu_ms"] = after_ms[variant]
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
    p.add_argument("--rounds", type=int, default=40, help="timed rounds, one epoch of each variant (default 40)")
    p.add_argument("--settle", type=float, default=0.05, help="seconds of sleep after each turn (default 0.05)")
    p.add_argument("--sequential", action="store_true",
                   help="whole runs one after the other instead (--repeat runs of --long epochs each)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--short", type=int, default=4, help="first epochs (rounds), not timed: the start-up (default 4)")
    p.add_argument("--long", type=int, default=24, help="--sequential: epochs of each run (default 24)")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.in_process:
        json.dump(run_backend(args), sys.stdout)
        return 0
    results = []
    for backend in args.backends:
        env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, __file__, "--in-process", "--repeat", str(args.repeat), "--short", str(args.short),
               "--long", str(args.long), "--rounds", str(args.rounds), "--settle", str(args.settle),
               "--variants", *args.variants, *(["--sequential"] if args.sequential else [])]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(table(results[-1:]), flush=True)
    print()
    how = (f"median of {args.repeat} whole runs (epochs {args.short + 1}-{args.long})" if args.sequential
           else f"median of {args.rounds} rounds of one epoch each, in turn")
    print(f"ms per step, {how}; in brackets the median of the rounds' ratios to bare")
    print(table(results))
    if args.out:
        meta = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                "method": "sequential" if args.sequential else "interleaved", "rounds": args.rounds,
                "settle_s": args.settle, "repeat": args.repeat, "short": args.short, "long": args.long,
                "argv": sys.argv[1:]}
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
