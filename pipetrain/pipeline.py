"""The producer pool: worker threads read, decode and assemble batches ahead of the
consumer, into a bounded set of buffers, delivered in plan order.

Separation of concerns: the plan says which rows make each batch; the source reads row
ranges; this module decides who reads what and when, keeps memory bounded, and carries
errors and timings to the consumer. It knows nothing of models.

- **Bounded.** At most ``max_queue`` batches (and ``max_queue_bytes``) are in flight:
  a worker must take a free buffer from the :class:`BufferPool` before it takes the next
  batch, and buffers come back only when the consumer moves on. A slow consumer stops the
  producers; memory does not grow.
- **Ordered.** Batches are built in parallel but handed out in plan order.
- **Each block decoded once.** A block needed by several batches (a chunk straddling two
  batches, or a shuffle window) is decoded by the first worker that needs it and kept
  until its last user, as counted by the plan, has copied its rows.
- **Ahead of time.** While every buffer is in use, workers decode the cached blocks of
  batches not started yet (``lookahead``), so the first batch of a shuffle window, which
  reads all of the window's blocks, does not make the consumer wait.
- **Told ahead.** Plans are announced to the source before they are due
  (:class:`_Announced`): a source reading objects in a bucket fetches their chunks
  while earlier batches train. The source hears row ranges, never batches.
- **Errors travel.** An exception in a worker is delivered in place of its batch, with
  the original traceback and the file, dataset and rows it was reading.
- **Clean close.** :meth:`Prefetcher.close` (also on error, ``KeyboardInterrupt`` and
  garbage collection) stops and joins every worker; every wait has a timeout and checks
  the stop flag, so nothing hangs.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from pipetrain.plan import BatchPlan
from pipetrain.source import H5Source

POLL_S = 0.1  # how often blocked waits look at the stop flag
PRIORITIES = ("idle", "low", "normal")
STARVED_S = 0.5  # a wait this long for one batch means idle-priority producers starve


def set_priority(priority: str, tid: int | None = None) -> bool:
    """Set a thread's CPU priority (the calling thread's by default); Linux only, and
    False where it is not allowed.

    The training step of a CPU backend runs on every core; a producer thread that takes
    a core from it makes the whole step wait for its slowest shard. At idle priority
    the producers decode in the cores' idle moments instead (measured on 2 cores, W1:
    epochs 1.76 s at normal priority, 1.45 s at nice 19, 1.36 s idle; train alone 1.05 s).
    """
    if not hasattr(os, "sched_setscheduler"):
        return False
    tid = threading.get_native_id() if tid is None else tid
    try:
        if priority == "idle":
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        else:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, tid, 19 if priority == "low" else 0)
    except OSError:  # not permitted here
        return False
    return True


class PipelineError(RuntimeError):
    """A producer thread failed; ``__cause__`` is the original exception and traceback."""


@dataclass
class Batch:
    """One batch, ready for ``train_on_batch``.

    ``x``, ``y`` and ``sample_weight`` follow the structure of the source's names. With
    recycled buffers (the default in ``train``) the arrays are valid until the next batch
    is requested: copy what you keep.
    """

    epoch: int
    index: int
    size: int
    x: object
    y: object
    sample_weight: object
    arrays: dict[str, np.ndarray]
    read_s: float  # time a worker spent reading, decoding and assembling it
    read_bytes: int  # bytes fetched from the files for it (compressed size on the fast path)
    wait_s: float = 0.0  # time the consumer waited for it
    _buffers: dict | None = field(default=None, repr=False)  # back to the pool when done

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


class BufferPool:
    """Batch buffers, and the permits that bound how many batches are in flight.

    With ``recycle`` the buffers of a released batch are reused (no allocation, no page
    faults in the hot path); without it each batch gets fresh arrays, but the number in
    flight is bounded all the same.
    """

    def __init__(self, fields, batch_size: int, capacity: int, recycle: bool = True):
        self.fields, self.batch_size, self.recycle = fields, batch_size, recycle
        self._free: list[dict[str, np.ndarray]] = []
        self._permits = threading.Semaphore(capacity)

    def acquire(self, stop: threading.Event, timeout: float | None = None) -> dict[str, np.ndarray] | None:
        """A free buffer, waiting up to ``timeout`` seconds (None: as long as it takes);
        None when the time is up or once ``stop`` is set."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
            if self._permits.acquire(timeout=max(0.0, left)):
                break
            if stop.is_set() or (deadline is not None and time.monotonic() >= deadline):
                return None
        try:
            return self._free.pop()
        except IndexError:
            return {name: np.empty((self.batch_size, *f.row_shape), f.dtype) for name, f in self.fields.items()}

    def release(self, buffers: dict[str, np.ndarray] | None) -> None:
        if buffers is not None and self.recycle:
            self._free.append(buffers)
        self._permits.release()


