"""Paired blocks: pipetrain's loop against training alone and the backend's own loader,
step for step, on a machine whose speed drifts.

    KERAS_BACKEND=torch python benchmarks/bench_paired.py [--workload digits w1 w2]
        [--block 200] [--rounds 8] [--settle 0.5] [--parts] [--control] [--priorities low normal]
        [--processes 1] [--data-dir /tmp/bt-data] [--out results/paired-torch.json]

bench_train.py and bench_overhead.py run each variant for whole epochs, one after the
other; on this shared 2-core machine the speed of the same work swings by 25-70% within
minutes, more than the differences they measure. Here every variant is a training loop
written as a generator that yields after each step, with its own model (same
architecture, same seed). One process runs them in turn, ``--block`` steps each, round
after round: variants measured seconds apart share the machine's state, so each round's
ratio of a variant's block to ``memory``'s block is free of the drift, and the report
gives the median ms/step and the median of those per-round ratios. It also gives
``positions``: each step of the block timed, the median over the rounds taken at each
position in the block, summed, over ``memory``'s. A block of one epoch (``--block 45`` on
digits) puts the epoch's end at the same position every round, so that ratio counts its
cost every round while the noisy rounds drop out (the block medians' spread on this
machine is wider than the epoch end's whole cost). From the same medians, with a block of
one epoch: ``step_us``, the median of positions 1 to the last but one (what a step
costs), and ``first_step_us``, position 0: the step plus everything done between one
epoch's last step and the next's first (the epoch's metrics and record, the checkpoint,
the next epoch's first block); ``first_step_extra_us`` is that less training alone's
step. Before each block the
process sleeps ``--settle`` seconds: the loaders whose turn just ended refill their
bounded queues then, not inside the next variant's block (a loader's producers would
otherwise decode on the time of the variant measured after it). The order rotates by
round, so no variant always runs first or always after the same neighbour. The medians
of two identical loops (``--control``) still differ by up to 6% in one process (0.98 to
1.06 in a week's runs), and by another amount in the next: ``--processes N`` runs the
whole measurement in N fresh processes, one after the other, and reports the median of
their ratios.

- ``memory``: ``model.train_on_batch`` on in-memory slices of the file's arrays (training
  alone: what the step itself costs);
- ``pipetrain``: a ``pipetrain.Run`` loop calling ``epoch.train_on_batch``, with the
  history and the system monitor on, and a checkpoint at each epoch's end (what
  ``train()`` runs); with ``--parts`` also ``pipetrain-no-ckpt`` (the same without the
  checkpoints) and ``pipetrain-no-hist`` (no history, hence no checkpoints), to say what
  each costs; with ``--priorities`` also ``pipetrain-<priority>`` (the producers at that
  CPU priority instead of idle: ``producer_priority``); with ``--control`` also
  ``memory-again`` (training alone once more, its own model: its ratio to ``memory`` is
  what two identical loops differ by on this machine, the floor under every other ratio);
- ``loader``: the backend's own loader feeding ``model.train_on_batch``: torch's
  ``DataLoader`` (2 worker processes), Grain (2 worker processes) on JAX, ``tf.data``
  (a generator of h5py slices, prefetched) on TensorFlow.

Workloads: ``digits`` (issue 15: the digits MLP, batch 32, 1-4 ms steps: pipetrain's
per-step cost) and ``w1``, ``w2`` of bench_train.py (issue 11: the data path). A loader
begins each block with its queue full (pipetrain 8 batches, the DataLoader 4): batches
decoded outside the block, so the block is long (``--block``, default 200 steps, 80 on
W2 whose steps are 10x longer) for those to be a few percent of it.
"""

from __future__ import annotations

import argparse
import itertools
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

import h5py  # noqa: E402
import keras  # noqa: E402

import peers  # noqa: E402  (benchmarks/peers.py)
import pipetrain  # noqa: E402
from bench_overhead import _device  # noqa: E402
from bench_overhead import _model as digits_model  # noqa: E402
from bench_train import WORKLOADS, build_model  # noqa: E402
from pipetrain.synth import make_data  # noqa: E402

BACKEND = keras.backend.backend()
LOADER = {"torch": "DataLoader", "jax": "Grain", "tensorflow": "tf.data"}[BACKEND]


def workload(name: str, data_dir: Path) -> tuple[str, dict, str, str, object]:
    """(file, spec, x name, y name, model builder) of a workload; its file made if missing."""
    if name == "digits":
        path, _ = pipetrain.sample_data()
        return str(path), {"batch": 32}, "images", "labels", digits_model
    spec = WORKLOADS[name]
    path = data_dir / f"{name}.h5"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        make_data(path, spec["rows"], spec["features"], 10, spec["dtype"], spec["compression"],
                  spec["shuffle_filter"], 256)
    return str(path), spec, "x", "y", lambda: build_model(spec["model"], spec["features"])


def memory(path, x_name, y_name, batch, model):
    with h5py.File(path) as f:
        x, y = f[x_name][...], f[y_name][...]
    while True:
        for a in range(0, len(x), batch):
            model.train_on_batch(x[a:a + batch], y[a:a + batch])
            yield


