"""The producer pool: plan order, the same bytes as h5py, backpressure, each block
decoded once, errors that reach the consumer, and no thread left behind."""

import itertools
import os
import threading
import time

import h5py
import numpy as np
import pytest

import pipetrain.pipeline
from pipetrain.pipeline import PipelineError, Prefetcher, plans_from
from pipetrain.plan import Plan
from pipetrain.source import H5Source
from tests.conftest import wait_until


def producer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "-producer-" in t.name]


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    yield
    assert wait_until(lambda: producer_threads() == [])


@pytest.fixture
def files(make_h5):
    rng = np.random.default_rng(1)
    specs = [(301, 32), (77, 10), (128, 64)]  # rows, chunk rows: batches straddle chunks and files
    paths, xs, ys = [], [], []
    for i, (rows, chunk) in enumerate(specs):
        x = rng.integers(0, 255, size=(rows, 4, 3), dtype=np.uint8)
        y = rng.normal(size=rows).astype(np.float32)
        paths.append(make_h5(f"f{i}.h5", chunks=chunk, x=x, y=y))
        xs.append(x)
        ys.append(y)
    return paths, np.concatenate(xs), np.concatenate(ys)


def expected_rows(plan, epoch):
    """Global row numbers of each batch, computed from the plan alone."""
    file_first = {}
    offset = 0
    for f in range(plan.blocks.file.max() + 1):
        file_first[f] = offset
        offset += int(plan.blocks.rows[plan.blocks.file == f].sum())
    out = []
    for batch in plan.batches(epoch):
        rows = np.empty(batch.size, np.int64)
        for part in batch.parts:
            b = part.block
            rows[part.dst] = file_first[int(plan.blocks.file[b])] + plan.blocks.start[b] + np.arange(plan.blocks.rows[b])[part.src]
        out.append(rows)
    return out


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("shuffle", ["none", "block"])
@pytest.mark.parametrize("lookahead", [0, 5])
def test_batches_arrive_in_plan_order_with_h5py_bytes(files, workers, shuffle, lookahead):
    paths, x, y = files
    with H5Source(paths, x="x", y="y") as source:
        plan = Plan(source.rows_per_file, 24, block_rows=source.block_rows(), shuffle=shuffle, seed=4, window=64)
        want = expected_rows(plan, 0) + expected_rows(plan, 1)
        with Prefetcher(source, plans_from(plan, 0, 0, 2), plan.blocks, 24, workers=workers, max_queue=3,
                        lookahead=lookahead) as stream:
            got = list(stream)
        assert [(b.epoch, b.index) for b in got] == [(e, i) for e in range(2) for i in range(plan.steps_per_epoch)]
        assert [b.size for b in got] == [len(rows) for rows in want]
    # Content, without recycling (each batch keeps its own arrays).
    with H5Source(paths, x="x", y="y") as source:
        plan = Plan(source.rows_per_file, 24, block_rows=source.block_rows(), shuffle=shuffle, seed=4, window=64)
        with Prefetcher(source, plan.batches(0), plan.blocks, 24, workers=workers, recycle=False,
                        lookahead=lookahead) as stream:
            for batch, rows in zip(stream, expected_rows(plan, 0), strict=True):
                np.testing.assert_array_equal(batch.x, x[rows])
                np.testing.assert_array_equal(batch.y, y[rows])
                assert batch.x.dtype == np.uint8 and batch.y.dtype == np.float32


def test_recycled_buffers_hold_the_right_rows_while_held(files):
    paths, x, _ = files
    with H5Source(paths, x="x", y="y") as source:
        plan = Plan(source.rows_per_file, 50, block_rows=source.block_rows(), shuffle="none")
        seen_buffers = set()
        with Prefetcher(source, plan.batches(0), plan.blocks, 50, workers=2, max_queue=2) as stream:
            for batch, rows in zip(stream, expected_rows(plan, 0), strict=True):
                np.testing.assert_array_equal(batch.x, x[rows])
                seen_buffers.add(batch.x.__array_interface__["data"][0])
        assert len(seen_buffers) <= 3  # max_queue + 1 buffers, reused


def test_backpressure_bounds_the_batches_in_flight(files):
    paths, _, _ = files
    built = []
    with H5Source(paths, x="x", y="y") as source:
        plan = Plan(source.rows_per_file, 8, block_rows=source.block_rows(), shuffle="none")
        stream = Prefetcher(source, plan.batches(0), plan.blocks, 8, workers=3, max_queue=2)
        original = stream._build
        stream._build = lambda p, b: built.append(p.index) or original(p, b)
        with stream:
            next(stream)
            time.sleep(0.5)  # a slow consumer: producers must stop, not run ahead
            assert len(built) <= 1 + 2  # the batch held + max_queue
            assert len(list(stream)) == plan.steps_per_epoch - 1


def test_max_queue_bytes_lowers_the_queue(files):
    paths, _, _ = files
    with H5Source(paths, x="x", y="y") as source:
        plan = Plan(source.rows_per_file, 10, block_rows=source.block_rows())
        batch_bytes = 10 * (12 + 4)
        with Prefetcher(source, plan.batches(0), plan.blocks, 10, max_queue=8, max_queue_bytes=3 * batch_bytes) as s:
            assert s.max_queue == 3


