"""``pipetrain make-data``: a learnable synthetic data set of any size, written in
constant memory, so that people and benchmarks can make a file larger than RAM.

Each class has a fixed random prototype; a row is its class's prototype plus noise, so a
small model learns it (to high but not perfect accuracy). Two seeds: the *task seed*
draws the prototypes (the task), the *seed* draws the rows (which samples of the task).
Files of the same task seed and other seeds are held-out data of the same task; one call
with ``--splits`` writes train/val/test files of one task whose rows never repeat.
Rows are generated block by block from ``default_rng([seed, block])`` (``[seed, block,
k]`` for the k-th split after the first): the same arguments give the same file, and
memory holds one block whatever the number of rows.

    pipetrain make-data w1.h5 --rows 100000 --features 784 --classes 10 --compression gzip:1
    pipetrain make-data images.h5 --rows 50000 --features 32x32x3 --dtype uint8 --shuffle-filter
    pipetrain make-data data --splits train=50000 val=5000 test=5000 --x-name images --y-name labels
"""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import psutil

from pipetrain.errors import InputError

BLOCK_ROWS = 8192  # rows generated and written at a time
SEPARATION = 2.5  # distance scale between class prototypes, in units of the per-feature noise


class DataSpecError(InputError):
    """A make-data setting that cannot be used."""