def with_pipetrain(path, x_name, y_name, batch, model, folder: Path, history=True, checkpoints=True,
                   priority="idle"):
    source = pipetrain.H5Source(path, x=x_name, y=y_name)
    with pipetrain.Run(source, batch_size=batch, epochs=10**6, shuffle="none", models=model,
                       history=str(folder / "history.jsonl") if history else None, monitor_interval=2.0,
                       verbose=0, checkpoint_every=None, producer_priority=priority) as run:
        if not checkpoints:  # (--parts) no checkpoint at the epochs' ends: what they cost
            run.save_checkpoint = lambda *args, **kwargs: None
        for epoch in run.epochs():
            for b in epoch:
                epoch.train_on_batch(model, b.x, b.y)
                yield


def with_loader(path, x_name, y_name, batch, model):
    if BACKEND == "torch":
        loader = peers.torch_loader(path, batch, x=x_name, y=y_name)
        batches = itertools.chain.from_iterable(itertools.repeat(loader))
    elif BACKEND == "jax":
        batches = peers.grain_batches(path, batch, epochs=10**4, x=x_name, y=y_name)
    else:
        batches = itertools.chain.from_iterable(itertools.repeat(peers.tf_dataset(path, batch, x=x_name, y=y_name)))
    for x, y in batches:
        model.train_on_batch(x, y)
        yield


def run(name: str, block: int, rounds: int, data_dir: Path, settle: float, parts: bool = False,
        priorities: tuple[str, ...] = (), control: bool = False) -> dict:
    path, spec, x_name, y_name, builder = workload(name, data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        for sub in ("a", "b"):
            (Path(tmp) / sub).mkdir()
        loops = {"memory": memory(path, x_name, y_name, spec["batch"], builder()),
                 "pipetrain": with_pipetrain(path, x_name, y_name, spec["batch"], builder(), Path(tmp) / "a"),
                 LOADER: with_loader(path, x_name, y_name, spec["batch"], builder())}
        if parts:
            loops["pipetrain-no-ckpt"] = with_pipetrain(path, x_name, y_name, spec["batch"], builder(),
                                                        Path(tmp) / "b", checkpoints=False)
            loops["pipetrain-no-hist"] = with_pipetrain(path, x_name, y_name, spec["batch"], builder(), Path(tmp),
                                                        history=False)
        if control:  # training alone again, its own model: the ratio between identical loops is the noise
            loops["memory-again"] = memory(path, x_name, y_name, spec["batch"], builder())
        for priority in priorities:
            (Path(tmp) / priority).mkdir()
            loops[f"pipetrain-{priority}"] = with_pipetrain(path, x_name, y_name, spec["batch"], builder(),
                                                           Path(tmp) / priority, priority=priority)
        ms: dict[str, list[float]] = {v: [] for v in loops}
        steps: dict[str, list[list[float]]] = {v: [[] for _ in range(block)] for v in loops}  # ms, by position
        try:
            names = list(loops)
            for r in range(rounds + 1):  # round 0 warms up (tracing, workers, page cache): not counted
                # the order rotates by round: no variant always follows the same one (whose threads
                # may still be busy) or always comes first
                for variant in names[r % len(names):] + names[:r % len(names)]:
                    time.sleep(settle)
                    loop = loops[variant]
                    t0 = t = time.perf_counter()
                    for i in range(block):
                        next(loop)
                        if r:
                            steps[variant][i].append(1000 * (time.perf_counter() - t))
                        t = time.perf_counter()
                    if r:
                        ms[variant].append(1000 * (time.perf_counter() - t0) / block)
        finally:
            for loop in loops.values():
                loop.close()
    out = {"workload": name, "backend": BACKEND, "device": _device(), "batch": spec["batch"], "block": block,
           "rounds": rounds, "settle_s": settle, "variants": {}}
    # The block's step at each position, its median over the rounds, summed over the block: robust to
    # the rounds a noisy neighbour slowed, yet every position's cost counts (with a block of one epoch,
    # the epoch's end and checkpoint, which a median of whole blocks can hide in the noise).
    medians = {v: [statistics.median(t) for t in by_position] for v, by_position in steps.items()}
    positions = {v: sum(m) for v, m in medians.items()}
    step_us = {v: 1000 * statistics.median(m[1:-1] or m) for v, m in medians.items()}
    for variant, values in ms.items():
        ratios = [v / m for v, m in zip(values, ms["memory"], strict=True)]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out["variants"][variant] = {
            "ms_per_step": [round(v, 3) for v in values], "median_ms": round(statistics.median(values), 3),
            "x_memory": round(statistics.median(ratios), 3),
            "x_memory_iqr": [round(quartiles[0], 3), round(quartiles[2], 3)],
            # the whole time of the variant's blocks over training alone's: one ratio of all rounds' sums
            "x_memory_total": round(sum(values) / sum(ms["memory"]), 3),
            "x_memory_positions": round(positions[variant] / positions["memory"], 3),
            # with a block of one epoch: a step, and the first step (with what the epoch's end costs)
            "step_us": round(step_us[variant]), "step_x_memory": round(step_us[variant] / step_us["memory"], 3),
            "first_step_us": round(1000 * medians[variant][0]),
            "first_step_extra_us": round(1000 * medians[variant][0] - step_us["memory"]),
            "position_medians_ms": [round(m, 4) for m in medians[variant]],
            "x_loader": round(statistics.median(v / m for v, m in zip(values, ms[LOADER], strict=True)), 3)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", nargs="+", default=["digits", "w1", "w2"], choices=["digits", *WORKLOADS])
    p.add_argument("--block", type=int, default=None, help="steps per variant per round (default 200, W2 80)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--settle", type=float, default=0.5, help="seconds of sleep before each block (default 0.5)")
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "pipetrain-bench"))
    p.add_argument("--parts", action="store_true",
                   help="also pipetrain without its epoch-end checkpoints, and without history (nor checkpoints)")
    p.add_argument("--priorities", nargs="*", default=[], choices=["low", "normal"],
                   help="also pipetrain with its producers at these CPU priorities (default: idle only)")
    p.add_argument("--control", action="store_true",
                   help="also training alone a second time (memory-again): how far two identical loops differ here")
    p.add_argument("--processes", type=int, default=1,
                   help="run the whole measurement this many times, each in a fresh process, and give the median "
                        "of their ratios: two identical loops differ by up to 6%% in one process, and by another "
                        "amount in the next")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args()
    if args.processes > 1:
        return in_processes(args)
    results = []
    for name in args.workload:
        block = args.block or (80 if name == "w2" else 200)
        r = run(name, block, args.rounds, Path(args.data_dir), args.settle, args.parts, tuple(args.priorities),
                args.control)
        results.append(r)
        print(f"{name} on {BACKEND} ({r['device']}), {args.rounds} rounds of {block} steps:")
        for variant, v in r["variants"].items():
            low, high = v["x_memory_iqr"]
            print(f"  {variant:17s} {v['median_ms']:8.2f} ms/step   x memory {v['x_memory']:.3f} "
                  f"(rounds' IQR {low:.3f}-{high:.3f}, sums {v['x_memory_total']:.3f}, "
                  f"positions {v['x_memory_positions']:.3f})   "
                  f"x {LOADER} {v['x_loader']:.3f}   step {v['step_us']} us ({v['step_x_memory']:.3f}x), "
                  f"first step {v['first_step_extra_us']:+d} us", flush=True)
    if args.out:
        meta = {"cpus": os.cpu_count(), "python": platform.python_version(), "keras": keras.__version__,
                "load_1min": round(os.getloadavg()[0], 2), "argv": sys.argv[1:]}
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


