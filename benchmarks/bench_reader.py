"""read_history of this tree against another tree's (main, say), side by side in one
process: the CPU time of each, repeated in turns, and of counting the file's lines.

    mkdir -p /tmp/pipetrain-base && git archive main pipetrain | tar -x -C /tmp/pipetrain-base  # once
    python benchmarks/bench_reader.py FILE [FILE ...] --baseline /tmp/pipetrain-base
                                      [--repeat 5] [--out benchmarks/results/reader.json]

The baseline's ``pipetrain`` package is copied to a temporary folder as
``pipetrain_base`` (its imports rewritten), so both are imported in this process and take
turns on the same warm file: a shared machine disturbs both alike, where fresh processes
(bench_history.py) differ by whatever else runs at that moment. Times are CPU seconds
(this process's and its helper processes', from ``os.times``) and wall seconds from after
the imports; ``x_lines`` is the ratio to counting the lines with
``for _ in open(path, 'rb')``. ``this tree, one process`` is this tree's reader with
its helper processes turned off (every part parsed here).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def baseline_package(tree: Path, folder: Path) -> str:
    """Copy ``tree``/pipetrain to ``folder``/pipetrain_base with its imports rewritten."""
    target = folder / "pipetrain_base"
    shutil.copytree(tree / "pipetrain", target)
    for path in target.rglob("*.py"):
        text = path.read_text()
        text = re.sub(r"\bfrom pipetrain(\.| )", r"from pipetrain_base\1", text)
        text = re.sub(r"\bimport pipetrain\b", "import pipetrain_base", text)
        path.write_text(text)
    return "pipetrain_base"


def count_lines(path: str) -> int:
    n = 0
    with open(path, "rb") as f:
        for _ in f:
            n += 1
    return n


def cpu_seconds() -> float:
    """CPU time of this process and of the child processes it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def one_process(reading, path: str):
    saved = reading.PART_BYTES, reading.FORKED_PART_BYTES
    reading.PART_BYTES = reading.FORKED_PART_BYTES = 1 << 62
    try:
        return reading.read_history(path)
    finally:
        reading.PART_BYTES, reading.FORKED_PART_BYTES = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--baseline", required=True, help="a source tree holding the pipetrain package to compare")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "reader.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import pandas  # noqa: F401 - as a user has it, imported before the clocks

    from pipetrain import reading

    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, tmp)
        base = importlib.import_module(baseline_package(Path(args.baseline), Path(tmp)) + ".reading")
        variants = {"lines": count_lines, "baseline": base.read_history, "this tree": reading.read_history,
                    "this tree, one process": partial(one_process, reading)}
        results = {"load_1min_at_start": round(os.getloadavg()[0], 2), "files": {}}
        for path in args.files:
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
            for _ in range(args.repeat):
                for name, read in variants.items():
                    gc.collect()
                    start, cpu = time.perf_counter(), cpu_seconds()
                    read(path)
                    times[name].append((time.perf_counter() - start, cpu_seconds() - cpu))
            row = {}
            for i, clock in enumerate(("s", "cpu_s")):
                medians = {name: round(statistics.median(t[i] for t in v), 3) for name, v in times.items()}
                row[clock] = medians
                row[f"x_lines_{clock}"] = {name: round(medians[name] / medians["lines"], 2) for name in variants}
                row[f"this_tree_over_baseline_{clock}"] = round(medians["this tree"] / medians["baseline"], 3)
            results["files"][path] = row
            print(path, json.dumps(row), flush=True)
        results["load_1min_at_end"] = round(os.getloadavg()[0], 2)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
