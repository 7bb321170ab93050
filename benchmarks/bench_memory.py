"""Peak RSS must not grow with the size of the data set: the same settings on a file four
times larger give at most 5% more peak RSS.

    python benchmarks/bench_memory.py [--rows 200000] [--out benchmarks/results/memory.json]

Writes W1-like files (784 float32 features, gzip level 1, chunks of 256 rows) of N and
4N rows, then trains one epoch of the W1 MLP on each, in a fresh process per run (peak
RSS is per process), with both batch orders. Reports each peak RSS (the kernel's
``ru_maxrss``) and the 4N/N ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(path: str, shuffle: str) -> None:
    """One epoch in this process; print its peak RSS as JSON."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT))
    import keras

    import pipetrain
    from pipetrain.monitor import peak_rss_mb

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    source = pipetrain.H5Source(path, x="x", y="y")
    with tempfile.TemporaryDirectory() as tmp:
        pipetrain.train(model, source, epochs=1, batch_size=256, shuffle=shuffle, workers=2,
                        history=Path(tmp) / "history.jsonl", verbose=0)
    print(json.dumps({"rows": source.rows, "shuffle": shuffle, "peak_rss_mb": round(peak_rss_mb(), 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the small file (the large has 4x)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--data-dir", help="keep the files here (default: a temporary folder)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    parser.add_argument("--child", nargs=2, metavar=("FILE", "SHUFFLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    sys.path.insert(0, str(ROOT))
    from pipetrain.synth import make_data

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.data_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for rows in (args.rows, 4 * args.rows):
            files[rows] = folder / f"w1-{rows}.h5"
            if not files[rows].exists():
                print(f"writing {files[rows]}", flush=True)
                make_data(files[rows], rows, (784,), 10, "float32", "gzip:1", False, 256)
        for _ in range(args.repeat):
            for shuffle in ("none", "block"):
                for path in files.values():
                    done = subprocess.run([sys.executable, __file__, "--child", str(path), shuffle],
                                          capture_output=True, text=True, check=True)
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    result["file_mb"] = round(path.stat().st_size / 2**20, 1)
                    results.append(result)
                    print(result, flush=True)
    summary = {}
    for shuffle in ("none", "block"):
        small = min(r["peak_rss_mb"] for r in results if r["shuffle"] == shuffle and r["rows"] == args.rows)
        large = min(r["peak_rss_mb"] for r in results if r["shuffle"] == shuffle and r["rows"] == 4 * args.rows)
        summary[shuffle] = {"small_mb": small, "large_mb": large, "ratio": round(large / small, 4),
                            "target_ratio_le_1_05": large / small <= 1.05}
    out = {"rows": [args.rows, 4 * args.rows], "runs": results, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