def in_processes(args) -> None:
    """``--processes N``: the measurement N times, one fresh process after the other; per
    workload and variant the median over the processes of each ratio, and each one's."""
    import subprocess

    runs = []
    for i in range(args.processes):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run.json"
            argv = ["--workload", *args.workload, "--rounds", str(args.rounds), "--settle", str(args.settle),
                    "--data-dir", args.data_dir, "--out", str(out), *(["--block", str(args.block)] if args.block else []),
                    *(["--parts"] if args.parts else []), *(["--control"] if args.control else []),
                    *(["--priorities", *args.priorities] if args.priorities else [])]
            print(f"process {i + 1} of {args.processes}:", flush=True)
            subprocess.run([sys.executable, __file__, *argv], check=True)
            runs.append(json.loads(out.read_text()))
    ratios = ("x_memory", "x_memory_positions", "step_x_memory", "x_loader")
    summary = []
    for w, first in enumerate(runs[0]["results"]):
        variants = {}
        for variant in first["variants"]:
            each = [run["results"][w]["variants"][variant] for run in runs]
            variants[variant] = {**{f"{r}_median": round(statistics.median(v[r] for v in each), 3) for r in ratios},
                                 **{f"{r}_each": [v[r] for v in each] for r in ratios},
                                 "median_ms_each": [v["median_ms"] for v in each],
                                 "first_step_extra_us_median": round(statistics.median(
                                     v["first_step_extra_us"] for v in each))}
        summary.append({key: first[key] for key in ("workload", "backend", "device", "batch", "block", "rounds")}
                       | {"processes": args.processes, "variants": variants})
    print(f"medians over {args.processes} processes:")
    for s in summary:
        print(f"{s['workload']} on {s['backend']} ({s['device']}):")
        for variant, v in s["variants"].items():
            print(f"  {variant:17s} x memory {v['x_memory_median']:.3f}  positions {v['x_memory_positions_median']:.3f} "
                  f"(each {', '.join(f'{x:.3f}' for x in v['x_memory_positions_each'])})  "
                  f"step {v['step_x_memory_median']:.3f}  first step {v['first_step_extra_us_median']:+d} us")
    if args.out:
        meta = {"cpus": os.cpu_count(), "python": platform.python_version(), "keras": keras.__version__,
                "argv": sys.argv[1:]}
        Path(args.out).write_text(json.dumps({"meta": meta, "results": summary, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
