"""Per step or per epoch: where pipetrain's cost over a bare loop is (issue 15).

    KERAS_BACKEND=torch python benchmarks/bench_epoch_costs.py [--epochs 12] [--rounds 5]
                                                             [--out results/epoch-costs-torch.json]

bench_overhead.py and bench_paired.py time whole epochs or blocks of steps, which mixes
two kinds of cost: what every step pays (the batch's hand-over, its history line) and
what each epoch's end pays once (the exact epoch metrics, the epoch record and the
history's fsync, the checkpoint, the first block of the next epoch to decode). Here each
variant runs ``--epochs`` epochs of the digits MLP (batch 32, 45 steps an epoch) and the
time from one step's end to the next is kept by the step's position in its epoch; the
first two epochs (start-up) are not. Per variant, the median over epochs of each
position gives:

- ``steady_us``: the median of positions 2 to the last but one: what a step costs;
- ``first_step_us``: position 0, from the epoch's last step to the next epoch's first:
  the step plus everything done between epochs;
- ``epoch_ms``: the mean time of an epoch, what a run pays (``epoch_of_medians_ms``, the
  sum of the positions' medians, leaves out the steps that the work of an epoch's end
  slows now and then: the checkpoint's writing thread, say).

Variants, one after the other in each of ``--rounds`` rounds, each with its own model,
so that a round's ratios to ``bare`` (median over rounds) are free of the machine's drift:
``bare`` (``model.train_on_batch`` on in-memory slices), ``run`` (a ``pipetrain.Run``
loop calling ``epoch.train_on_batch``, no history), ``run+hist`` (with the history and
the monitor, but no checkpoints), ``run+hist+ckpt`` (with a checkpoint at each epoch's
end too: what ``train()`` does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = ["bare", "run", "run+hist", "run+hist+ckpt"]


def _positions(epochs) -> dict[int, list[float]]:
    """Microseconds from each step's end to the next, by the step's position in its epoch,
    for epochs 2 onwards; ``epochs`` yields each epoch's steps (an iterator that trains
    one step per item)."""
    out: dict[int, list[float]] = {}
    last = None
    for index, steps in enumerate(epochs):
        for position, _ in enumerate(steps):
            now = time.perf_counter()
            if index >= 2:
                out.setdefault(position, []).append(1e6 * (now - last))
            last = now
    return out


def bare(epochs: int, x, y, batch: int) -> dict[int, list[float]]:
    from bench_overhead import _model

    model = _model()

    def steps():
        for start in range(0, len(x), batch):
            yield model.train_on_batch(x[start:start + batch], y[start:start + batch])

    return _positions(steps() for _ in range(epochs))


def with_run(epochs: int, source, batch: int, history: bool, checkpoints: bool) -> dict[int, list[float]]:
    from bench_overhead import _model

    import pipetrain

    model = _model()
    with tempfile.TemporaryDirectory() as tmp:
        with pipetrain.Run(source, batch_size=batch, epochs=epochs, shuffle="none", models=model,
                           history=f"{tmp}/history.jsonl" if history else None,
                           monitor_interval=2.0 if history else None, verbose=0, checkpoint_every=None) as run:
            if not checkpoints:  # the same run without its epoch-end checkpoints: what they cost
                run.save_checkpoint = lambda *args, **kwargs: None
            return _positions((epoch.train_on_batch(model, b.x, b.y) for b in epoch) for epoch in run.epochs())


def summary(positions: dict[int, list[float]]) -> dict:
    medians = {p: statistics.median(v) for p, v in positions.items()}
    last = max(medians)
    epochs = len(positions[0])
    return {"steady_us": statistics.median(medians[p] for p in range(2, last)),
            "first_step_us": medians[0],
            "epoch_ms": sum(sum(v) for v in positions.values()) / epochs / 1e3,
            "epoch_of_medians_ms": sum(medians.values()) / 1e3}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    import h5py
    import keras

    import pipetrain
    from bench_overhead import BATCH, _device

    path, _ = pipetrain.sample_data()
    with h5py.File(path) as f:
        x, y = f["images"][...], f["labels"][...]
    source = pipetrain.H5Source(path, x="images", y="labels")
    run_of = {"bare": lambda: bare(args.epochs, x, y, BATCH),
              "run": lambda: with_run(args.epochs, source, BATCH, False, False),
              "run+hist": lambda: with_run(args.epochs, source, BATCH, True, False),
              "run+hist+ckpt": lambda: with_run(args.epochs, source, BATCH, True, True)}
    rounds: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            rounds[variant].append(summary(run_of[variant]()))
    table = {}
    for variant, done in rounds.items():
        row = {key: round(statistics.median(r[key] for r in done), 3) for key in done[0]}
        for key in ("steady_us", "epoch_ms", "epoch_of_medians_ms"):
            row[f"{key.removesuffix('_us').removesuffix('_ms')}_x_bare"] = round(statistics.median(
                r[key] / b[key] for r, b in zip(done, rounds["bare"], strict=True)), 3)
        row["first_step_extra_us"] = round(statistics.median(
            r["first_step_us"] - b["steady_us"] for r, b in zip(done, rounds["bare"], strict=True)))
        table[variant] = row
    out = {"backend": keras.backend.backend(), "device": _device(), "epochs": args.epochs, "rounds": args.rounds,
           "steps_per_epoch": len(range(0, len(x), BATCH)), "cpus": os.cpu_count(),
           "python": platform.python_version(), "keras": keras.__version__, "load_1min": round(os.getloadavg()[0], 1),
           "variants": table}
    print(f"digits on {out['backend']} ({out['device']}), {args.rounds} rounds of {args.epochs} epochs "
          f"({out['steps_per_epoch']} steps each):")
    for variant, row in table.items():
        print(f"  {variant:14s} step {row['steady_us']:7.0f} us ({row['steady_x_bare']:.3f}x bare)   "
              f"first step +{row['first_step_extra_us']:5.0f} us   epoch {row['epoch_ms']:7.2f} ms "
              f"({row['epoch_x_bare']:.3f}x bare; of medians {row['epoch_of_medians_x_bare']:.3f}x)")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
