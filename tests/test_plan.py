"""The batch order is a pure function of (seed, epoch): permutations, determinism,
resumable positions, bounded windows, exact block use counts."""

from collections import Counter

import numpy as np
import pytest

from pipetrain.plan import SHUFFLES, Plan, Share

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


def _same_plans(a, b) -> None:
    assert (a.epoch, a.index, a.size, a.global_size, a.replicated) == (b.epoch, b.index, b.size, b.global_size, b.replicated)
    assert len(a.parts) == len(b.parts)
    for p, q in zip(a.parts, b.parts, strict=True):
        assert (p.block, p.dst, p.uses, type(p.src)) == (q.block, q.dst, q.uses, type(q.src))
        assert p.src == q.src if isinstance(p.src, slice) else np.array_equal(p.src, q.src)


def test_planning_many_batches_at_once_plans_each_as_alone():
    """An epoch's iterator plans batches in vectorised passes of about AHEAD_ROWS rows:
    for any shape, share, shuffle and resume point, every plan (rows, layout, block
    uses) equals the one planned one batch per pass."""
    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(150):
        count, devices = int(rng.choice([1, 1, 2, 3, 4])), int(rng.choice([1, 2]))
        files = rng.integers(1, 300, size=int(rng.integers(1, 4))).tolist()
        settings = dict(block_rows=int(rng.integers(1, 64)), shuffle=str(rng.choice(sorted(SHUFFLES))),
                        seed=int(rng.integers(10)), window=int(rng.integers(1, 300)),
                        drop_remainder=bool(rng.random() < 0.3), partitions=int(rng.integers(1, 17)),
                        share=Share(int(rng.integers(count)), count, devices))
        plan = Plan(files, int(rng.integers(1, 40)) * count * devices, **settings)
        if not plan.steps_per_epoch:
            continue
        start = int(rng.integers(plan.steps_per_epoch))
        one_by_one = plan.batches(1, start)
        one_by_one.ahead_rows = 1
        several = plan.batches(1, start)
        several.ahead_rows = int(rng.choice([7, 100, 4096]))
        pairs = list(zip(one_by_one, several, strict=True))
        assert len(pairs) == plan.steps_per_epoch - start
        for a, b in pairs:
            _same_plans(a, b)
        checked += len(pairs)
    assert checked > 1000


def test_blocks_never_cross_files_and_align_with_chunks():
    plan = Plan([37, 5, 64], batch_size=8, block_rows=16)
    b = plan.blocks
    assert b.start.tolist() == [0, 16, 32, 0, 0, 16, 32, 48]
    assert b.stop.tolist() == [16, 32, 37, 5, 16, 32, 48, 64]
    assert b.file.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]


def test_block_shuffle_reads_a_bounded_window():
    """Every batch draws its rows from at most two consecutive windows of each partition."""
    plan = Plan([4096], batch_size=64, block_rows=64, shuffle="block", seed=0, window=2048, partitions=4)
    assert plan.window_blocks == 8  # 2048 rows over 4 partitions: 8 blocks of 64 rows each
    for batch in plan.batches(0):
        assert len({p.block for p in batch.parts}) <= 2 * plan.partitions * plan.window_blocks


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="shuffle='random'"):
        Plan([10], 2, shuffle="random")
    with pytest.raises(ValueError, match="batch_size=0"):
        Plan([10], 0)


# -- process shares ------------------------------------------------------------------------

UNEVEN = [
    # rows per file, batch size, block rows, window rows, partitions
    ([100], 8, 10, 40, 4),
    ([37, 5, 64], 8, 7, 21, 16),  # 106 rows: a partial last batch of 2 rows
    ([1000], 64, 32, 512, 16),  # 1000 rows: a partial last batch of 40 rows
    ([250, 251], 16, 16, 8192, 8),  # 501 rows: a partial last batch of 5 rows (replicated on 2 or 4)
    ([3, 3, 3], 4, 2, 2, 2),
]


def shares(rows, batch, block, window, partitions, shuffle, count, epoch=0, start=0):
    """Each process's rows of each batch, and the batch plans, for `count` processes."""
    out = []
    for index in range(count):
        plan = Plan(rows, batch, block_rows=block, shuffle=shuffle, seed=7, window=window,
                    partitions=partitions, share=Share(index, count))
        out.append((plan, list(plan.batches(epoch, start))))
    return out


