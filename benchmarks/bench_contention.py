"""Producer priority on a busy machine: ``pipetrain.train`` beside N processes that keep
every core busy, with the producers at each priority.

    python benchmarks/bench_contention.py [--busy 2] [--repeat 3] [--epochs 3] [--rows 200000]
    python benchmarks/bench_contention.py --busy 0 --out benchmarks/results/contention-quiet.json

The workload is W1's shape at 200,000 rows (784 float32 features, gzip level 1, chunks of
256 rows, the MLP 784-256-256-10, batch 256, file order). ``--busy`` processes spin at
normal priority for the whole benchmark (``--busy 0``: the quiet machine, to see what the
adaptive default costs where nothing competes). Variants run round-robin in one process:

- ``idle (fixed)``: producers at ``SCHED_IDLE`` and never raised;
- ``low (fixed)``: nice 19, never raised;
- ``normal``: ``producer_priority="normal"``;
- ``adaptive (default)``: ``producer_priority="idle"``, raised to normal once the loop
  has waited for data over 30% of the last 3 seconds (``pipetrain.priority``).

Reported, medians over the rounds: epoch 0 seconds (where a late reaction shows), the
later epochs' seconds, input-bound % of epoch 0 and of the later epochs, epoch 0's
seconds of waiting for data, and for the adaptive default the seconds from the first
batch to the raise (its ``producers`` record) and how many of them the loop spent
waiting for data (what the reaction cost).
"""

from __future__ import annotations

import argparse
import json
import math
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import h5py  # noqa: E402
import keras  # noqa: E402
from bench_train import build_model  # noqa: E402

import pipetrain  # noqa: E402
import pipetrain.priority  # noqa: E402
from pipetrain.synth import make_data  # noqa: E402

VARIANTS = {  # name -> (producer_priority, raised when starving)
    "idle (fixed)": ("idle", False),
    "low (fixed)": ("low", False),
    "normal": ("normal", False),
    "adaptive (default)": ("idle", True),
}


def busy(n: int) -> list[subprocess.Popen]:
    """``n`` processes that spin on a core each, at normal priority."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def run_variant(path: Path, priority: str, adaptive: bool, epochs: int, batch: int) -> dict:
    model = build_model("mlp", (784,))
    share = pipetrain.priority.STARVED_SHARE
    if not adaptive:
        pipetrain.priority.STARVED_SHARE = math.inf
    try:
        with tempfile.TemporaryDirectory() as tmp:
            history = Path(tmp) / "history.jsonl"
            pipetrain.train(model, pipetrain.H5Source(path, x="x", y="y"), epochs=epochs, batch_size=batch,
                            shuffle="none", workers=2, max_queue=8, history=history, verbose=0,
                            monitor_interval=None, producer_priority=priority)
            h = pipetrain.read_history(history)
    finally:
        pipetrain.priority.STARVED_SHARE = share
    first = h.batches[0]
    began = first["t"] - first["step_s"] - first["wait_s"]
    raised = [r for r in h.other if r["type"] == "producers"]
    at = (raised[0]["epoch"], raised[0]["batch"]) if raised else None
    return {
        "epoch_s": [e["time_s"] for e in h.epochs],
        "wait_s": [e["wait_s"] for e in h.epochs],
        "input_bound_pct": [e["input_bound_pct"] for e in h.epochs],
        "raised_after_s": round(raised[0]["t"] - began, 2) if raised else None,
        "raised_at": {"epoch": at[0], "batch": at[1]} if raised else None,
        # What the late reaction cost: the loop's waiting for data before the raise.
        "waited_before_raise_s": round(sum(b["wait_s"] for b in h.batches if (b["epoch"], b["batch"]) <= at), 2)
        if raised else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=2, help="processes spinning beside the run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="per variant and round")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--data-dir", help="keep the generated file here (default: a temporary folder)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "contention.json"))
    args = parser.parse_args()

    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.data_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"w1-{args.rows}.h5"
        if not path.exists():
            make_data(path, args.rows, (784,), 10, "float32", "gzip:1", False, 256)
        spinners = busy(args.busy)
        try:
            for r in range(args.repeat):
                for name, (priority, adaptive) in VARIANTS.items():
                    t0 = time.perf_counter()
                    result = run_variant(path, priority, adaptive, args.epochs, args.batch)
                    runs[name].append(result)
                    print(f"  round {r + 1}/{args.repeat} {name:20s} epochs {result['epoch_s']} s, waiting "
                          f"{result['wait_s']} s, input-bound {result['input_bound_pct']} %, raised after "
                          f"{result['raised_after_s']} s, {result['waited_before_raise_s']} s of it waiting "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
        finally:
            for p in spinners:
                p.kill()
                p.wait()

    def median(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 3) if values else None

    summary = {}
    for name, results in runs.items():
        summary[name] = {
            "epoch0_s": median([r["epoch_s"][0] for r in results]),
            "later_epoch_s": median([t for r in results for t in r["epoch_s"][1:]]),
            "epoch0_input_bound_pct": median([r["input_bound_pct"][0] for r in results]),
            "later_input_bound_pct": median([b for r in results for b in r["input_bound_pct"][1:]]),
            "epoch0_wait_s": median([r["wait_s"][0] for r in results]),
            "raised_after_s": median([r["raised_after_s"] for r in results]),
            "waited_before_raise_s": median([r["waited_before_raise_s"] for r in results]),
        }
    normal = summary["normal"]
    for s in summary.values():
        s["epoch0_vs_normal"] = round(s["epoch0_s"] / normal["epoch0_s"], 3)
        s["later_vs_normal"] = round(s["later_epoch_s"] / normal["later_epoch_s"], 3) if s["later_epoch_s"] else None
    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "keras": keras.__version__,
                    "backend": keras.backend.backend(), "h5py": h5py.__version__,
                    "load_avg_at_end": os.getloadavg()},
        "busy": args.busy, "repeat": args.repeat, "epochs": args.epochs, "rows": args.rows, "batch": args.batch,
        "summary": summary, "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(f"{args.busy} busy processes beside the run, {os.cpu_count()} cores, medians of {args.repeat} rounds:")
    print()
    print("| producers | epoch 0 s | × normal | later epochs s | × normal | input-bound % (epoch 0 / later) "
          "| epoch 0 waiting s | raised after s (waiting s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in summary.items():
        raised = f"{s['raised_after_s']} ({s['waited_before_raise_s']})" if s["raised_after_s"] is not None else "-"
        print(f"| {name} | {s['epoch0_s']} | {s['epoch0_vs_normal']} | {s['later_epoch_s']} | {s['later_vs_normal']} "
              f"| {s['epoch0_input_bound_pct']} / {s['later_input_bound_pct']} | {s['epoch0_wait_s']} | {raised} |")


if __name__ == "__main__":
    main()
