"""``pipetrain make-data``: a learnable synthetic data set of any size, written in
constant memory, so that people and benchmarks can make a file larger than RAM.

Each class has a fixed random prototype; a row is its class's prototype plus noise, so a
small model learns it (to high but not perfect accuracy). Rows are generated block by
block from ``default_rng([seed, block])``: the same arguments give the same file, and
memory holds one block whatever the number of rows.

    pipetrain make-data w1.h5 --rows 100000 --features 784 --classes 10 --compression gzip:1
    pipetrain make-data images.h5 --rows 50000 --features 32x32x3 --dtype uint8 --shuffle-filter
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import h5py
import numpy as np

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
    return shape


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
) -> Path:
    """Write ``rows`` rows of ``features`` (``x``) and int64 class labels (``y``)."""
    path = Path(path)
    dtype = np.dtype(dtype)
    if rows < 1:
        raise DataSpecError(f"rows={rows}: must be >= 1")
    if classes < 2:
        raise DataSpecError(f"classes={classes}: must be >= 2 (labels of one class teach nothing)")
    options = compression_options(compression, shuffle_filter)
    width = int(np.prod(features))
    # Prototypes this close together (relative to the noise) leave a few percent of rows
    # ambiguous: a model learns most but not all.
    scale = SEPARATION / np.sqrt(width)
    prototypes = scale * np.random.default_rng([seed, 2**31]).normal(size=(classes, width)).astype(np.float32)
    chunk = min(chunk_rows, rows)
    # Written beside the target and renamed into place: a failure (or Ctrl-C) leaves no
    # half file, and an existing file is replaced only by a complete one.
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        _write(partial, rows, features, classes, dtype, options, chunk, prototypes, seed, x_name, y_name, progress)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def _write(path, rows, features, classes, dtype, options, chunk, prototypes, seed, x_name, y_name, progress) -> None:
    width = prototypes.shape[1]
    with h5py.File(path, "w") as f:
        x = f.create_dataset(x_name, shape=(rows, *features), dtype=dtype, chunks=(chunk, *features), **options)
        y = f.create_dataset(y_name, shape=(rows,), dtype=np.int64, chunks=(min(rows, 16 * chunk),),
                             **{k: v for k, v in options.items() if k != "shuffle"})
        f.attrs["generator"] = "pipetrain make-data"
        f.attrs["classes"] = classes
        for block, start in enumerate(range(0, rows, BLOCK_ROWS)):
            stop = min(rows, start + BLOCK_ROWS)
            rng = np.random.default_rng([seed, block])
            labels = rng.integers(0, classes, size=stop - start)
            values = prototypes[labels] + rng.normal(size=(stop - start, width)).astype(np.float32)
            x[start:stop] = _to_dtype(values, dtype).reshape(stop - start, *features)
            y[start:stop] = labels
            if progress is not None:
                progress(stop, rows)


def cmd_make_data(args) -> int:
    """The ``pipetrain make-data`` command."""
    from pipetrain.cli import BadInput

    path = Path(args.output)
    if path.exists() and not args.overwrite:
        raise BadInput(f"{path}: exists already; pass --overwrite to replace it")
    if not path.parent.exists():
        raise BadInput(f"{path}: the folder {path.parent} does not exist")
    features = parse_shape(args.features)
    if args.classes < 2:
        raise BadInput(f"--classes {args.classes}: must be >= 2 (labels of one class teach nothing)")
    t0 = time.perf_counter()

    live = sys.stdout.isatty() and not args.quiet

    def progress(done: int, total: int) -> None:
        if live:
            print(f"\r{done:,}/{total:,} rows", end="", flush=True)

    make_data(path, args.rows, features, args.classes, args.dtype, args.compression,
              args.shuffle_filter, args.chunk_rows, args.seed, progress=progress)
    if not args.quiet:
        size = path.stat().st_size / 2**20
        raw = args.rows * int(np.prod(features)) * np.dtype(args.dtype).itemsize / 2**20
        print(f"{chr(13) if live else ''}wrote {path}: x {(args.rows, *features)} {args.dtype}, y ({args.rows},) int64, "
              f"{args.classes} classes; {size:,.1f} MB on disk ({raw:,.1f} MB of x), "
              f"{time.perf_counter() - t0:.1f} s")
    return 0
