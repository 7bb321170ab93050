"""The producer pool: plan order, the same bytes as h5py, backpressure, each block
decoded once, errors that reach the consumer, and no thread left behind."""

import gc
import itertools
import os
import threading
import time

import h5py
import numpy as np
import pytest

import pipetrain.priority
from pipetrain.errors import is_bad_input
from pipetrain.pipeline import BufferPool, PipelineError, Prefetcher, plans_from
from pipetrain.plan import Plan
from pipetrain.source import H5Source, SourceError
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


def hold_producers_after_the_first_batch(monkeypatch) -> threading.Event:
    """Producers take no plan after the first until the event is set or the stream
    closes (as idle-priority threads wait while a PyTorch step keeps both cores)."""
    gate = threading.Event()
    original_take = Prefetcher._take

    def take(self):
        while self._issued >= 1 and not gate.is_set() and not self._stop.is_set():
            gate.wait(0.01)
        return original_take(self)

    monkeypatch.setattr(Prefetcher, "_take", take)
    return gate


def test_a_batch_no_producer_took_is_copied_by_the_consumer_out_of_a_decoded_block(files, monkeypatch):
    # Producers held back after the first batch (as idle-priority threads are while a
    # PyTorch step keeps both cores): the next batches of the block the first one decoded
    # are copies, which the consumer makes itself rather than wait for a producer.
    paths, x, y = files
    gate = hold_producers_after_the_first_batch(monkeypatch)
    with H5Source(paths, x="x", y="y") as source:
        plan = Plan(source.rows_per_file, 8, block_rows=32, shuffle="none")  # 4 batches a block
        builders = {}
        original_build = Prefetcher._build  # (patched before the workers start)
        monkeypatch.setattr(Prefetcher, "_build", lambda self, p, b: builders.setdefault(
            p.index, threading.current_thread().name) and original_build(self, p, b))
        with Prefetcher(source, plan.batches(0), plan.blocks, 8, workers=1) as stream:
            rows = expected_rows(plan, 0)
            for i in range(4):
                batch = next(stream)
                np.testing.assert_array_equal(batch.x, x[rows[i]])
                np.testing.assert_array_equal(batch.y, y[rows[i]])
            gate.set()
            rest = [(b.x.copy(), b.y.copy()) for b in stream]
    assert [builders[i] for i in (1, 2, 3)] == [threading.current_thread().name] * 3
    assert "-producer-" in builders[0] and "-producer-" in builders[4]  # decoding stays with the producers
    for (bx, by), r in zip(rest, rows[4:], strict=True):
        np.testing.assert_array_equal(bx, x[r])
        np.testing.assert_array_equal(by, y[r])


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_an_error_in_the_consumers_own_copy_names_the_batch(files, monkeypatch, error):
    paths, _, _ = files
    gate = hold_producers_after_the_first_batch(monkeypatch)
    original_copy = Prefetcher._copy

    def copy(self, epoch, part, arrays, out):
        if threading.current_thread() is threading.main_thread():
            raise error("the copy broke")
        return original_copy(self, epoch, part, arrays, out)

    monkeypatch.setattr(Prefetcher, "_copy", copy)
    with H5Source(paths, x="x", y="y") as source:
        plan = Plan(source.rows_per_file, 8, block_rows=32, shuffle="none")
        with Prefetcher(source, plan.batches(0), plan.blocks, 8, workers=1) as stream:
            next(stream)
            if error is KeyboardInterrupt:  # Ctrl-C goes up as it came; asked again, the batch says it was lost
                with pytest.raises(KeyboardInterrupt):
                    next(stream)
            with pytest.raises(PipelineError, match=r"\(epoch 1, batch 2\): the copy broke") as caught:
                next(stream)
            gate.set()
    assert isinstance(caught.value.__cause__, error)


