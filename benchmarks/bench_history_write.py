"""What the history's index costs its writer: HistoryWriter.write per record, side by side.

    python benchmarks/bench_history_write.py [--records 100000] [--repeat 5]
                                             [--out benchmarks/results/history-write.json]

A run's records (a batch record per step, a system sample every 200 steps, an epoch
record every 10,000) are written to a fresh file in a temporary folder by each variant in
turn, ``--repeat`` rounds; the table shows the median time per record and the ratio to
``before``:

- ``before``: HistoryWriter as it was before the index (each line written, nothing else);
- ``index``: HistoryWriter now (a batch line: one prefix test; another line: the index
  brought up to date);
- ``index off``: HistoryWriter now with its index switched off (as when it cannot be
  written): the prefix test alone.

Run in one process, so the variants see the same machine; it may be shared: compare ratios.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipetrain.history import HistoryWriteError, HistoryWriter  # noqa: E402


class Before(HistoryWriter):
    """_write_bytes as it was before the index."""

    def _write_bytes(self, line: bytes) -> None:
        with self._lock:
            if self._fd < 0:
                raise HistoryWriteError(f"{self.path}: the history is closed")
            written = os.write(self._fd, line)
            if written != len(line):
                raise HistoryWriteError(f"{self.path}: short write")


def records(n: int) -> list[dict]:
    out = [{"type": "run", "run": "r", "t": 0.0, "resume": None}]
    for step in range(n):
        epoch, batch = divmod(step, 10_000)
        out.append({"type": "batch", "run": "r", "t": 1_764_085_960.0 + step / 100, "epoch": epoch, "batch": batch,
                    "step": step, "size": 32, "accuracy": 0.5, "loss": 0.25 + step * 1e-9, "step_s": 0.008,
                    "wait_s": 0.0001, "samples_per_s": 3200.0})
        if step % 200 == 199:
            out.append({"type": "system", "run": "r", "t": 1.0, "rss_mb": 700.0, "cpu_pct": 99.0, "threads": 11})
        if batch == 9_999:
            out.append({"type": "epoch", "run": "r", "t": 1.0, "epoch": epoch, "loss": 0.25})
    return out


def timed(kind: str, path: Path, rows: list[dict]) -> float:
    path.unlink(missing_ok=True)
    Path(str(path) + ".index").unlink(missing_ok=True)
    writer = Before(path) if kind == "before" else HistoryWriter(path)
    if kind == "index off":
        writer._index.on = False
    start = time.perf_counter()
    for record in rows:
        writer.write(record)
    seconds = time.perf_counter() - start
    writer.close()
    return seconds / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "history-write.json"))
    args = parser.parse_args()
    rows = records(args.records)
    kinds = ["before", "index", "index off"]
    found: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for kind in kinds:
                found[kind].append(timed(kind, Path(tmp) / "history.jsonl", rows))
    base = statistics.median(found["before"])
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_1min": round(os.getloadavg()[0], 2)},
              "records": len(rows), "repeat": args.repeat, "variants": {}}
    print(f"{'variant':<10} {'us/record':>10} {'best':>8} {'x before':>9}")
    for kind in kinds:
        median = statistics.median(found[kind])
        result["variants"][kind] = {"us_per_record": round(median * 1e6, 3), "best_us": round(min(found[kind]) * 1e6, 3),
                                    "x_before": round(median / base, 3)}
        print(f"{kind:<10} {median * 1e6:>10.3f} {min(found[kind]) * 1e6:>8.3f} {median / base:>9.3f}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
