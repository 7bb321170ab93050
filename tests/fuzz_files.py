"""Damaged HDF5 files read as h5py reads them, or refused in one line: a seeded fuzz.

    python tests/fuzz_files.py [--cases 20000] [--seed 0] [--timeout 30] [--keep DIR]

Small files in several layouts and filters (gzip, shuffle+gzip, lzf, fletcher32,
scaleoffset+gzip, contiguous, small chunks, chunks split across a row, the newest file
format) are copied with one byte flipped, or truncated (with or without the end-of-file
address in the superblock patched to the cut), and each copy is opened with
:class:`pipetrain.H5Source` and read row by row through the path training uses
(``source.read`` into recycled buffers, and without them), then compared with h5py's own
read. The invariant, for every copy:

- no hang: each case must end within ``--timeout`` seconds (a watchdog dumps the case's
  stack and exits otherwise);
- no traceback: the only exception allowed is an ``InputError`` (bad input) whose message
  is one line naming the file (and the dataset, where one is involved);
- no silent difference: rows pipetrain returns are byte-identical to h5py's read of them,
  and pipetrain returns no rows where h5py's read fails. Where h5py returns rows and
  pipetrain refuses them (a damaged chunk that HDF5 passes as fill values or decodes
  leniently), the case counts as ``refused``: pipetrain says what is damaged instead.

The test suite runs a few hundred cases (tests/test_fuzz.py); run this script for more.
It exits 1 and prints each failing case (layout, mutation, message) if any breaks the
invariant.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipetrain.errors import InputError  # noqa: E402
from pipetrain.source import H5Source  # noqa: E402

ROWS = 61  # not a multiple of any chunk row count below
ROW_SHAPE = (3, 4)
READ_LIMIT = 64 << 20  # bytes of one dataset a case reads at most (a flipped dimension can claim terabytes)


def _layouts() -> dict[str, dict]:
    """create_dataset options of x per layout (y: int64 labels, chunked like x or contiguous)."""
    return {
        "gzip": {"chunks": (8, 3, 4), "compression": "gzip"},
        "shuffle+gzip": {"chunks": (8, 3, 4), "compression": "gzip", "shuffle": True},
        "lzf": {"chunks": (8, 3, 4), "compression": "lzf"},
        "fletcher32": {"chunks": (8, 3, 4), "fletcher32": True},
        "scaleoffset+gzip": {"chunks": (8, 3, 4), "scaleoffset": 0, "compression": "gzip", "dtype": "int16"},
        "contiguous": {},
        "small chunks": {"chunks": (1, 3, 4)},  # 61 chunks: an index with more than one node
        "split rows": {"chunks": (8, 2, 3), "compression": "gzip"},  # chunks cut across a row
        "unfiltered": {"chunks": (8, 3, 4)},
        "latest format": {"chunks": (8, 3, 4), "compression": "gzip", "libver": "latest"},
    }


LAYOUTS = list(_layouts())


def make_file(path: Path, layout: str) -> Path:
    options = dict(_layouts()[layout])
    libver = options.pop("libver", "earliest")
    dtype = options.pop("dtype", "float32")
    rng = np.random.default_rng(len(layout))
    x = (rng.integers(0, 50, (ROWS, *ROW_SHAPE)) * 0.5).astype(dtype)
    y = rng.integers(0, 4, ROWS).astype("int64")
    with h5py.File(path, "w", libver=libver) as f:
        f.create_dataset("x", data=x, **options)
        y_options = {"chunks": (16,), "compression": "gzip"} if options.get("chunks") else {}
        f.create_dataset("y", data=y, **y_options)
    return path


@dataclass
class Mutation:
    kind: str  # "flip", "truncate", "truncate+eof"
    at: int
    value: int = 0

    def apply(self, data: bytes) -> bytes:
        if self.kind == "flip":
            out = bytearray(data)
            out[self.at] ^= self.value
            return bytes(out)
        out = bytearray(data[: self.at])
        if self.kind == "truncate+eof" and data[8] == 0 and len(out) >= 48:
            # superblock version 0: the end-of-file address is bytes 40-47
            out[40:48] = len(out).to_bytes(8, "little")
        return bytes(out)

    def __str__(self) -> str:
        return f"{self.kind} at byte {self.at}" + (f" ^ 0x{self.value:02x}" if self.kind == "flip" else "")


def mutation(rng: np.random.Generator, size: int) -> Mutation:
    kind = rng.choice(["flip"] * 6 + ["truncate", "truncate+eof"])
    if kind == "flip":
        return Mutation("flip", int(rng.integers(0, size)), int(rng.integers(1, 256)))
    return Mutation(str(kind), int(rng.integers(1, size)))


@dataclass
class Outcome:
    result: str  # "same", "refused at open", "refused rows", "failure"
    detail: str = ""


def _one_line_naming(exc: BaseException, path: Path) -> str | None:
    """Why an exception is not an acceptable refusal, or None when it is."""
    if not isinstance(exc, InputError):
        return f"{type(exc).__name__} (not bad input): {exc}"
    text = str(exc)
    if "\n" in text:
        return f"message of {len(text.splitlines())} lines: {text!r}"
    if str(path) not in text:
        return f"message does not name the file: {text!r}"
    return None


def check_file(path: Path) -> Outcome:
    """Open and read every row of ``path`` as training does, and compare with h5py."""
    try:
        source = H5Source(path, x="x", y="y")
    except Exception as exc:
        why = _one_line_naming(exc, path)
        return Outcome("failure", why) if why else Outcome("refused at open", str(exc))
    refused = []
    with source:
        try:
            theirs_file = h5py.File(path, "r")
        except Exception as exc:  # pipetrain opened what h5py cannot: it must have read nothing yet
            return Outcome("failure", f"pipetrain opened it, h5py cannot: {exc}")
        with theirs_file:
            (rows_per_block,) = source.block_rows()
            rows = source.rows
            for name, field in source.fields.items():
                budget = READ_LIMIT // max(1, field.row_bytes)
                step = max(1, min(rows_per_block, budget))
                buffer = np.empty((step, *field.row_shape), field.dtype)
                spans = [(a, min(rows, a + step)) for a in range(0, min(rows, budget), step)]
                if rows > budget:
                    spans.append((rows - 1, rows))
                for i, (start, stop) in enumerate(spans):
                    try:
                        dset = theirs_file[name]
                        theirs = dset[start:stop]
                        theirs_error = None
                    except Exception as exc:  # h5py cannot read these rows
                        theirs, theirs_error = None, exc
                    out = buffer[: stop - start]
                    out.view(np.uint8)[...] = 0xAB  # what an older batch left in a recycled buffer
                    try:
                        if i % 2:
                            arrays, _ = source.read(0, start, stop, names=[name])
                        else:
                            arrays, _ = source.read(0, start, stop, out={name: out}, names=[name])
                    except Exception as exc:
                        why = _one_line_naming(exc, path)
                        if why:
                            return Outcome("failure", f"'{name}' rows {start}-{stop}: {why}")
                        refused.append(str(exc))
                        continue
                    ours = arrays[name]
                    if theirs_error is not None:
                        return Outcome(
                            "failure",
                            f"'{name}' rows {start}-{stop}: pipetrain returned rows h5py cannot read ({theirs_error})",
                        )
                    if ours.dtype != theirs.dtype or ours.tobytes() != theirs.tobytes():
                        diff = np.flatnonzero(
                            (ours.reshape(len(ours), -1).view(np.uint8) != theirs.reshape(len(theirs), -1).view(np.uint8)).any(axis=1)
                        )
                        return Outcome(
                            "failure",
                            f"'{name}' rows {start}-{stop}: bytes differ from h5py's in rows {(diff + start).tolist()[:8]}",
                        )
    return Outcome("refused rows", refused[0]) if refused else Outcome("same")


def run(cases: int, seed: int, folder: Path, timeout: float = 30.0, log=print, progress: int = 0, start: int = 0) -> dict:
    """Run ``cases`` seeded cases; a summary with counts, failures and the slowest case."""
    originals = {layout: make_file(folder / f"orig-{i}.h5", layout).read_bytes() for i, layout in enumerate(LAYOUTS)}
    counts = collections.Counter()
    failures, slowest = [], (0.0, "")
    rng = np.random.default_rng(seed)
    target = folder / "case.h5"
    for case in range(cases):
        layout = LAYOUTS[case % len(LAYOUTS)]
        data = originals[layout]
        change = mutation(rng, len(data))
        if case < start:  # drawn, not run: case numbers stay those of a whole run
            continue
        target.write_bytes(change.apply(data))
        label = f"case {case} ({layout}, {change})"
        # A hang in HDF5's C code holds the GIL: only faulthandler's own thread can end it.
        # It dumps the stacks and exits; the case in progress is in current-case.txt.
        (folder / "current-case.txt").write_text(label + "\n")
        faulthandler.dump_traceback_later(timeout, exit=True)
        t0 = time.perf_counter()
        try:
            outcome = check_file(target)
        finally:
            faulthandler.cancel_dump_traceback_later()
        took = time.perf_counter() - t0
        slowest = max(slowest, (took, label))
        counts[outcome.result] += 1
        if progress and (case + 1) % progress == 0:
            log(f"{case + 1} cases: {dict(counts)}")
        if outcome.result == "failure":
            failures.append(f"{label}: {outcome.detail}")
            log(f"FAIL {label}: {outcome.detail}")
    return {"cases": cases, "seed": seed, "counts": dict(counts), "failures": failures,
            "slowest_s": round(slowest[0], 3), "slowest": slowest[1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a case may take before it counts as a hang")
    parser.add_argument("--start", type=int, default=0, help="run cases from this one on (the same cases as in a whole run)")
    parser.add_argument("--keep", type=Path, help="folder to work in (kept), instead of a temporary one")
    args = parser.parse_args(argv)
    faulthandler.enable()  # a crash in C code prints where it happened
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        summary = run(args.cases, args.seed, folder, args.timeout, progress=500, start=args.start)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    print({k: v for k, v in summary.items() if k != "failures"})
    print(f"{len(summary['failures'])} failure(s)")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