@pytest.mark.parametrize("shuffle", ["none", "block"])
@pytest.mark.parametrize("lookahead", [0, 8])
def test_each_block_is_decoded_once(files, shuffle, lookahead):
    paths, _, _ = files
    with H5Source(paths, x="x", y="y") as source:
        plan = Plan(source.rows_per_file, 20, block_rows=source.block_rows(), shuffle=shuffle, window=100)
        reads = []
        original = source.read
        source.read = lambda f, a, b, out=None: reads.append((f, a, b)) or original(f, a, b, out)
        with Prefetcher(source, plan.batches(0), plan.blocks, 20, workers=3, max_queue=2, lookahead=lookahead) as stream:
            got = []
            for batch in stream:
                got.append(batch.read_bytes)
                time.sleep(0.002)  # a consumer slower than the producers, so they read ahead
            assert len(stream.cache) == 0  # every block dropped after its last use
        blocks = plan.blocks
        assert sorted(reads) == sorted(zip(blocks.file.tolist(), blocks.start.tolist(), blocks.stop.tolist(), strict=True))
        # Bytes fetched are counted once, by the first batch that reads a block.
        with H5Source(paths, x="x", y="y") as plain, Prefetcher(plain, plan.batches(0), plan.blocks, 20, workers=1) as stream:
            assert sum(got) == sum(b.read_bytes for b in stream)


def test_the_next_window_is_decoded_while_the_consumer_holds_every_buffer(files):
    paths, x, _ = files
    with H5Source(paths, x="x", y="y") as source:
        # The first file only (32-row chunks): a block is known by its first row. One
        # partition: its windows of two blocks follow one another.
        plan = Plan(source.rows_per_file[:1], 16, block_rows=32, shuffle="block", seed=2, window=64, partitions=1)
        plans = list(plan.batches(0))
        lookahead = plan.window_batches + 1  # 4 batches per window: the next window is in reach
        reads = []
        original = source.read
        source.read = lambda f, a, b, out=None: reads.append(a) or original(f, a, b, out)

        def blocks_of(batches):
            return {int(plan.blocks.start[p.block]) for bp in batches for p in bp.parts}

        with Prefetcher(source, plan.batches(0), plan.blocks, 16, workers=2, max_queue=2,
                        lookahead=lookahead, recycle=False) as stream:
            first = next(stream)
            # The consumer holds one batch, two wait: every buffer in use. The workers
            # then decode the next window's blocks, and nothing further.
            issued = 3
            started, ahead = blocks_of(plans[:issued]), blocks_of(plans[issued : issued + lookahead])
            assert wait_until(lambda: stream._issued == issued and set(reads) >= started | ahead)
            time.sleep(0.2)  # room for a wrong read beyond the bound to show up
            assert stream._issued == issued
            assert len(ahead - started) == 2  # the next window's two blocks
            assert set(reads) == started | ahead  # decoded already, and nothing further
            assert len(set(reads)) == len(reads)
            rest = list(stream)
        rows = expected_rows(plan, 0)
        for batch, want in zip([first, *rest], rows, strict=True):
            np.testing.assert_array_equal(batch.x, x[want])


def test_a_failing_plan_seen_ahead_is_delivered_in_its_turn(files):
    paths, _, _ = files
    with H5Source(paths, x="x", y="y") as source:
        plan = Plan(source.rows_per_file, 16, block_rows=source.block_rows(), shuffle="block", window=64)

        def plans():
            yield from itertools.islice(plan.batches(0), 5)
            raise RuntimeError("plan broke")

        with Prefetcher(source, plans(), plan.blocks, 16, workers=2, max_queue=1, lookahead=10) as stream:
            got = []
            with pytest.raises(PipelineError, match="plan broke"):
                for batch in stream:
                    got.append(batch.index)
                    time.sleep(0.05)
        assert got == [0, 1, 2, 3, 4]


def test_a_producer_error_reaches_the_consumer_with_where_and_traceback(make_h5):
    path = make_h5("bad.h5", chunks=10, x=np.zeros((100, 3), np.float32))
    with H5Source(path, x="x") as source:
        plan = Plan(source.rows_per_file, 10, block_rows=10)
        original = source.read

        raised = []

        def failing(f, a, b, out=None):
            if a >= 50:
                raised.append(time.monotonic())
                raise OSError("disk on fire")
            return original(f, a, b, out)

        source.read = failing
        stream = Prefetcher(source, plan.batches(0), plan.blocks, 10, workers=2, priority="normal")
        got = []
        with pytest.raises(PipelineError, match=r"epoch 0, batch 5\).*disk on fire") as info:
            for batch in stream:
                got.append(batch.index)
        assert time.monotonic() - min(raised) < 1.0  # from the failing read to the consumer
        assert got == [0, 1, 2, 3, 4]  # every batch before the failure, in order
        assert isinstance(info.value.__cause__, OSError)
        frames = []
        tb = info.value.__cause__.__traceback__
        while tb:
            frames.append(tb.tb_frame.f_code.co_name)
            tb = tb.tb_next
        assert "failing" in frames  # the original traceback, from the worker thread
        stream.close()