@pytest.mark.parametrize("shuffle", sorted(SHUFFLES))
@pytest.mark.parametrize("count", [2, 4])
@pytest.mark.parametrize("rows, batch, block, window, partitions", UNEVEN)
def test_shares_are_disjoint_complete_equal_and_make_the_same_global_batches(
        shuffle, count, rows, batch, block, window, partitions):
    """Over an epoch the processes' rows are disjoint and cover every row once; every
    process runs the same steps with the same number of rows; and the global batches,
    joined from the shares, are those of one process (the order does not depend on the
    number of processes)."""
    one = epoch_rows(Plan(rows, batch, block_rows=block, shuffle=shuffle, seed=7, window=window,
                          partitions=partitions), 1)
    many = shares(rows, batch, block, window, partitions, shuffle, count, epoch=1)
    assert {len(batches) for _, batches in many} == {len(one)}  # the same steps everywhere
    for k, want in enumerate(one):
        got = [global_rows(plan, batches[k]) for plan, batches in many]
        assert len({len(g) for g in got}) == 1  # equal local sizes: no process waits for another
        replicated = many[0][1][k].replicated
        assert replicated == (len(want) % count != 0)  # only a batch that cannot split is whole everywhere
        if replicated:
            assert all(sorted(g.tolist()) == sorted(want.tolist()) for g in got)
        else:
            joined = np.concatenate(got)
            assert sorted(joined.tolist()) == sorted(want.tolist())  # disjoint and complete
        assert all(b[k].global_size == len(want) for _, b in many)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_block_shares_read_disjoint_blocks(count):
    """With the block shuffle and a process count that divides the partitions, each
    block is decoded by one process, except the few read in the rounds where some
    partitions have run out (at most one per partition)."""
    rows, batch, block, window, partitions = [4010, 990], 32, 25, 400, 8  # 201 blocks, two short
    readers: dict[int, set] = {}
    total = 0
    for index, (plan, batches) in enumerate(shares(rows, batch, block, window, partitions, "block", count)):
        blocks = {p.block for b in batches for p in b.parts}
        total += sum(int(plan.blocks.rows[b]) for b in blocks)
        for b in blocks:
            readers.setdefault(b, set()).add(index)
    shared = [b for b, who in readers.items() if len(who) > 1]
    assert len(readers) == 201
    assert len(shared) <= partitions
    assert total <= sum(rows) + len(shared) * block * (count - 1)  # about 1/count of the bytes each


def test_none_shares_are_contiguous_slices_of_file_order():
    (p0, b0), (p1, b1) = shares([100], 20, 10, 40, 16, "none", 2)
    assert global_rows(p0, b0[0]).tolist() == list(range(10))
    assert global_rows(p1, b1[0]).tolist() == list(range(10, 20))


@pytest.mark.parametrize("shuffle", sorted(SHUFFLES))
def test_a_share_resumes_at_any_batch_with_the_same_rest(shuffle):
    plan_rows = ([250, 251], 16, 16, 128, 8)
    for count in (1, 2, 4):
        full = shares(*plan_rows, shuffle, count, epoch=2)
        for start in (1, 17):
            rest = shares(*plan_rows, shuffle, count, epoch=2, start=start)
            for (plan, a), (_, b) in zip(full, rest, strict=True):
                assert [global_rows(plan, x).tolist() for x in a[start:]] == [global_rows(plan, x).tolist() for x in b]
                claimed = {}
                for x in b:  # block uses stay exact on a resumed share
                    for part in x.parts:
                        assert claimed.setdefault(part.block, part.uses) == part.uses
                counts = Counter(part.block for x in b for part in x.parts)
                assert counts == Counter(claimed)


def test_the_global_size_must_split_over_the_devices():
    with pytest.raises(ValueError, match="batch_size=30 must be a multiple of the run's 4 devices"):
        Plan([100], 30, share=Share(0, 2, devices=2))
    plan = Plan([101], 20, block_rows=10, share=Share(1, 2, devices=2))
    assert [b.size for b in plan.batches(0)] == [10] * 5 + [1]  # 1 row left: every device computes it
    assert plan.local_batch_size == 10
    assert Plan([139], 20, block_rows=10, share=Share(1, 2)).local_batch_size == 19  # the 19 replicated rows
