"""Which rows make which batch, in which order: a pure function of (seed, epoch).

The rows of all files, in file order, are cut into *blocks*: row ranges aligned with the
chunks of the data (a block never crosses a file), so that reading a block decodes whole
chunks and nothing else. An epoch is an order of blocks, grouped into *windows* of a few
blocks; the rows of a window may be permuted; the rows, window after window, are then cut
into batches. Two orders are registered in :data:`SHUFFLES`:

``none``
    Blocks in file order, rows in order: exactly the batches of ``fit(shuffle=False)``
    on the concatenated files, the partial last batch included.
``block``
    A random order of blocks, then the rows of each window of ``window`` rows (rounded
    to whole blocks) permuted. Memory is bounded by the window, not the data set: a
    reader holds one window of decoded blocks at a time, and no row is read twice.

No hidden random state: the order is drawn from ``numpy.random.default_rng([seed,
epoch])`` (and ``[seed, epoch, window]`` inside a window), so any batch of any epoch can
be planned again after a restart, which is how a run resumes at the exact next batch.

Inside a batch the rows are laid out grouped by block (the batch holds the same rows,
in an order that lets the assembler copy runs of rows instead of single rows).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Part:
    """Rows of one block that go into one batch."""

    block: int
    src: slice | np.ndarray  # rows within the block (a slice when they are a run)
    dst: slice  # positions within the batch
    uses: int  # how many batches of this pass read this block (so a cache knows when to drop it)


@dataclass(frozen=True)
class BatchPlan:
    """The rows of batch ``index`` of ``epoch``."""

    epoch: int
    index: int
    size: int
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class Shuffle:
    """An ordering algorithm: how blocks are ordered, and whether rows are permuted."""

    blocks_shuffled: bool
    rows_permuted: bool
    doc: str


SHUFFLES: dict[str, Shuffle] = {
    "none": Shuffle(False, False, "file order, like fit(shuffle=False)"),
    "block": Shuffle(True, True, "random chunk-aligned blocks, rows permuted within a window"),
}


class Blocks:
    """The block table: file index, first row and end row (in that file) of every block.

    Each file is given as its number of rows, or as the (start, stop) of the rows to
    use in it (a part of a file: ``H5Source(rows=...)``); blocks stay aligned with the
    file's own chunks, so the first and last block of a part may be shorter."""

    def __init__(self, rows_per_file: Sequence[int | tuple[int, int]], block_rows: int | Sequence[int]):
        if isinstance(block_rows, int):
            block_rows = [block_rows] * len(rows_per_file)
        files, starts, stops = [], [], []
        for f, (rows, step) in enumerate(zip(rows_per_file, block_rows, strict=True)):
            if step < 1:
                raise ValueError(f"block_rows must be >= 1, got {step}")
            first, rows = (0, rows) if isinstance(rows, (int, np.integer)) else rows
            start = np.arange(first - first % step, rows, step, dtype=np.int64)
            files.append(np.full(len(start), f, dtype=np.int32))
            starts.append(np.maximum(start, first))
            stops.append(np.minimum(start + step, rows))
        self.file = np.concatenate(files) if files else np.zeros(0, np.int32)
        self.start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.stop = np.concatenate(stops) if stops else np.zeros(0, np.int64)
        self.rows = (self.stop - self.start).astype(np.int64)

    def __len__(self) -> int:
        return len(self.file)

    def span(self, block: int) -> tuple[int, int, int]:
        """(file, start, stop) of a block, as ``H5Source.read`` takes them."""
        return int(self.file[block]), int(self.start[block]), int(self.stop[block])