def test_waiting_producers_wake_at_the_pools_mark_or_when_the_consumer_waits(files):
    paths, _, _ = files
    with H5Source(paths, x="x", y="y") as source:
        pool = BufferPool(source.fields, rows=4, capacity=4)
    assert pool.wake_at == 2
    stop = threading.Event()
    held = [pool.acquire(stop) for _ in range(4)]
    woke = threading.Event()

    def producer():
        pool.wait(timeout=30)
        woke.set()

    for release, wakes in (([held.pop()], False), ([held.pop()], True)):
        woke.clear()
        thread = threading.Thread(target=producer)
        thread.start()
        for buffers in release:
            pool.release(buffers)
        assert woke.wait(0.3 if not wakes else 10) is wakes  # 1 free: it sleeps on; 2: it wakes
        if not wakes:
            pool.wake()  # the consumer waits for a batch: wake whatever is free
            assert woke.wait(10)
        thread.join(10)
    assert pool.acquire(stop, timeout=0) is not None  # buffers given back are taken again


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
        with pytest.raises(PipelineError, match=r"epoch 1, batch 6\).*disk on fire") as info:  # from 1, as shown
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
    with h5py.File(path, "r") as f:
        offset = f["x"].id.get_chunk_info(5).byte_offset
    with open(path, "r+b") as fh:  # corrupt the chunk holding rows 50-60 (before the open: an edit under
        fh.seek(offset)  # an open source is a file changed while it is read)
        fh.write(b"\xff" * 16)
    with H5Source(path, x="x") as source:
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
    monkeypatch.setattr(pipetrain.priority, "STARVED_SHARE", float("inf"))  # a busy machine must not raise it here
    paths, _, _ = files
    seen = {}
    with H5Source(paths, x="x", y="y") as source:
        plan = Plan(source.rows_per_file, 8, block_rows=source.block_rows())
        stream = Prefetcher(source, plan.batches(0), plan.blocks, 8, workers=2, priority=priority)
        original = stream._build

        def build(p, b):
            tid = threading.get_native_id()
            if threading.current_thread() is not threading.main_thread():  # (the consumer copies some itself)
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
                # Once raised (after the starved batch, or a later one on a busy machine, where
                # the share of time waiting grows slower), while the threads live.
                if stream.priority == "normal" and not policies and batch.index < 15:
                    policies = [os.sched_getscheduler(tid) for tid in stream._tids if _alive(tid)]
            assert stream.priority == "normal"
        assert policies and set(policies) == {os.SCHED_OTHER}


def _alive(tid: int) -> bool:
    return os.path.exists(f"/proc/self/task/{tid}")


@pytest.mark.parametrize("shuffle", ["none", "block"])
@pytest.mark.parametrize("rows", [slice(40, 350), slice(None, 0.9), slice(0.9, None), slice(-77, None), slice(5, 6)])
def test_a_row_range_of_many_files_is_read_without_copying_and_nothing_else(files, shuffle, rows):
    """H5Source(rows=...) over three files: the plan's batches hold exactly the rows of
    the range (in file order for "none": fit's batches on x[range]), with h5py's bytes;
    blocks stay within the range and aligned with the files' chunks."""
    paths, x, y = files
    total = len(x)
    with H5Source(paths, x="x", y="y", rows=rows) as source:
        lo, hi = source.row_range
        assert source.rows == hi - lo and source.rows_total == total
        assert (lo, hi) == ((40, 350) if rows.start == 40 else (0, 455) if rows.stop == 0.9 else
                            (455, 506) if rows.start == 0.9 else (429, 506) if rows.start == -77 else (5, 6))
        plan = Plan(source.row_ranges, 24, block_rows=source.block_rows(), shuffle=shuffle, seed=4, window=64)
        first = np.cumsum([0, *source.rows_per_file])[plan.blocks.file] + plan.blocks.start
        assert plan.rows == source.rows and first.min() >= lo and (first + plan.blocks.rows).max() <= hi
        inner = first > lo  # every block but the range's first starts on a chunk of its file
        assert (plan.blocks.start[inner] % np.array([32, 10, 64])[plan.blocks.file[inner]] == 0).all()
        got_x, got_y = [], []
        with Prefetcher(source, plan.batches(0), plan.blocks, 24, workers=2, recycle=False) as stream:
            for batch in stream:
                got_x.append(batch.x)
                got_y.append(batch.y)
    got_x, got_y = np.concatenate(got_x), np.concatenate(got_y)
    if shuffle == "none":
        np.testing.assert_array_equal(got_x, x[lo:hi])
        np.testing.assert_array_equal(got_y, y[lo:hi])
    else:  # a permutation of the range's rows (y is a unique float per row)
        order = np.argsort(got_y)
        np.testing.assert_array_equal(got_y[order], np.sort(y[lo:hi]))
        np.testing.assert_array_equal(got_x[order], x[lo:hi][np.argsort(y[lo:hi])])