@dataclass
class _Entry:
    """A block in the cache: decoded once, shared by the batches that use it."""

    remaining: int
    ready: threading.Event = field(default_factory=threading.Event)
    arrays: dict[str, np.ndarray] | None = None
    fetched: int = 0  # bytes read from the file, until its first user counts them
    ahead_s: float = 0.0  # seconds spent decoding it ahead of any batch, likewise
    error: BaseException | None = None


class BlockCache:
    """Decoded blocks shared between the batches that read them; dropped after their
    last planned use."""

    def __init__(self, source: H5Source, blocks):
        self.source, self.blocks = source, blocks
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, int], _Entry] = {}

    def claim(self, epoch: int, block: int, uses: int) -> _Entry | None:
        """A new entry for the block, which the caller must :meth:`fill`; None when the
        block is already decoded or being decoded."""
        entry, new = self._entry(epoch, block, uses)
        return entry if new else None

    def _entry(self, epoch: int, block: int, uses: int) -> tuple[_Entry, bool]:
        with self._lock:
            entry = self._entries.get((epoch, block))
            if entry is not None:
                return entry, False
            entry = self._entries[epoch, block] = _Entry(remaining=uses)
            return entry, True

    def fill(self, block: int, entry: _Entry, ahead: bool = False) -> None:
        """Decode the block into a claimed entry (an error is kept for its users).
        ``ahead``: decoded before any batch asked, so its time is not in a batch's yet."""
        t0 = time.perf_counter()
        try:
            entry.arrays, entry.fetched = self.source.read(*self.blocks.span(block))
        except BaseException as e:
            entry.error = e
        finally:
            if ahead:
                entry.ahead_s = time.perf_counter() - t0
            entry.ready.set()

    def get(
        self, epoch: int, block: int, uses: int, stop: threading.Event, wait: bool = True
    ) -> tuple[dict[str, np.ndarray], int, float] | None:
        """The block's arrays, decoding them if no one has; with the bytes fetched for
        it and the seconds spent decoding it ahead (both counted for its first user
        only). Without ``wait``, None while another thread is decoding it."""
        entry, new = self._entry(epoch, block, uses)
        waited = False
        if new:
            self.fill(block, entry)
        elif not wait and not entry.ready.is_set():
            return None
        else:
            waited = not entry.ready.is_set()
            while not entry.ready.wait(POLL_S):
                if stop.is_set():
                    raise _Stopped
        if entry.error is not None:
            raise entry.error
        with self._lock:
            fetched, seconds = entry.fetched, entry.ahead_s
            entry.fetched, entry.ahead_s = 0, 0.0
        # Time spent waiting for a block decoded ahead is in the caller's own time already.
        return entry.arrays, fetched, 0.0 if waited else seconds

    def done(self, epoch: int, block: int) -> None:
        """One planned user of the block has copied its rows."""
        key = (epoch, block)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.remaining -= 1
                if entry.remaining <= 0:
                    del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


class _Stopped(Exception):
    """The pipeline is closing; a worker leaves quietly."""


@dataclass
class _Failure:
    plan: BatchPlan | None
    error: BaseException