def parse_shape(text: str) -> tuple[int, ...]:
    """``"784"`` → (784,); ``"28x28x1"`` → (28, 28, 1)."""
    try:
        shape = tuple(int(p) for p in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise DataSpecError(f"--features {text!r}: expected a row shape such as 784 or 28x28x1") from None
    if not shape or any(n < 1 for n in shape):
        raise DataSpecError(f"--features {text!r}: every dimension must be >= 1")
    if len(shape) > 31:  # HDF5 holds 32 dimensions, the rows' among them
        raise DataSpecError(f"--features {text!r}: at most 31 dimensions")
    return shape


def dataset_names(x_name: str, y_name: str, said: str) -> tuple[str, str]:
    """The two dataset names as HDF5 reads them ("/x/." is "x"), or a DataSpecError
    beginning with ``said`` (how the caller gave them) when they cannot both be written."""
    x, y = ("/".join(part for part in name.split("/") if part not in ("", ".")) for name in (x_name, y_name))
    if not x or not y or x == y:
        raise DataSpecError(f"{said}: two different, non-empty dataset names needed")
    if x.startswith(y + "/") or y.startswith(x + "/"):
        raise DataSpecError(f"{said}: neither can hold the other (a dataset is no group)")
    return x, y


def compression_options(text: str, shuffle: bool) -> dict:
    """h5py ``create_dataset`` options for ``gzip[:LEVEL]``, ``lzf``, ``blosc``, ``zstd``,
    ``lz4`` or ``none`` (the last three through hdf5plugin)."""
    name, _, level_text = text.lower().partition(":")
    options: dict = {"shuffle": shuffle} if shuffle else {}

    def level(default: int, low: int, high: int) -> int:
        try:
            value = int(level_text) if level_text else default
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise DataSpecError(f"--compression {text!r}: the {name} level must be a whole number from {low} to {high}")
        return value

    if name in ("none", "") and not level_text:
        return options
    if name == "gzip":
        return {**options, "compression": "gzip", "compression_opts": level(1, 0, 9)}
    if name == "lzf" and not level_text:
        return {**options, "compression": "lzf"}
    if name in ("blosc", "zstd", "lz4"):
        clevel = level(5, 0, 9) if name == "blosc" else level(3, 1, 22) if name == "zstd" else None
        if name == "lz4" and level_text:
            raise DataSpecError(f"--compression {text!r}: lz4 takes no level")
        try:
            import hdf5plugin
        except ImportError:
            raise DataSpecError(f"--compression {text}: needs hdf5plugin (pip install hdf5plugin)") from None
        if name == "blosc":
            return {**options, **hdf5plugin.Blosc(cname="lz4", clevel=clevel, shuffle=hdf5plugin.Blosc.SHUFFLE)}
        if name == "zstd":
            return {**options, **hdf5plugin.Zstd(clevel=clevel)}
        return {**options, **hdf5plugin.LZ4()}
    raise DataSpecError(f"--compression {text!r}: expected gzip[:LEVEL], lzf, blosc[:LEVEL], zstd[:LEVEL], lz4 or none")


def _to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        # Integers (pixels, say): the standardised values spread over the dtype's range.
        middle, half = (int(info.max) + int(info.min)) / 2, (int(info.max) - int(info.min)) / 8
        step = max(1, (int(info.max) - int(info.min) + 1) // 64)  # 64 levels, like real sensors' noise floor
        return np.clip(np.rint((middle + half * values) / step) * step, info.min, info.max).astype(dtype)
    # Floats on a grid of 1/16: learnable all the same, and compressible like real
    # measurements (pure noise would not compress at all).
    return (np.rint(values * 16) / 16).astype(dtype)


def make_data(
    path: str | Path,
    rows: int,
    features: tuple[int, ...] = (784,),
    classes: int = 10,
    dtype: str = "float32",
    compression: str = "gzip:1",
    shuffle_filter: bool = False,
    chunk_rows: int = 256,
    seed: int = 0,
    x_name: str = "x",
    y_name: str = "y",
    progress=None,
    *,
    task_seed: int = 0,
    split: int = 0,
) -> Path:
    """Write ``rows`` rows of ``features`` (``x_name``) and int64 class labels
    (``y_name``) of the task ``task_seed``, drawn from ``seed`` (and ``split``: another
    stream of rows of the same seed, as ``--splits`` uses for its second file on)."""
    path = Path(path)
    dtype = np.dtype(dtype)
    x_name, y_name = dataset_names(x_name, y_name, f"x_name={x_name!r}, y_name={y_name!r}")
    if rows < 1:
        raise DataSpecError(f"rows={rows}: must be >= 1")
    if classes < 2:
        raise DataSpecError(f"classes={classes}: must be >= 2 (labels of one class teach nothing)")
    options = compression_options(compression, shuffle_filter)
    width = int(np.prod(features))
    # Prototypes this close together (relative to the noise) leave a few percent of rows
    # ambiguous: a model learns most but not all.
    scale = SEPARATION / np.sqrt(width)
    prototypes = scale * np.random.default_rng([task_seed, 2**31]).normal(size=(classes, width)).astype(np.float32)
    chunk = min(chunk_rows, rows)
    # Written beside the target and renamed into place: a failure (or Ctrl-C) leaves no
    # half file, and an existing file is replaced only by a complete one.
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        stream = (seed,) if split == 0 else (seed, split)  # rows of block b from default_rng([seed, b, *split])
        attrs = {"classes": classes, "task_seed": task_seed, "seed": seed, "split": split}
        _write(partial, rows, features, dtype, options, chunk, prototypes, stream, x_name, y_name, attrs, progress)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def _write(path, rows, features, dtype, options, chunk, prototypes, stream, x_name, y_name, attrs, progress) -> None:
    classes = attrs["classes"]
    width = prototypes.shape[1]
    with h5py.File(path, "w") as f:
        x = f.create_dataset(x_name, shape=(rows, *features), dtype=dtype, chunks=(chunk, *features), **options)
        y = f.create_dataset(y_name, shape=(rows,), dtype=np.int64, chunks=(min(rows, 16 * chunk),),
                             **{k: v for k, v in options.items() if k != "shuffle"})
        f.attrs["generator"] = "pipetrain make-data"
        f.attrs.update(attrs)
        for block, start in enumerate(range(0, rows, BLOCK_ROWS)):
            stop = min(rows, start + BLOCK_ROWS)
            rng = np.random.default_rng([stream[0], block, *stream[1:]])
            labels = rng.integers(0, classes, size=stop - start)
            values = prototypes[labels] + rng.normal(size=(stop - start, width)).astype(np.float32)
            x[start:stop] = _to_dtype(values, dtype).reshape(stop - start, *features)
            y[start:stop] = labels
            if progress is not None:
                progress(stop, rows)


def parse_splits(values: list[str]) -> list[tuple[str, int]]:
    """``["train=50000", "val=5000"]`` → [("train", 50000), ("val", 5000)]."""
    splits: list[tuple[str, int]] = []
    for text in values:
        name, _, rows = text.partition("=")
        if not name or not all(c.isalnum() or c in "-_." for c in name) or not rows.isdigit() or int(rows) < 1:
            raise DataSpecError(f"--splits {text!r}: expected NAME=ROWS, say train=50000 val=5000")
        if name in (n for n, _ in splits):
            raise DataSpecError(f"--splits: {name!r} is named twice")
        splits.append((name, int(rows)))
    return splits


class _Line:
    """The progress line on a terminal: rows written of all files, rows/s and ETA."""

    def __init__(self, total: int, live: bool):
        self.total, self.live, self.before = total, live, 0
        self.t0 = time.perf_counter()

    def file(self, name: str, rows_before: int):
        def progress(done: int, _rows: int) -> None:
            if not self.live:
                return
            from pipetrain.progress import fmt_duration

            done += rows_before
            rate = done / max(time.perf_counter() - self.t0, 1e-9)
            eta = (self.total - done) / rate if rate > 0 else None
            print(f"\r\x1b[K{name}  {done:,}/{self.total:,} rows  {rate:,.0f} rows/s  ETA {fmt_duration(eta)}",
                  end="", flush=True)

        return progress

    def clear(self) -> str:
        return "\r\x1b[K" if self.live else ""


def cmd_make_data(args) -> int:
    """The ``pipetrain make-data`` command: one file (``--rows``) or one file per split
    (``--splits``, into the folder OUT) of one task."""
    from pipetrain.cli import BadInput
    from pipetrain.history import file_kind
    from pipetrain.runfolder import describe

    out = Path(args.output)
    if (args.rows is None) == (args.splits is None):
        raise BadInput("make-data: give either --rows N (one file) or --splits NAME=ROWS... (a folder of files)")
    if args.splits is not None:
        if out.exists() and not out.is_dir():
            raise BadInput(f"{out}: is a file; with --splits, OUT is the folder that receives NAME.h5 for each split")
        if not out.parent.exists():
            raise BadInput(f"{out}: the folder {out.parent} does not exist")
        jobs = [(out / f"{name}.h5", rows) for name, rows in parse_splits(args.splits)]
    else:
        if out.is_dir():
            raise BadInput(f"{out}: is a folder; give the file to write (or --splits to write one file per split there)")
        if not out.parent.exists():
            raise BadInput(f"{out}: the folder {out.parent} does not exist")
        jobs = [(out, args.rows)]
    for path, _ in jobs:
        if path.exists() and not args.overwrite:
            raise BadInput(f"{path}: exists already; pass --overwrite to replace it")
        if path.exists():  # (a script or a history named by mistake; a device, which the rename would replace)
            mode = path.stat().st_mode
            what = describe(path) if stat.S_ISREG(mode) else file_kind(mode)  # (None: an empty file)
            if what is not None and not (stat.S_ISREG(mode) and h5py.is_hdf5(path)):
                raise BadInput(f"{path}: is {what}, not an HDF5 file; --overwrite replaces only an HDF5 file")
    dataset_names(args.x_name, args.y_name, f"--x-name {args.x_name!r} --y-name {args.y_name!r}")  # before any file
    features = parse_shape(args.features)
    if args.classes < 2:
        raise BadInput(f"--classes {args.classes}: must be >= 2 (labels of one class teach nothing)")
    _check_memory(args.classes, int(np.prod(features)), min(args.chunk_rows, max(rows for _, rows in jobs)))
    compression_options(args.compression, args.shuffle_filter)  # bad settings before any file is made
    if args.splits is not None:
        out.mkdir(exist_ok=True)
    line = _Line(sum(rows for _, rows in jobs), sys.stdout.isatty() and not args.quiet)
    _make_each(args, jobs, features, line)  # (SIGTERM is a Ctrl-C here, cli.main's: the partial file goes)
    return 0


def _check_memory(classes: int, width: int, chunk_rows: int) -> None:
    """The class prototypes and a chunk of rows (with the noise drawn for it) must fit in
    the memory available: a spec beyond it is bad input, not a failed allocation."""
    from pipetrain.cli import BadInput

    need = 4 * classes * width + 16 * chunk_rows * width
    available = psutil.virtual_memory().available
    if need > available:
        raise BadInput(f"--classes {classes} with --features of {width:,} values a row (chunks of {chunk_rows} rows) "
                       f"needs {need / 2**30:,.1f} GiB of memory to write; {available / 2**30:,.1f} GiB is available")


def _make_each(args, jobs, features, line) -> None:
    written = 0
    for split, (path, rows) in enumerate(jobs):
        t0 = time.perf_counter()
        make_data(path, rows, features, args.classes, args.dtype, args.compression, args.shuffle_filter,
                  args.chunk_rows, args.seed, args.x_name, args.y_name, line.file(path.name, written),
                  task_seed=args.task_seed, split=split)
        written += rows
        if not args.quiet:
            size = path.stat().st_size / 2**20
            raw = rows * int(np.prod(features)) * np.dtype(args.dtype).itemsize / 2**20
            print(f"{line.clear()}wrote {path}: {args.x_name} {(rows, *features)} {args.dtype}, "
                  f"{args.y_name} ({rows},) int64, {args.classes} classes (task {args.task_seed}, seed {args.seed}); "
                  f"{size:,.1f} MB on disk ({raw:,.1f} MB of {args.x_name}), {time.perf_counter() - t0:.1f} s",
                  flush=True)
