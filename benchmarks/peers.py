"""The loaders a PyTorch, JAX or TensorFlow user would reach for, over the same HDF5
files, for benchmarks/bench_train.py and bench_paired.py.

- :class:`H5Rows` is a map-style ``torch.utils.data.Dataset`` (``__len__`` and
  ``__getitem__``, one row per index). Each process opens the file itself (h5py handles
  do not survive a fork, and Grain spawns its workers and pickles the source), and keeps
  it open. ``__getitems__`` is torch's batched fetch (a ``DataLoader`` with a
  ``batch_size`` hands a worker a batch's indices at once): a run of consecutive rows is
  one h5py read instead of one per row.
- :class:`H5Batches` is a Grain random-access source whose records are whole batches
  (one h5py read each).
- :func:`torch_loader` and :func:`grain_batches` build the loaders as their documentation
  shows them, with worker processes; :func:`tf_dataset` is ``tf.data`` over h5py slices.

Both read a batch in one h5py call, the strongest form of each peer: reading row by row
(a plain ``__getitem__``, Grain's ``MapDataset.source(rows).batch(n)``) costs h5py about
twice as much per row as one slice per batch (measured: 394 µs per row against 188 µs per
row in 256-row slices, W1, on a busy machine), and the loaders then stack the rows.

This module imports neither Keras nor a backend: Grain's spawned workers import it.
"""

from __future__ import annotations

import os

import h5py
import numpy as np


class H5Rows:
    """Rows ``x[i], y[i]`` of one HDF5 file; the file opened once per process."""

    def __init__(self, path, x: str = "x", y: str = "y"):
        self.path, self.x, self.y = str(path), x, y
        with h5py.File(self.path, "r") as f:
            self.rows = len(f[x])
        self._file = None
        self._pid = None

    def __getstate__(self):  # Grain pickles the source to its workers: without the open file
        return {"path": self.path, "x": self.x, "y": self.y, "rows": self.rows, "_file": None, "_pid": None}

    def _datasets(self):
        if self._pid != os.getpid():  # first use in this process (a worker): open it here
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file[self.x], self._file[self.y]

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i):
        x, y = self._datasets()
        return x[i], y[i]

    def __getitems__(self, indices):
        """torch's batched fetch: the batch as two arrays, read in one slice when the rows
        are consecutive (file order), else with one sorted fancy-index read."""
        x, y = self._datasets()
        indices = np.asarray(indices)
        a, b = int(indices[0]), int(indices[-1]) + 1
        if b - a == len(indices) and np.all(np.diff(indices) == 1):
            return x[a:b], y[a:b]
        order = np.argsort(indices)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        rows = indices[order]
        return x[rows][inverse], y[rows][inverse]


class H5Batches(H5Rows):
    """Batches of ``batch_size`` consecutive rows (the last one partial): record ``i`` is
    rows ``i * batch_size`` to ``(i + 1) * batch_size``, read in one slice."""

    def __init__(self, path, batch_size: int, x: str = "x", y: str = "y"):
        super().__init__(path, x, y)
        self.batch_size = batch_size

    def __getstate__(self):
        return {**super().__getstate__(), "batch_size": self.batch_size}

    def __len__(self) -> int:
        return -(-self.rows // self.batch_size)

    def __getitem__(self, i):
        x, y = self._datasets()
        a = int(i) * self.batch_size
        return x[a : a + self.batch_size], y[a : a + self.batch_size]


def as_tensors(batch):
    """``collate_fn`` for :meth:`H5Rows.__getitems__`: the batch is already whole, so only
    make tensors of it (they reach the main process through shared memory)."""
    import torch

    return torch.from_numpy(batch[0]), torch.from_numpy(batch[1])


def torch_loader(path, batch_size: int, workers: int = 2, x: str = "x", y: str = "y"):
    """``DataLoader`` over :class:`H5Rows` in file order: ``workers`` worker processes
    (kept across epochs), no pinned memory (CPU)."""
    from torch.utils.data import DataLoader

    return DataLoader(H5Rows(path, x, y), batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=as_tensors, pin_memory=False, persistent_workers=True)


def grain_batches(path, batch_size: int, epochs: int, workers: int = 2, x: str = "x", y: str = "y"):
    """Grain: ``MapDataset`` over :class:`H5Batches`, ``epochs`` passes in file order,
    prefetched by ``workers`` worker processes. One iterator for the whole run, as Grain
    is used (its workers start once)."""
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain reads its Abseil flags unparsed in a plain script (grain#1355)
        flags.FLAGS.mark_as_parsed()
    dataset = grain.MapDataset.source(H5Batches(path, batch_size, x, y)).repeat(epochs)
    return iter(dataset.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)))


def tf_dataset(path, batch_size: int, x: str = "x", y: str = "y"):
    """``tf.data`` as a TensorFlow user writes it for an HDF5 file: a generator of h5py
    slices, one batch each, prefetched (``AUTOTUNE``)."""
    import tensorflow as tf

    with h5py.File(path, "r") as f:
        rows, specs = len(f[x]), tuple(tf.TensorSpec((None, *f[n].shape[1:]), f[n].dtype) for n in (x, y))

    def batches():
        with h5py.File(path, "r") as f:
            for a in range(0, rows, batch_size):
                yield f[x][a : a + batch_size], f[y][a : a + batch_size]

    return tf.data.Dataset.from_generator(batches, output_signature=specs).prefetch(tf.data.AUTOTUNE)