class Prefetcher(Iterator[Batch]):
    """Deliver the batches of ``plans`` (in order) built by ``workers`` threads.

    Args:
        source: the :class:`~pipetrain.source.H5Source` to read.
        plans: batch plans, in delivery order (they may span epochs).
        blocks: the plan's block table (``plan.blocks``).
        batch_size: the largest batch (buffers are this size; a partial batch is a view).
        workers: producer threads. Defaults to 2.
        max_queue: batches in flight (being built or waiting). Defaults to 8.
        max_queue_bytes: bytes in flight; lowers ``max_queue`` for large batches.
            Defaults to None (no limit beyond ``max_queue``).
        recycle: reuse the buffers of a batch once the next one is requested. Defaults
            to True.
        priority: CPU priority of the producer threads: ``"idle"`` (they run only when
            a core is otherwise idle, so decoding never slows the training step that
            shares the cores), ``"low"`` (nice 19) or ``"normal"``. Defaults to "idle".
        lookahead: batches beyond those in flight whose cached blocks workers decode
            while every buffer is in use (for a shuffle window: one window's batches,
            so the next window's blocks are ready when its first batch is due; they
            cost one more window of memory). Defaults to 0.

    Example::

        with Prefetcher(source, plan.batches(0), plan.blocks, 256) as batches:
            for batch in batches:
                model.train_on_batch(batch.x, batch.y)
    """

    def __init__(
        self,
        source: H5Source,
        plans: Iterable[BatchPlan],
        blocks,
        batch_size: int,
        *,
        workers: int = 2,
        max_queue: int = 8,
        max_queue_bytes: int | None = None,
        recycle: bool = True,
        priority: str = "idle",
        lookahead: int = 0,
        name: str = "pipetrain",
    ):
        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        if max_queue < 1:
            raise ValueError(f"max_queue={max_queue} must be >= 1")
        if priority not in PRIORITIES:
            raise ValueError(f"priority={priority!r}: expected one of {', '.join(PRIORITIES)}")
        self.source, self.priority = source, priority
        self._tids: list[int] = []  # the producers' thread ids, to raise their priority
        self._priority_lock = threading.Lock()
        if max_queue_bytes is not None:
            batch_bytes = batch_size * sum(f.row_bytes for f in source.fields.values())
            max_queue = max(1, min(max_queue, max_queue_bytes // max(1, batch_bytes)))
        # One buffer more than max_queue: the one the consumer holds.
        self.pool = BufferPool(source.fields, batch_size, max_queue + 1, recycle)
        self.max_queue = max_queue
        self.cache = BlockCache(source, blocks)
        self._plans = enumerate(_Announced(plans, source, blocks))
        self.lookahead = lookahead
        self._ahead: collections.deque = collections.deque()  # (seq, plan) taken from _plans, not issued
        self._pending: collections.deque = collections.deque()  # (seq, epoch, part) to decode ahead
        self._peeked_all = False
        self._dispatch = threading.Lock()  # take a buffer and the next plan, in that order
        self._done = threading.Condition()
        self._results: dict[int, Batch | _Failure] = {}
        self._issued = 0  # plans handed to workers so far
        self._total: int | None = None  # number of plans, once the iterator is exhausted
        self._next = 0
        self._held: Batch | None = None
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-producer-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # -- producer side ------------------------------------------------------------

    def _take(self) -> tuple[int, BatchPlan, dict[str, np.ndarray]] | None:
        """A buffer and the next plan; None when the stream is done or closing.

        Buffers are taken before plans and plans are issued in order, so the earliest
        undelivered batch always gets a buffer: no deadlock when the pool is dry. While
        every buffer is in use, the worker decodes blocks for batches further ahead."""
        while True:
            if self._stop.is_set() or self._total is not None:
                return None
            buffers = self.pool.acquire(self._stop, timeout=0)
            if buffers is None:
                if self._read_ahead():
                    continue
                # Wait for a buffer, looking again for read-ahead work now and then (the
                # look-ahead moves on when another worker takes the next batch).
                buffers = self.pool.acquire(self._stop, timeout=POLL_S)
                if buffers is None:
                    continue
            with self._dispatch:
                if self._stop.is_set() or self._total is not None:
                    self.pool.release(buffers)
                    return None
                try:
                    seq, plan = self._ahead.popleft() if self._ahead else next(self._plans)
                    if isinstance(plan, BaseException):
                        raise plan
                except StopIteration:
                    self.pool.release(buffers)
                    with self._done:
                        self._total = self._issued
                        self._done.notify_all()
                    return None
                except BaseException as e:  # the plan itself failed: deliver that in its place
                    self.pool.release(buffers)
                    with self._done:
                        self._results[self._issued] = _Failure(None, e)
                        self._total = self._issued + 1
                        self._done.notify_all()
                    return None
                self._issued = seq + 1
                return seq, plan, buffers

    def _read_ahead(self) -> bool:
        """Decode one block that a batch not started yet (within ``lookahead``) will
        read; False when there is none. This is how a shuffle window's blocks are ready
        before its first batch, which reads them all, is due."""
        if not self.lookahead:
            return False
        with self._dispatch:
            while True:
                while not self._pending:
                    if self._peeked_all or len(self._ahead) >= self.lookahead:
                        return False
                    self._peek()
                seq, epoch, part = self._pending.popleft()
                if seq < self._issued:
                    continue  # its batch has started: the builder decodes what it needs
                # Claimed while its batch is not issued, so the entry is certain to be used.
                entry = self.cache.claim(epoch, part.block, part.uses)
                if entry is not None:
                    break
        self.cache.fill(part.block, entry, ahead=True)
        return True

    def _peek(self) -> None:
        """Take the next plan from the iterator into the look-ahead (under _dispatch)."""
        try:
            seq, plan = next(self._plans)
        except StopIteration:
            self._peeked_all = True
            return
        except BaseException as e:  # delivered when its turn comes
            self._ahead.append((self._issued + len(self._ahead), e))
            self._peeked_all = True
            return
        self._ahead.append((seq, plan))
        self._pending.extend((seq, plan.epoch, part) for part in plan.parts if not self._direct(part))

    def _direct(self, part) -> bool:
        """A whole block that no other batch needs: decoded straight into the batch's
        buffer, no cache and no copy."""
        rows = int(self.cache.blocks.rows[part.block])
        return part.uses == 1 and isinstance(part.src, slice) and part.src == slice(0, rows)

    def _work(self) -> None:
        with self._priority_lock:  # not between raise_priority's reading and its setting
            self._tids.append(threading.get_native_id())
            if self.priority != "normal":
                set_priority(self.priority)
        while not self._stop.is_set():
            taken = self._take()
            if taken is None:
                return
            seq, plan, buffers = taken
            try:
                result: Batch | _Failure = self._build(plan, buffers)
            except _Stopped:
                self.pool.release(buffers)
                return
            except BaseException as e:
                self.pool.release(buffers)
                result = _Failure(plan, e)
            with self._done:
                self._results[seq] = result
                self._done.notify_all()

    def _build(self, plan: BatchPlan, buffers: dict[str, np.ndarray]) -> Batch:
        t0 = time.perf_counter()
        fetched = 0
        out = {name: buf[: plan.size] for name, buf in buffers.items()}
        blocks = self.cache.blocks
        ahead_s = 0.0
        shared = []
        for part in plan.parts:
            if self._direct(part):
                _, n = self.source.read(*blocks.span(part.block), out={name: dest[part.dst] for name, dest in out.items()})
                fetched += n
                continue
            shared.append(part)
        # Blocks shared with other batches go through the cache. Blocks another worker is
        # decoding are left for later, so that the workers decode a shuffle window's
        # blocks side by side instead of queueing behind one another.
        while shared:
            later = []
            for part in shared:
                got = self.cache.get(plan.epoch, part.block, part.uses, self._stop, wait=False)
                if got is None:
                    later.append(part)
                    continue
                fetched, ahead_s = fetched + got[1], ahead_s + got[2]
                self._copy(plan.epoch, part, got[0], out)
            if later and len(later) == len(shared):  # all being decoded elsewhere: wait for one
                part = later.pop(0)
                arrays, n, seconds = self.cache.get(plan.epoch, part.block, part.uses, self._stop)
                fetched, ahead_s = fetched + n, ahead_s + seconds
                self._copy(plan.epoch, part, arrays, out)
            shared = later
        x, y, w = self.source.arrange(out)
        read_s = time.perf_counter() - t0 + ahead_s
        return Batch(plan.epoch, plan.index, plan.size, x, y, w, out, read_s, fetched, _buffers=buffers)

    def _copy(self, epoch: int, part, arrays: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
        """Copy a part's rows from a cached block into the batch, then release the block."""
        try:
            for name, dest in out.items():
                if isinstance(part.src, slice):
                    dest[part.dst] = arrays[name][part.src]
                else:
                    np.take(arrays[name], part.src, axis=0, out=dest[part.dst])
        finally:
            self.cache.done(epoch, part.block)

    # -- consumer side ------------------------------------------------------------

    def __next__(self) -> Batch:
        self._release_held()
        t0 = time.perf_counter()
        with self._done:
            while self._next not in self._results:
                if self._total is not None and self._next >= self._total:
                    raise StopIteration
                if self._stop.is_set():
                    raise StopIteration
                self._done.wait(POLL_S)
            result = self._results.pop(self._next)
        self._next += 1
        if isinstance(result, _Failure):
            self.close()
            where = f" (epoch {result.plan.epoch}, batch {result.plan.index})" if result.plan else ""
            raise PipelineError(f"a producer thread failed{where}: {result.error}") from result.error
        result.wait_s = time.perf_counter() - t0
        if result.wait_s > STARVED_S and self.priority != "normal":
            # Other processes keep the cores busy, so idle-time producers hardly run:
            # give them a normal share rather than let training crawl.
            self.raise_priority()
        self._held = result
        return result

    def raise_priority(self) -> None:
        """Put the producers at normal priority for the rest of the stream."""
        with self._priority_lock:
            for tid in self._tids:
                set_priority("normal", tid)
            self.priority = "normal"

    def _release_held(self) -> None:
        if self._held is not None:
            self.pool.release(self._held._buffers)
            self._held = None

    def close(self, timeout: float = 10.0) -> None:
        """Stop and join every worker; drop what was prefetched."""
        self._stop.set()
        drop = getattr(self.source, "drop_hints", None)
        if drop is not None:
            drop()
        with self._done:
            self._done.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        with self._done:
            self._results.clear()
        self._held = None

    @property
    def alive_workers(self) -> int:
        return sum(t.is_alive() for t in self._threads)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a fallback: close() is the way
        if not getattr(self, "_stop", threading.Event()).is_set() and hasattr(self, "_threads"):
            self._stop.set()


class _Announced(Iterator[BatchPlan]):
    """The plans, in order, each announced to the source before it is due.

    While the source welcomes hints (``source.will_need`` returns True: a remote source
    with room in its read-ahead budget), plans further on are taken from the stream and
    their blocks named to it, each block once per epoch; a local source says no at once,
    and then no plan is taken early. An error of the stream is kept for its turn."""

    MAX_AHEAD = 4096  # plans held ahead at most

    def __init__(self, plans: Iterable[BatchPlan], source, blocks):
        self._plans = iter(plans)
        self._hint = getattr(source, "will_need", None)
        self._blocks = blocks
        self._ahead: collections.deque = collections.deque()
        self._named: set[tuple[int, int]] = set()
        self._epoch: int | None = None
        self._ended = False

    def __next__(self) -> BatchPlan:
        self._announce()
        if not self._ahead:
            raise StopIteration
        plan = self._ahead.popleft()
        if isinstance(plan, BaseException):
            raise plan
        return plan

    def _announce(self) -> None:
        wants = True
        while wants and not self._ended and len(self._ahead) < self.MAX_AHEAD:
            try:
                plan = next(self._plans)
            except StopIteration:
                self._ended = True
                return
            except BaseException as e:  # delivered in its place
                self._ahead.append(e)
                self._ended = True
                return
            self._ahead.append(plan)
            wants = self._hint is not None and self._name(plan)

    def _name(self, plan: BatchPlan) -> bool:
        """Name the plan's blocks not named yet; whether the source wants more."""
        if plan.epoch != self._epoch:
            self._named = {key for key in self._named if key[0] >= plan.epoch - 1}
            self._epoch = plan.epoch
        wants = True
        for part in plan.parts:
            key = (plan.epoch, part.block)
            if key not in self._named:
                self._named.add(key)
                wants = bool(self._hint(*self._blocks.span(part.block)))
        return wants


def plans_from(plan, epoch: int, start: int = 0, epochs: int | None = None) -> Iterator[BatchPlan]:
    """The batch plans of ``epoch`` from ``start`` on, then of the following epochs (up
    to ``epochs``, or forever): one stream, so that workers prefetch across the epoch
    boundary while the consumer validates."""
    stop = epochs if epochs is not None else None
    for e in itertools.count(epoch):
        if stop is not None and e >= stop:
            return
        yield from plan.batches(e, start if e == epoch else 0)
