"""The batch order is a pure function of (seed, epoch): permutations, determinism,
resumable positions, bounded windows, exact block use counts."""

from collections import Counter

import numpy as np
import pytest

from pipetrain.plan import SHUFFLES, Plan

SHAPES = [
    # rows per file, batch size, block rows, window rows
    ([100], 10, 10, 40),
    ([37, 5, 64], 8, 7, 21),
    ([1000], 64, 256, 512),
    ([3, 3, 3], 4, 2, 2),
    ([250, 250], 32, 16, 8192),
]


def global_rows(plan: Plan, batch) -> np.ndarray:
    """The global row numbers of a batch, in its layout."""
    offsets = np.concatenate([[0], np.cumsum(np.bincount(plan.blocks.file, weights=plan.blocks.rows))])
    rows = np.empty(batch.size, dtype=np.int64)
    for part in batch.parts:
        b = part.block
        first = offsets[plan.blocks.file[b]] + plan.blocks.start[b]
        src = np.arange(plan.blocks.rows[b])[part.src]
        rows[part.dst] = first + src
    return rows


def epoch_rows(plan: Plan, epoch: int, start: int = 0) -> list[np.ndarray]:
    return [global_rows(plan, b) for b in plan.batches(epoch, start)]


def test_none_is_file_order_like_fit():
    plan = Plan([37, 5, 64], batch_size=8, block_rows=7, shuffle="none")
    batches = epoch_rows(plan, 0)
    assert np.array_equal(np.concatenate(batches), np.arange(106))
    assert [len(b) for b in batches] == [8] * 13 + [2]  # the partial last batch is kept
    assert plan.steps_per_epoch == 14
    # The same every epoch, whatever the seed.
    again = epoch_rows(Plan([37, 5, 64], 8, block_rows=7, seed=9), 3)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def test_drop_remainder_drops_the_partial_batch():
    plan = Plan([106], batch_size=8, block_rows=7, drop_remainder=True)
    assert plan.steps_per_epoch == 13
    assert [len(b) for b in epoch_rows(plan, 0)] == [8] * 13


@pytest.mark.parametrize("shuffle", sorted(SHUFFLES))
@pytest.mark.parametrize("rows, batch, block, window", SHAPES)
def test_every_epoch_is_a_permutation(shuffle, rows, batch, block, window):
    plan = Plan(rows, batch, block_rows=block, shuffle=shuffle, seed=3, window=window)
    for epoch in range(3):
        batches = epoch_rows(plan, epoch)
        assert len(batches) == plan.steps_per_epoch
        assert sorted(np.concatenate(batches).tolist()) == list(range(sum(rows)))
        assert all(len(b) == batch for b in batches[:-1])


@pytest.mark.parametrize("rows, batch, block, window", SHAPES)
def test_block_order_is_deterministic_and_varies(rows, batch, block, window):
    def order(seed, epoch):
        return np.concatenate(epoch_rows(Plan(rows, batch, block_rows=block, shuffle="block", seed=seed, window=window), epoch))

    assert np.array_equal(order(1, 2), order(1, 2))
    if sum(rows) > 20:
        assert not np.array_equal(order(1, 2), order(1, 3))  # epochs differ
        assert not np.array_equal(order(1, 2), order(2, 2))  # seeds differ
        assert not np.array_equal(order(1, 0), np.arange(sum(rows)))  # it does shuffle


@pytest.mark.parametrize("shuffle", sorted(SHUFFLES))
@pytest.mark.parametrize("rows, batch, block, window", SHAPES)
def test_resuming_at_any_batch_gives_the_same_rest(shuffle, rows, batch, block, window):
    plan = Plan(rows, batch, block_rows=block, shuffle=shuffle, seed=5, window=window)
    full = epoch_rows(plan, 1)
    for start in sorted({0, 1, len(full) // 2, len(full) - 1}):
        rest = epoch_rows(plan, 1, start)
        assert len(rest) == len(full) - start
        assert all(np.array_equal(a, b) for a, b in zip(rest, full[start:], strict=True))


@pytest.mark.parametrize("shuffle", sorted(SHUFFLES))
@pytest.mark.parametrize("rows, batch, block, window", SHAPES)
def test_uses_count_the_batches_that_read_each_block(shuffle, rows, batch, block, window):
    plan = Plan(rows, batch, block_rows=block, shuffle=shuffle, seed=2, window=window)
    for start in (0, plan.steps_per_epoch // 2):
        seen: Counter = Counter()
        claimed: dict[int, int] = {}
        for b in plan.batches(0, start):
            for part in b.parts:
                seen[part.block] += 1
                assert claimed.setdefault(part.block, part.uses) == part.uses
        assert dict(seen) == claimed  # a cache that drops a block after `uses` reads is exact


def test_blocks_never_cross_files_and_align_with_chunks():
    plan = Plan([37, 5, 64], batch_size=8, block_rows=16)
    b = plan.blocks
    assert b.start.tolist() == [0, 16, 32, 0, 0, 16, 32, 48]
    assert b.stop.tolist() == [16, 32, 37, 5, 16, 32, 48, 64]
    assert b.file.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]


def test_block_shuffle_reads_a_bounded_window():
    """Every batch draws its rows from at most two consecutive windows of blocks."""
    plan = Plan([4096], batch_size=64, block_rows=64, shuffle="block", seed=0, window=512)
    assert plan.window_blocks == 8
    for batch in plan.batches(0):
        assert len({p.block for p in batch.parts}) <= 2 * plan.window_blocks


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="shuffle='random'"):
        Plan([10], 2, shuffle="random")
    with pytest.raises(ValueError, match="batch_size=0"):
        Plan([10], 0)
