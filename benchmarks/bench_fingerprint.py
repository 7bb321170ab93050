"""What the data fingerprints cost a run's start, against opening the same files.

    python benchmarks/bench_fingerprint.py [--repeat 5] [--out benchmarks/results/fingerprint.json]

Every run with a history fingerprints its data files once at its start (and a resume
compares): per file one ``fstat``, :data:`pipetrain.fingerprint.SAMPLES` positioned reads
of :data:`pipetrain.fingerprint.SAMPLE_BYTES`, and a hash of the chunk index the
raw-chunk reader already holds. Two shapes of a large data set, each measured in one
process, variants alternating, ``--repeat`` times; medians:

- ``many-files``: 200 files of 20,000 x 64 float32 (gzip, chunks of 256 rows): the
  sampled reads dominate, one set per file;
- ``many-chunks``: one file of 4,000,000 x 4 float32 in chunks of 32 rows (125,000
  chunks): the index hash dominates; its cost grows with the number of chunks, not bytes.

Reported: seconds to open the files (``H5Source``, which reads every chunk index), seconds
to fingerprint them, the ratio, and bytes read for the fingerprints. The files are in the
page cache (just written); a cold disk adds one seek per sampled read.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipetrain  # noqa: E402
from pipetrain import fingerprint  # noqa: E402


def write(path: Path, rows: int, features: int, chunk_rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=rng.normal(size=(rows, features)).astype("float32"),
                         chunks=(chunk_rows, features), compression="gzip", compression_opts=1)
        f.create_dataset("y", data=rng.integers(0, 10, rows), chunks=(chunk_rows * 64,), compression="gzip")


def measure(paths: list[Path], repeat: int) -> dict:
    opens, prints = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        source = pipetrain.H5Source(paths, x="x", y="y")
        t1 = time.perf_counter()
        fingerprints = [source.fingerprint(i) for i in range(len(paths))]
        t2 = time.perf_counter()
        source.close()
        opens.append(t1 - t0)
        prints.append(t2 - t1)
    assert all(fp["sample"] for fp in fingerprints)
    open_s, print_s = statistics.median(opens), statistics.median(prints)
    return {
        "files": len(paths),
        "bytes": sum(p.stat().st_size for p in paths),
        "open_s": round(open_s, 4),
        "fingerprint_s": round(print_s, 4),
        "fingerprint_per_file_ms": round(1000 * print_s / len(paths), 3),
        "fingerprint_over_open": round(print_s / open_s, 3),
        "bytes_read_for_fingerprints": len(paths) * fingerprint.SAMPLES * fingerprint.SAMPLE_BYTES,
        "open_runs": [round(t, 4) for t in opens],
        "fingerprint_runs": [round(t, 4) for t in prints],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {"python": platform.python_version(), "h5py": h5py.__version__, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        many = []
        for i in range(200):
            many.append(folder / f"part-{i:03d}.h5")
            write(many[-1], 20_000, 64, 256, i)
        big = folder / "chunks.h5"
        write(big, 4_000_000, 4, 32, 0)
        for name, paths in (("many-files", many), ("many-chunks", [big])):
            results["cases"][name] = measure(paths, args.repeat)
            print(name, json.dumps({k: v for k, v in results["cases"][name].items() if not k.endswith("_runs")}))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