def test_split_takes_the_last_rows_for_validation_as_fit_does(files):
    import math

    paths, _, _ = files
    with H5Source(paths, x="x", y="y") as whole:
        train, val = whole.split(0.1)
        cut = math.floor(whole.rows * (1.0 - 0.1))  # keras' train_validation_split
        assert (train.row_range, val.row_range) == ((0, cut), (cut, whole.rows))
        inner_train, inner_val = train.split(0.5)  # a split of a split stays inside it
        assert inner_train.row_range == (0, cut // 2) and inner_val.row_range == (cut // 2, cut)
        for source in (train, val, inner_train, inner_val):
            source.close()
        for bad, message in ((0.0, "between 0 and 1"), (1, "between 0 and 1"), (0.999999, "cannot be split")):
            with pytest.raises(SourceError, match=message):
                whole.split(bad)
    for rows, message in ((slice(10, 10), "selects no row"), (slice(0, 10, 2), "expected a slice"),
                          (slice(0, 1.5), "between 0.0 and 1.0"), (slice("a", None), "row numbers or fractions"),
                          (range(3), "expected a slice")):
        with pytest.raises(SourceError, match=message):
            H5Source(paths, x="x", y="y", rows=rows)


# -- no hang, no leak: every way a worker can stop reaches the consumer ------------------------


def consume(stream, timeout: float = 30.0, pause: float = 0.0) -> dict:
    """Iterate ``stream`` in another thread: the batch indices it delivered and the
    exception that ended it; ``done`` is False if it was still waiting after ``timeout``."""
    out = {"got": [], "error": None, "done": False}

    def loop():
        try:
            for batch in stream:
                out["got"].append(batch.index)
                time.sleep(pause)
        except BaseException as e:
            out["error"] = e
        finally:
            out["done"] = True

    threading.Thread(target=loop, daemon=True).start()
    wait_until(lambda: out["done"], timeout=timeout)
    return out


@pytest.mark.parametrize("where", ["taking a buffer", "reading ahead"])
def test_a_worker_failing_outside_a_batch_fails_the_stream_instead_of_hanging_it(files, where, monkeypatch):
    paths, _, _ = files
    calls = itertools.count()
    if where == "taking a buffer":
        original = BufferPool.acquire

        def failing(self, stop, timeout=None):
            if next(calls) == 6:
                raise MemoryError("no memory for another buffer")
            return original(self, stop, timeout)

        monkeypatch.setattr(BufferPool, "acquire", failing)
    else:
        original = Prefetcher._read_ahead

        def failing(self):
            if next(calls) == 3:
                raise RuntimeError("read-ahead broke")
            return original(self)

        monkeypatch.setattr(Prefetcher, "_read_ahead", failing)
    with H5Source(paths, x="x", y="y") as source:
        plan = Plan(source.rows_per_file, 8, block_rows=source.block_rows(), shuffle="block", window=64)
        stream = Prefetcher(source, plan.batches(0), plan.blocks, 8, workers=2, max_queue=2, lookahead=8)
        out = consume(stream, pause=0.01)  # a consumer slower than the producers: the pool runs dry
        stream.close()
    assert out["done"], "the consumer still waits for a batch that will never come"
    error = out["error"]
    assert isinstance(error, PipelineError), error
    assert "producer-" in str(error) and "taking the next batch" in str(error)  # which thread, doing what
    assert isinstance(error.__cause__, MemoryError if where == "taking a buffer" else RuntimeError)
    assert out["got"] == list(range(len(out["got"])))  # the batches before it, in order


def test_a_consumer_waiting_on_no_live_producer_gets_an_error(files, monkeypatch):
    # Workers that end without a word (as a killed thread would): the stream is not over.
    monkeypatch.setattr(Prefetcher, "_take", lambda self: None)
    paths, _, _ = files
    with H5Source(paths, x="x", y="y") as source:
        plan = Plan(source.rows_per_file, 8, block_rows=source.block_rows())
        stream = Prefetcher(source, plan.batches(0), plan.blocks, 8, workers=2)
        out = consume(stream)
        stream.close()
    assert out["done"], "the consumer waits forever on dead producers"
    assert isinstance(out["error"], PipelineError) and "every producer thread has stopped" in str(out["error"])


def test_cancel_ends_a_wait_for_a_batch_that_does_not_come(make_h5):
    path = make_h5("stuck.h5", chunks=10, x=np.zeros((100, 3), np.float32))
    released = threading.Event()
    cancelled = threading.Event()
    with H5Source(path, x="x") as source:
        original = source.read

        def stuck(f, a, b, out=None):  # the disk stops answering at row 30
            if a >= 30:
                released.wait(30)
            return original(f, a, b, out)

        source.read = stuck
        plan = Plan(source.rows_per_file, 10, block_rows=10, shuffle="none")
        stream = Prefetcher(source, plan.batches(0), plan.blocks, 10, workers=2, cancel=cancelled.is_set)
        try:
            assert [next(stream).index for _ in range(3)] == [0, 1, 2]
            threading.Timer(0.2, cancelled.set).start()
            t0 = time.monotonic()
            with pytest.raises(pipetrain.pipeline.Cancelled):
                next(stream)
            assert not released.is_set() and time.monotonic() - t0 < 25  # not by the disk answering
        finally:
            released.set()
            stream.close()


def test_a_batch_size_beyond_the_data_sizes_buffers_to_the_data(files):
    paths, x, y = files
    with H5Source(paths, x="x", y="y") as source:
        plan = Plan(source.rows_per_file, 10**10, block_rows=source.block_rows(), shuffle="none")
        out = {}

        def one_epoch():
            with Prefetcher(source, plan.batches(0), plan.blocks, 10**10, workers=2, recycle=False) as stream:
                out["rows"] = stream.pool.rows
                out["batches"] = list(stream)

        worker = threading.Thread(target=one_epoch, daemon=True)
        worker.start()
        assert wait_until(lambda: not worker.is_alive()), "the consumer hangs"
    assert out["rows"] == len(x) == 506
    [batch] = out["batches"]
    np.testing.assert_array_equal(batch.x, x)
    np.testing.assert_array_equal(batch.y, y)


def test_a_batch_the_machine_cannot_hold_is_bad_input_naming_batch_size_and_bytes(tmp_path):
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as f:  # 1 TB of rows never written: a tiny file
        f.create_dataset("x", shape=(10**6, 10**6), dtype="uint8", chunks=(4, 10**6))  # small chunks: quick to open
        f.create_dataset("y", shape=(10**6,), dtype="int64", chunks=(10**5,))
    with H5Source(path, x="x", y="y") as source:
        plan = Plan(source.rows_per_file, 10**6, block_rows=source.block_rows(), shuffle="none")
        out = {}

        def make():
            try:
                with Prefetcher(source, plan.batches(0), plan.blocks, 10**6) as stream:
                    next(stream)
            except BaseException as e:
                out["error"] = e

        worker = threading.Thread(target=make, daemon=True)
        worker.start()
        assert wait_until(lambda: not worker.is_alive()), "the consumer hangs"
    error = out["error"]
    assert is_bad_input(error), error
    message = str(error)
    assert message.startswith("batch_size=1000000: one batch needs 931.3 GiB (1000000 rows of 1,000,008 bytes)")
    assert "use a smaller batch_size" in message and "\n" not in message


def test_an_abandoned_prefetcher_stops_its_threads(files):
    paths, _, _ = files
    with H5Source(paths, x="x", y="y") as source:
        plan = Plan(source.rows_per_file, 8, block_rows=source.block_rows())
        stream = Prefetcher(source, plans_from(plan, 0), plan.blocks, 8, workers=2, max_queue=2)  # endless
        for _batch in stream:
            break
        assert len(producer_threads()) == 2
        del stream, _batch
        gc.collect()
        assert wait_until(lambda: producer_threads() == [])


# -- starving producers are raised after a few seconds of waiting, not after one long wait -------


def test_the_wait_window_counts_recent_waiting_only():
    waits = pipetrain.priority.WaitWindow(3.0)
    waits.add(10.0, 10.6)  # one slow batch: 0.6 s
    assert waits.waited(11.0) == pytest.approx(0.6) and not waits.starved(11.0)
    assert waits.waited(13.3) == pytest.approx(0.3)  # half of it is older than the window
    assert waits.waited(14.0) == 0.0
    for i in range(8):  # then 40% input-bound: 0.2 s waits in every 0.5 s
        waits.add(20.0 + 0.5 * i, 20.2 + 0.5 * i)
    assert waits.waited(23.7) == pytest.approx(1.2) and waits.starved(23.7)  # 40% of 3 s
    assert not waits.starved(30.0)
    assert waits.waited(31.0, waiting_since=30.5) == pytest.approx(0.5)  # a wait going on counts
    assert waits.starved(31.0, waiting_since=30.0)


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="Linux scheduling policies")
def test_steady_short_waits_raise_starving_producers_within_seconds(make_h5):
    # Every batch waits about 0.2 s (never one long wait): 0.9 s of waiting in 3 s is reached
    # by the 5th to 8th slow batch; more slack here for a machine that runs the test slowly.
    path = make_h5("slow.h5", chunks=10, x=np.zeros((400, 3), np.float32))
    with H5Source(path, x="x") as source:
        original = source.read

        def slow(f, a, b, out=None):
            time.sleep(0.4)  # two workers: about 0.2 s a batch
            return original(f, a, b, out)

        source.read = slow
        plan = Plan(source.rows_per_file, 10, block_rows=10, shuffle="none")
        raised = []
        with Prefetcher(source, plan.batches(0), plan.blocks, 10, workers=2, max_queue=2,
                        on_raised=raised.append) as stream:
            for batch in stream:
                if stream.priority == "normal":
                    raised_at = batch.index
                    policies = [os.sched_getscheduler(tid) for tid in stream._tids if _alive(tid)]
                    break
            else:
                pytest.fail("the producers were never raised")
    assert raised_at <= 16
    assert policies and set(policies) == {os.SCHED_OTHER}
    [info] = raised
    assert info["was"] == "idle" and info["waited_s"] > 0.9 and info["window_s"] == 3.0


def test_producers_check_many_chunks_side_by_side_and_read_what_h5py_reads(tmp_path):
    """Each chunk's first read asks HDF5's own index lookup (tests/test_chunks.py); the
    producers do so side by side, and HDF5 is not thread-safe: h5py's lock must be held
    around the lookup, or a sound file reads as "the chunk index is damaged"."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3_000, 4096)).astype("float32")  # chunks of 256 KB: long HDF5 calls
    path = tmp_path / "many.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(16, 4096))
        f.create_dataset("y", data=np.arange(len(x)), chunks=(16,), compression="gzip", compression_opts=1)
    for _ in range(3):  # fresh readers: every chunk is looked up again
        with H5Source(path, x="x", y="y") as source:
            plan = Plan(source.rows_per_file, 64, block_rows=source.block_rows(), shuffle="none")
            with Prefetcher(source, plan.batches(0), plan.blocks, 64, workers=2, recycle=False) as stream:
                got = [(batch.x, batch.y) for batch in stream]
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), x)
        np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), np.arange(len(x)))
