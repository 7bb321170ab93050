"""Which rows make which batch, in which order, for which process: a pure function of
(seed, epoch) and, for the process's share, (process index, process count).

The rows of all files, in file order, are cut into *blocks*: row ranges aligned with the
chunks of the data (a block never crosses a file), so that reading a block decodes whole
chunks and nothing else. An epoch is one *global order* of rows, cut into batches of
``batch_size`` rows; the global order does not depend on how many processes train.
Two orders are registered in :data:`SHUFFLES`:

``none``
    Blocks in file order, rows in order: exactly the batches of ``fit(shuffle=False)``
    on the concatenated files, the partial last batch included.
``block``
    The blocks in a random order, dealt into ``partitions`` runs of consecutive blocks
    (MosaicML streaming's "canonical nodes"); each partition is read in *windows* of a
    few blocks whose rows are permuted, and the global order takes one row from each
    partition in turn. Memory is bounded by the windows, not the data set: a reader
    holds one window of decoded blocks per partition it reads, and no row is read twice.

No hidden random state: the order is drawn from ``numpy.random.default_rng([seed,
epoch])`` (and ``[seed, epoch, partition, window]`` inside a window), so any batch of any
epoch can be planned again after a restart, which is how a run resumes at the exact next
batch, on any number of processes.

**Process shares** (:class:`Share`: index and count, as Grain's ``ShardOptions``). In a
data-parallel run every process assembles its share of every global batch and Keras
joins the shares into one global array. Every process takes the same number of rows of
every batch (``batch_size / count``), so every process runs the same steps. With
``block``, process ``i`` takes the rows at global positions ``p`` with ``p % count == i``:
while every partition still has rows, that is the partitions ``c`` with ``c % count ==
i``, so processes decode disjoint blocks when ``count`` divides ``partitions`` (any other
count gives the same batches, each process then decoding more). With ``none``, process
``i`` takes the ``i``-th contiguous slice of each batch (the blocks at the slices'
edges are decoded by both neighbours).

A batch whose rows cannot be split evenly over every device of the run (only the
partial last batch can be such: ``batch_size`` must be a multiple of the devices) is
*replicated*: every process takes all its rows and every device computes the whole
batch, so its result is exactly that of one process.

Inside a batch the rows are laid out grouped by block (the batch holds the same rows,
in an order that lets the assembler copy runs of rows instead of single rows).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

AHEAD_ROWS = 4096  # rows of the batches an epoch's iterator plans in one pass (at least one batch)
PARTITIONS = 16  # the default partition count of the block shuffle (a multiple of 1, 2, 4, 8, 16 processes)
MAX_PARTITIONS = 1 << 16  # an epoch's plan takes time and memory in proportion: far above any real need
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Part:
    """Rows of one block that go into one batch."""

    block: int
    src: slice | np.ndarray  # rows within the block (a slice when they are a run)
    dst: slice  # positions within the batch
    uses: int  # how many batches of this pass read this block (so a cache knows when to drop it)


@dataclass(frozen=True)
class BatchPlan:
    """This process's rows of batch ``index`` of ``epoch``: ``size`` of the batch's
    ``global_size`` rows (all of them when the batch is ``replicated``)."""

    epoch: int
    index: int
    size: int
    parts: tuple[Part, ...]
    global_size: int = -1  # -1: the same as size
    replicated: bool = False


@dataclass(frozen=True)
class Share:
    """Which part of every batch this process takes: ``index`` of ``count`` processes,
    each splitting its rows further over ``devices`` local devices (as Keras does)."""

    index: int = 0
    count: int = 1
    devices: int = 1

    def __post_init__(self):
        if self.count < 1 or self.devices < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"share index={self.index}, count={self.count}, devices={self.devices}: "
                             "expected 0 <= index < count and devices >= 1")

    @property
    def total_devices(self) -> int:
        return self.count * self.devices


@dataclass(frozen=True)
class Shuffle:
    """An ordering algorithm: how blocks are ordered, whether rows are permuted, and
    whether the blocks are dealt into partitions (which also decides the shares)."""

    blocks_shuffled: bool
    rows_permuted: bool
    partitioned: bool
    doc: str


SHUFFLES: dict[str, Shuffle] = {
    "none": Shuffle(False, False, False, "file order, like fit(shuffle=False)"),
    "block": Shuffle(True, True, True, "random chunk-aligned blocks in partitions, rows permuted within a window"),
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
    """Batches of ``batch_size`` rows (the global batch) over files of ``rows_per_file``
    rows (or of the (start, stop) row ranges of parts of files); this process's rows of
    each, as ``share`` says.

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
        partitions: int = PARTITIONS,
        share: Share | None = None,
    ):
        if shuffle not in SHUFFLES:
            raise ValueError(f"shuffle={shuffle!r}: expected one of {', '.join(SHUFFLES)}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 1 <= partitions <= MAX_PARTITIONS:
            raise ValueError(f"partitions={partitions} must be from 1 to {MAX_PARTITIONS}")
        self.share = share or Share()
        devices = self.share.total_devices
        if batch_size % devices:
            raise ValueError(f"batch_size={batch_size} must be a multiple of the run's {devices} devices "
                             f"({self.share.count} process(es) x {self.share.devices}): each takes an equal share")
        self.blocks = Blocks(rows_per_file, block_rows)
        self.rows = int(self.blocks.rows.sum())
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_remainder = bool(drop_remainder)
        self.partitions = int(partitions)
        algo = SHUFFLES[shuffle]
        self.lanes = self.partitions if algo.partitioned else 1  # partitions read side by side
        self.typical_block = int(np.max(self.blocks.rows)) if len(self.blocks) else 1
        self.window_blocks = max(1, round(window / (self.lanes * self.typical_block))) if algo.rows_permuted else 1
        full, rest = divmod(self.rows, self.batch_size)
        self.partial = rest if not drop_remainder else 0  # rows of the partial last batch, if any
        self.steps_per_epoch = full + (1 if self.partial else 0)
        # The most rows this process assembles for one batch (its buffers' size).
        self.local_batch_size = max(self.batch_size // self.share.count,
                                    self.partial if self.replicated(self.steps_per_epoch - 1) else 0)

    def global_size(self, index: int) -> int:
        """Rows of global batch ``index`` (every process together)."""
        return min(self.batch_size, self.rows - index * self.batch_size)

    def replicated(self, index: int) -> bool:
        """Whether every process takes all rows of batch ``index`` (its rows do not split
        evenly over the run's devices: only a partial last batch can be so)."""
        return self.share.total_devices > 1 and self.global_size(index) % self.share.total_devices != 0

    @property
    def window_batches(self) -> int:
        """Batches cut from one round of windows (at most): how far ahead a reader looks
        to have the next windows' blocks decoded before their first batch is due."""
        if not SHUFFLES[self.shuffle].rows_permuted:
            return 1
        lanes = min(self.lanes, max(1, len(self.blocks)))
        return -(-self.window_blocks * self.typical_block * lanes // self.batch_size)

    def batches(self, epoch: int, start: int = 0) -> Iterator[BatchPlan]:
        """This process's part of the batches of ``epoch`` from batch ``start`` on, in
        training order."""
        return _EpochBatches(self, epoch, start)

    def describe(self) -> dict:
        """The plan as a run records it: what defines the batches (not the share, so a
        run resumes on any number of processes)."""
        return {
            "rows": self.rows,
            "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "blocks": len(self.blocks),
            "window_blocks": self.window_blocks,
            "partitions": self.partitions,
            "drop_remainder": self.drop_remainder,
        }


class _Lanes:
    """The global order of one epoch as rows taken in turn from ``P`` partitions (lanes)
    of lengths ``L``: round ``r`` takes row ``r`` of every partition longer than ``r``, in
    partition order. Maps global positions to (partition, row) and back, vectorised."""

    def __init__(self, lengths: np.ndarray):
        self.lengths = lengths
        P = len(lengths)
        self.sorted = np.sort(lengths)
        self.below = np.concatenate([[0], np.cumsum(self.sorted)])  # sums of the k shortest
        # Segments of rounds in which the same partitions are active: from each distinct length on.
        self.seg_round = np.unique(np.concatenate([[0], lengths]))
        self.seg_first = self.position_of_round(self.seg_round)
        self.seg_active = np.array([(lengths > r).sum() for r in self.seg_round])
        table = np.zeros((len(self.seg_round), max(1, P)), dtype=np.int64)
        for s, r in enumerate(self.seg_round):
            active = np.flatnonzero(lengths > r)
            table[s, : len(active)] = active
        self.seg_table = table

    def position_of_round(self, r: np.ndarray) -> np.ndarray:
        """Global position of the first row of round ``r``: the sum of min(L, r)."""
        k = np.searchsorted(self.sorted, r, side="right")
        return self.below[k] + r * (len(self.lengths) - k)

    def position(self, lane: int, rows: np.ndarray) -> np.ndarray:
        """Global positions of rows ``rows`` of partition ``lane``."""
        before = (self.lengths[:lane, None] > rows[None, :]).sum(axis=0)
        return self.position_of_round(rows) + before

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(partition, row) of each global position."""
        seg = np.searchsorted(self.seg_first, positions, side="right") - 1
        into = positions - self.seg_first[seg]
        active = self.seg_active[seg]
        rounds = self.seg_round[seg] + into // active
        return self.seg_table[seg, into % active], rounds


class _EpochBatches(Iterator[BatchPlan]):
    """This process's rows of each batch of one epoch, window by window."""

    def __init__(self, plan: Plan, epoch: int, start: int):
        self.plan, self.epoch, self.next_index = plan, int(epoch), int(start)
        algo = SHUFFLES[plan.shuffle]
        blocks = plan.blocks
        K, P, wb = len(blocks), plan.lanes, plan.window_blocks
        rng = np.random.default_rng([plan.seed, self.epoch])
        self.order = rng.permutation(K) if algo.blocks_shuffled else np.arange(K)
        self.rows_permuted = algo.rows_permuted
        self.strided = algo.partitioned  # process i takes positions i, i + count, ...
        # Partition c is order[bounds[c]:bounds[c+1]], read in windows of wb blocks.
        self.bounds = (np.arange(P + 1) * K) // P
        self.cum = np.concatenate([[0], np.cumsum(blocks.rows[self.order])]).astype(np.int64)
        self.lanes = _Lanes(self.cum[self.bounds[1:]] - self.cum[self.bounds[:-1]])
        # Window table, partition after partition: first block (index into order) of each.
        counts = -(-(self.bounds[1:] - self.bounds[:-1]) // wb)
        self.lane_first_window = np.concatenate([[0], np.cumsum(counts)])
        lane = np.repeat(np.arange(P), counts)
        m = np.arange(len(lane)) - self.lane_first_window[lane]
        self.win_first = self.bounds[lane] + m * wb
        self.win_stop = np.minimum(self.win_first + wb, self.bounds[lane + 1])
        self.win_lane = lane
        self.win_row0 = self.cum[self.win_first] - self.cum[self.bounds[lane]]  # row within the partition
        self.key_scale = plan.rows + 1  # windows sorted by (partition, first row): one search finds any row's
        self.win_key = lane * self.key_scale + self.win_row0
        self.cached: dict[int, tuple[np.ndarray, np.ndarray, dict[int, int], int]] = {}
        self.ready: collections.deque[BatchPlan] = collections.deque()  # planned, not yet taken
        self.ahead_rows = AHEAD_ROWS

    def __next__(self) -> BatchPlan:
        if not self.ready:
            if self.next_index >= self.plan.steps_per_epoch:
                raise StopIteration
            self._plan_ahead()
        return self.ready.popleft()

    def _plan_ahead(self) -> None:
        """Plan the next batches, as many as hold about ``AHEAD_ROWS`` rows, in one
        vectorised pass: a plan costs a few dozen small numpy calls, which a producer
        would otherwise make for every batch, holding the GIL the training step needs."""
        plan, first = self.plan, self.next_index
        count = min(plan.steps_per_epoch - first, max(1, self.ahead_rows // plan.batch_size))
        indices = range(first, first + count)
        sizes = [plan.global_size(i) for i in indices]
        replicated = [plan.replicated(i) for i in indices]
        lo, end = first * plan.batch_size, first * plan.batch_size + sum(sizes)
        if plan.share.count == 1:
            pos = np.arange(lo, end, dtype=np.int64)
            taken = sizes
        else:
            mine = [self._mine(i * plan.batch_size, size, rep)
                    for i, size, rep in zip(indices, sizes, replicated, strict=True)]
            pos, taken = np.concatenate(mine), [len(m) for m in mine]
        batch = np.repeat(np.arange(count), taken)
        lane, row = self.lanes.locate(pos)
        w = np.searchsorted(self.win_key, lane * self.key_scale + row, side="right") - 1
        by_window = np.argsort(w, kind="stable")
        windows, firsts = np.unique(w[by_window], return_index=True)
        blk = np.empty(len(pos), np.int64)
        off = np.empty(len(pos), np.int64)
        uses: dict[int, int] = {}
        for window, a, b in zip(windows.tolist(), firsts.tolist(), [*firsts[1:].tolist(), len(pos)], strict=True):
            wblk, woff, wuses, _ = self._window(window)
            at = by_window[a:b]
            k = row[at] - self.win_row0[window]
            blk[at], off[at] = wblk[k], woff[k]
            uses.update(wuses)
        for old in [k for k, v in self.cached.items() if v[3] < end]:
            del self.cached[old]  # windows whose last row is behind these batches are never needed again
        self.next_index += count
        parts = _parts(batch, blk, off, uses, count)
        for j, i in enumerate(indices):
            self.ready.append(BatchPlan(self.epoch, i, taken[j], parts[j], sizes[j], replicated[j]))

    def _mine(self, lo: int, size: int, replicated: bool) -> np.ndarray:
        """The global positions of batch [lo, lo + size) that this process takes."""
        share = self.plan.share
        if replicated or share.count == 1:
            return np.arange(lo, lo + size, dtype=np.int64)
        if self.strided:
            return np.arange(lo + share.index, lo + size, share.count, dtype=np.int64)
        each = size // share.count
        return np.arange(lo + share.index * each, lo + (share.index + 1) * each, dtype=np.int64)

    def _owned(self, pos: np.ndarray) -> np.ndarray:
        """Which global positions this process takes (vectorised :meth:`_mine`)."""
        plan, share = self.plan, self.plan.share
        if share.count == 1:
            return np.ones(len(pos), bool)
        batch = pos // plan.batch_size
        size = np.minimum(plan.batch_size, plan.rows - batch * plan.batch_size)
        replicated = size % share.total_devices != 0
        if self.strided:
            mine = pos % share.count == share.index
        else:
            mine = (pos - batch * plan.batch_size) // np.maximum(1, size // share.count) == share.index
        return replicated | mine

    def _window(self, w: int) -> tuple[np.ndarray, np.ndarray, dict[int, int], int]:
        """Block and row-in-block of every row of window ``w`` (by its row in the
        partition), the uses of its blocks, and the global position of its last row."""
        if w in self.cached:
            return self.cached[w]
        blocks, plan = self.plan.blocks, self.plan
        ids = self.order[self.win_first[w] : self.win_stop[w]]
        sizes = blocks.rows[ids]
        blk = np.repeat(ids, sizes)
        # Row offsets within each block: 0..size-1 for every block, without a Python loop.
        off = np.arange(len(blk), dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        lane = int(self.win_lane[w])
        if self.rows_permuted and len(blk) > 1:
            m = int(w - self.lane_first_window[lane])
            perm = np.random.default_rng([plan.seed, self.epoch, lane, m]).permutation(len(blk))
            blk, off = blk[perm], off[perm]
        pos = self.lanes.position(lane, self.win_row0[w] + np.arange(len(blk), dtype=np.int64))
        self.cached[w] = (blk, off, self._uses(blk, pos), int(pos[-1]) if len(pos) else -1)
        return self.cached[w]

    def _uses(self, blk: np.ndarray, pos: np.ndarray) -> dict[int, int]:
        """For every block of a window: how many batches of this pass read it here.

        Only this process's rows count, and only batches from the pass's first batch on,
        so a pass that resumes mid-window does not wait for batches it will never build."""
        plan = self.plan
        batch = pos // plan.batch_size
        keep = (batch >= self.next_index) & (batch < plan.steps_per_epoch) & self._owned(pos)
        pairs = np.unique(blk[keep].astype(np.int64) * (plan.steps_per_epoch + 1) + batch[keep])
        ids, counts = np.unique(pairs // (plan.steps_per_epoch + 1), return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist(), strict=True))


def _parts(batch: np.ndarray, blk: np.ndarray, off: np.ndarray, uses: dict[int, int],
           count: int) -> list[tuple[Part, ...]]:
    """The parts of ``count`` consecutive batches (``batch``: each row's batch, 0 to
    ``count - 1``, non-decreasing): a batch's rows grouped by block, each group one
    contiguous run of the batch, in block order and, within a block, in row order."""
    order = np.lexsort((off, blk, batch))
    batch, blk, off = batch[order], blk[order], off[order]
    firsts = np.flatnonzero((np.diff(blk, prepend=-1) != 0) | (np.diff(batch, prepend=-1) != 0))
    ends = np.append(firsts[1:], len(blk))
    owner, low, high = batch[firsts], off[firsts], off[ends - 1]  # each part's batch, first and last row
    # Where each batch's rows begin, for the parts' places within their batch.
    base = np.searchsorted(batch, np.arange(count))[owner]
    runs = (high - low + 1 == ends - firsts).tolist()
    out: list[list[Part]] = [[] for _ in range(count)]
    for b, block, a, e, at, first, last, run in zip(
        owner.tolist(), blk[firsts].tolist(), firsts.tolist(), ends.tolist(), base.tolist(),
        low.tolist(), high.tolist(), runs, strict=True,
    ):
        src = slice(first, last + 1) if run else off[a:e]
        out[b].append(Part(block, src, slice(a - at, e - at), uses[block]))
    return [tuple(p) for p in out]