class Plan:
    """Batches of ``batch_size`` rows over files of ``rows_per_file`` rows (or of the
    (start, stop) row ranges of parts of files).

    >>> plan = Plan([10, 5], batch_size=4, block_rows=4)
    >>> [b.size for b in plan.batches(epoch=0)]
    [4, 4, 4, 3]
    """

    def __init__(
        self,
        rows_per_file: Sequence[int],
        batch_size: int,
        *,
        block_rows: int | Sequence[int] = 256,
        shuffle: str = "none",
        seed: int = 0,
        window: int = 8192,
        drop_remainder: bool = False,
    ):
        if shuffle not in SHUFFLES:
            raise ValueError(f"shuffle={shuffle!r}: expected one of {', '.join(SHUFFLES)}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.blocks = Blocks(rows_per_file, block_rows)
        self.rows = int(self.blocks.rows.sum())
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_remainder = bool(drop_remainder)
        self.typical_block = int(np.max(self.blocks.rows)) if len(self.blocks) else 1
        self.window_blocks = max(1, round(window / self.typical_block))
        full, rest = divmod(self.rows, self.batch_size)
        self.steps_per_epoch = full + (1 if rest and not drop_remainder else 0)

    @property
    def window_batches(self) -> int:
        """Batches cut from one window (at most): how far ahead a reader looks to have
        the next window's blocks decoded before its first batch is due."""
        if not SHUFFLES[self.shuffle].rows_permuted:
            return 1
        return -(-self.window_blocks * self.typical_block // self.batch_size)

    def batches(self, epoch: int, start: int = 0) -> Iterator[BatchPlan]:
        """The batches of ``epoch`` from batch ``start`` on, in training order."""
        return _EpochBatches(self, epoch, start)

    def describe(self) -> dict:
        return {
            "rows": self.rows,
            "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "blocks": len(self.blocks),
            "window_blocks": self.window_blocks if SHUFFLES[self.shuffle].rows_permuted else 1,
            "drop_remainder": self.drop_remainder,
        }


class _EpochBatches(Iterator[BatchPlan]):
    """Walks the windows of one epoch in order and cuts them into batches."""

    def __init__(self, plan: Plan, epoch: int, start: int):
        self.plan, self.epoch, self.next_index = plan, int(epoch), int(start)
        algo = SHUFFLES[plan.shuffle]
        blocks = plan.blocks
        rng = np.random.default_rng([plan.seed, self.epoch])
        self.order = rng.permutation(len(blocks)) if algo.blocks_shuffled else np.arange(len(blocks))
        self.rows_permuted = algo.rows_permuted
        per_window = plan.window_blocks if algo.rows_permuted else 1
        self.window_first = np.arange(0, len(blocks), per_window)  # index into order
        window_rows = np.add.reduceat(blocks.rows[self.order], self.window_first) if len(blocks) else []
        self.window_start = np.concatenate([[0], np.cumsum(window_rows)]).astype(np.int64)
        self.per_window = per_window
        self.cached: dict[int, tuple[np.ndarray, np.ndarray, dict[int, int]]] = {}

    def __next__(self) -> BatchPlan:
        plan, i = self.plan, self.next_index
        if i >= plan.steps_per_epoch:
            raise StopIteration
        lo = i * plan.batch_size
        hi = min(lo + plan.batch_size, plan.rows)
        blk_parts, off_parts, uses = [], [], {}
        w = int(np.searchsorted(self.window_start, lo, side="right")) - 1
        while self.window_start[w] < hi:
            blk, off, window_uses = self._window(w)
            a = max(lo, self.window_start[w]) - self.window_start[w]
            b = min(hi, self.window_start[w + 1]) - self.window_start[w]
            blk_parts.append(blk[a:b])
            off_parts.append(off[a:b])
            uses.update(window_uses)
            w += 1
        for old in [k for k in self.cached if k < w - 1]:
            del self.cached[old]  # windows behind us are never needed again
        self.next_index += 1
        return BatchPlan(self.epoch, i, hi - lo, _parts(np.concatenate(blk_parts), np.concatenate(off_parts), uses))

    def _window(self, w: int) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
        """Block and row-in-block of every position of window ``w``, and block uses."""
        if w in self.cached:
            return self.cached[w]
        blocks = self.plan.blocks
        ids = self.order[self.window_first[w] : self.window_first[w] + self.per_window]
        sizes = blocks.rows[ids]
        blk = np.repeat(ids, sizes)
        # Row offsets within each block: 0..size-1 for every block, without a Python loop.
        off = np.arange(len(blk), dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        if self.rows_permuted and len(blk) > 1:
            perm = np.random.default_rng([self.plan.seed, self.epoch, w]).permutation(len(blk))
            blk, off = blk[perm], off[perm]
        self.cached[w] = (blk, off, self._uses(w, blk))
        return self.cached[w]

    def _uses(self, w: int, blk: np.ndarray) -> dict[int, int]:
        """For every block of window ``w``: how many batches of this pass read it.

        Only batches from the pass's first batch on count, so a pass that resumes
        mid-window does not wait for batches it will never build."""
        plan = self.plan
        pos = self.window_start[w] + np.arange(len(blk), dtype=np.int64)
        batch = pos // plan.batch_size
        keep = (batch >= self.next_index) & (batch < plan.steps_per_epoch)
        pairs = np.unique(blk[keep].astype(np.int64) * (plan.steps_per_epoch + 1) + batch[keep])
        ids, counts = np.unique(pairs // (plan.steps_per_epoch + 1), return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist(), strict=True))


def _parts(blk: np.ndarray, off: np.ndarray, uses: dict[int, int]) -> tuple[Part, ...]:
    """Group a batch's rows by block; each group becomes one contiguous run of the batch."""
    order = np.lexsort((off, blk))
    blk, off = blk[order], off[order]
    firsts = np.flatnonzero(np.diff(blk, prepend=-1))
    ends = np.append(firsts[1:], len(blk))
    parts = []
    for a, b in zip(firsts.tolist(), ends.tolist(), strict=True):
        rows = off[a:b]
        run = int(rows[-1]) - int(rows[0]) + 1 == len(rows)
        src = slice(int(rows[0]), int(rows[-1]) + 1) if run else rows
        block = int(blk[a])
        parts.append(Part(block, src, slice(a, b), uses[block]))
    return tuple(parts)