def test_a_read_error_names_file_dataset_and_rows(make_h5, tmp_path):
    path = make_h5("gone.h5", chunks=10, x=np.zeros((100, 3), np.float32))
    with H5Source(path, x="x") as source:
        with h5py.File(path, "r") as f:
            offset = f["x"].id.get_chunk_info(5).byte_offset
        with open(path, "r+b") as fh:  # corrupt the chunk holding rows 50-60
            fh.seek(offset)
            fh.write(b"\xff" * 16)
        plan = Plan(source.rows_per_file, 10, block_rows=10)
        with pytest.raises(PipelineError) as info, Prefetcher(source, plan.batches(0), plan.blocks, 10) as stream:
            list(stream)
        message = str(info.value)
        assert str(path) in message and "'x'" in message and "50-60" in message


def test_closing_mid_stream_and_on_keyboard_interrupt_stops_every_thread(files):
    paths, _, _ = files
    with H5Source(paths, x="x", y="y") as source:
        plan = Plan(source.rows_per_file, 4, block_rows=source.block_rows())
        stream = Prefetcher(source, plans_from(plan, 0), plan.blocks, 4, workers=4, max_queue=2)
        next(stream)
        assert len(producer_threads()) == 4
        stream.close()
        assert producer_threads() == []
        with pytest.raises(KeyboardInterrupt), Prefetcher(source, plans_from(plan, 0), plan.blocks, 4, workers=3) as stream:
            for i, _batch in enumerate(stream):
                if i == 3:
                    raise KeyboardInterrupt
        assert producer_threads() == []


def test_whole_blocks_decode_straight_into_the_batch_buffer(make_h5):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    path = make_h5("aligned.h5", chunks=32, x=x, y=np.arange(200))
    with H5Source(path, x="x", y="y") as source:
        plan = Plan(source.rows_per_file, 32, block_rows=32, shuffle="none")
        with Prefetcher(source, plan.batches(0), plan.blocks, 32, workers=2, recycle=False) as stream:
            stream.cache.get = None  # the cache must not be needed: every part is a whole block
            got = list(stream)
        np.testing.assert_array_equal(np.concatenate([b.x for b in got]), x)
        np.testing.assert_array_equal(np.concatenate([b.y for b in got]), np.arange(200))
        assert [b.size for b in got] == [32] * 6 + [8]


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="Linux scheduling policies")
@pytest.mark.parametrize("priority", ["idle", "low", "normal"])
def test_producers_run_at_the_priority_asked(files, priority, monkeypatch):
    monkeypatch.setattr(pipetrain.pipeline, "STARVED_S", float("inf"))  # a busy machine must not raise it here
    paths, _, _ = files
    seen = {}
    with H5Source(paths, x="x", y="y") as source:
        plan = Plan(source.rows_per_file, 8, block_rows=source.block_rows())
        stream = Prefetcher(source, plan.batches(0), plan.blocks, 8, workers=2, priority=priority)
        original = stream._build

        def build(p, b):
            tid = threading.get_native_id()
            seen[tid] = (os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid))
            return original(p, b)

        stream._build = build
        with stream:
            assert len(list(stream)) == plan.steps_per_epoch
    expected = {"idle": (os.SCHED_IDLE, 0), "low": (os.SCHED_OTHER, 19), "normal": (os.SCHED_OTHER, 0)}[priority]
    assert set(seen.values()) == {expected}


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="Linux scheduling policies")
def test_starving_idle_producers_are_raised_to_normal_priority(make_h5):
    # Many batches and a short queue: after the starved batch the producers are still
    # alive, waiting for buffers, so their scheduling policy can be read.
    path = make_h5("slow.h5", chunks=10, x=np.zeros((200, 3), np.float32))
    consumer_at_batch_1 = threading.Event()
    with H5Source(path, x="x") as source:
        plan = Plan(source.rows_per_file, 10, block_rows=10)
        original = source.read

        def slow(f, a, b, out=None):  # as if other processes kept the cores busy
            if a == 20:  # batch 2 arrives 1.5 s after the consumer asks for it
                consumer_at_batch_1.wait(30)
                time.sleep(1.5)
            return original(f, a, b, out)

        source.read = slow
        policies = []
        with Prefetcher(source, plan.batches(0), plan.blocks, 10, workers=2, max_queue=2, priority="idle") as stream:
            assert stream.priority == "idle"
            for batch in stream:
                if batch.index == 1:
                    consumer_at_batch_1.set()
                if batch.wait_s > 0.5 and not policies:  # the threads live: 17 batches to go
                    policies = [os.sched_getscheduler(tid) for tid in stream._tids if _alive(tid)]
            assert stream.priority == "normal"
        assert policies and set(policies) == {os.SCHED_OTHER}


def _alive(tid: int) -> bool:
    return os.path.exists(f"/proc/self/task/{tid}")
