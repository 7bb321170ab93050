"""Where a step's time goes: Python calls per step and the top functions, by cProfile.

    KERAS_BACKEND=jax python benchmarks/profile_step.py [--variant run+hist] [--epochs 6] [--top 25]

Runs one variant of ``bench_overhead.py`` (same model and data) for one epoch untimed
(tracing), then 1 and ``--epochs`` epochs under cProfile; prints the Python function calls
per step (the difference over the extra steps) (a count: it does not depend on how busy the machine is) and the functions with
the most own time. Compare ``--variant bare`` with the others.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_overhead as bench  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="run+hist", choices=bench.VARIANTS)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    import h5py
    import keras

    import pipetrain

    train_path, _ = pipetrain.sample_data()
    source = pipetrain.H5Source(train_path, x="images", y="labels")
    with h5py.File(train_path, "r") as f:
        x, y = f["images"][...], f["labels"][...]
    steps = -(-len(x) // bench.BATCH) * (args.epochs - 1)
    with tempfile.TemporaryDirectory() as tmp:
        bench._one(args.variant, 1, x, y, source, Path(tmp))  # traces, imports
        totals = []
        for epochs in (1, args.epochs):  # the difference has no set-up in it
            profile = cProfile.Profile()
            profile.enable()
            bench._one(args.variant, epochs, x, y, source, Path(tmp))
            profile.disable()
            stats = pstats.Stats(profile)
            totals.append(stats.total_calls)
    print(f"{keras.backend.backend()} {args.variant}: {(totals[1] - totals[0]) / steps:.0f} Python calls per step "
          f"({args.epochs} epochs against 1)")
    stats.sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
