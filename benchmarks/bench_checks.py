"""What the damaged-file checks cost: opening a raw-chunk reader (the index checks and the
edge-chunk self-check) and its first pass over the data (HDF5's own lookup of each chunk,
once), against a pass with every chunk already looked up.

    python benchmarks/bench_checks.py [--rows N] [--repeat R] [--out results/checks.json]

Files: W1-like x (N x 784 float32, chunks of 256 rows, gzip-1) and labels with many small
chunks (N*10 int64 rows, chunks of 100 rows: the index-heavy case). Each repeat opens a
fresh reader, reads every row in 256-row batches (the lookups happen here), then reads
them all again with the same reader (no lookups left): variants side by side in one
process, medians and the first/second pass ratio. Files sit in the page cache.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipetrain import chunks  # noqa: E402


def make(folder: Path, rows: int) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    w1 = folder / "w1.h5"
    with h5py.File(w1, "w") as f:
        d = f.create_dataset("x", shape=(rows, 784), dtype="f4", chunks=(256, 784), compression="gzip", compression_opts=1)
        for start in range(0, rows, 8192):
            stop = min(rows, start + 8192)
            d[start:stop] = np.rint(rng.normal(size=(stop - start, 784)) * 16) / 16
    labels = folder / "labels.h5"
    with h5py.File(labels, "w") as f:
        f.create_dataset("x", data=rng.integers(0, 10, rows * 10), chunks=(100,), compression="gzip", compression_opts=1)
    return {"w1 (256-row chunks)": w1, "labels (100-row chunks)": labels}


def one_pass(reader, rows: int, batch: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, rows, batch):
        reader.read(start, min(rows, start + batch))
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = make(Path(tmp), args.rows)
        for label, path in files.items():
            opens, firsts, seconds = [], [], []
            with h5py.File(path, "r") as f:
                rows = f["x"].shape[0]
                batch = 256 if f["x"].ndim > 1 else 256 * 10
                one_pass(chunks.open_chunk_reader(f["x"]), rows, batch)  # page cache warm
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    reader = chunks.open_chunk_reader(f["x"])
                    opens.append(time.perf_counter() - t0)
                    firsts.append(one_pass(reader, rows, batch))
                    seconds.append(one_pass(reader, rows, batch))
                    reader.close()
                chunk_count = f["x"].id.get_num_chunks()
            first, second = statistics.median(firsts), statistics.median(seconds)
            results[label] = {
                "chunks": chunk_count, "open_s": round(statistics.median(opens), 4),
                "first_pass_s": round(first, 4), "later_pass_s": round(second, 4),
                "first_over_later": round(first / second, 3),
                "lookup_us_per_chunk": round((first - second) / chunk_count * 1e6, 1),
            }
            print(label, results[label])
    if args.out:
        args.out.write_text(json.dumps({"rows": args.rows, "repeat": args.repeat, "host": platform.node(),
                                        "note": "shared 2-core machine, other jobs running", "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
