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
- **No hand-over for a copy.** A batch that no worker has taken yet when the consumer
  asks for it, and that only copies rows out of blocks already decoded, is copied by
  the consumer itself: waiting would cost a thread switch both ways and a hand-over of
  the GIL, more than the copy (PyTorch's step keeps both cores busy, so idle-priority
  workers run only once the consumer waits). Workers sleep until half the buffers are
  free, then fill them in one go.
- **Ahead of time.** While every buffer is in use, workers decode the cached blocks of
  batches not started yet (``lookahead``), so the first batch of a shuffle window, which
  reads all of the window's blocks, does not make the consumer wait.
- **Told ahead.** Plans are announced to the source before they are due
  (:class:`_Announced`): a source reading objects in a bucket fetches their chunks
  while earlier batches train. The source hears row ranges, never batches.
- **Errors travel.** An exception in a worker is delivered in place of its batch, with
  the original traceback and the file, dataset and rows it was reading; one anywhere
  else in a worker (taking a buffer, reading ahead) ends the stream with that error
  after the batches already under way. A consumer waiting while no worker is alive gets
  an error, never a hang; its ``cancel`` check (a signal) ends any wait.
- **Clean close.** :meth:`Prefetcher.close` (also on error and ``KeyboardInterrupt``)
  stops and joins every worker; every wait has a timeout and checks the stop flag, so
  nothing hangs. The workers hold the Prefetcher only through a weak reference between
  two pieces of work, so one that is dropped without ``close`` is collected and its
  workers end.
- **Sized to the data.** Buffers hold ``min(batch_size, rows)`` rows; a batch that the
  machine cannot hold is a :class:`BatchMemoryError` naming the batch size and the bytes.
- **Priority.** Workers run at idle CPU priority by default and are raised to normal when
  the consumer spends a sustained share of its time waiting (:mod:`pipetrain.priority`).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import psutil

from pipetrain.errors import InputError
from pipetrain.plan import BatchPlan
from pipetrain.priority import PRIORITIES, WaitWindow, set_priority
from pipetrain.source import H5Source

__all__ = ["PRIORITIES", "Batch", "BatchMemoryError", "BufferPool", "Cancelled", "PipelineError", "Prefetcher",
           "plans_from", "set_priority"]

POLL_S = 0.1  # how often blocked waits look at the stop flag


class PipelineError(RuntimeError):
    """A producer thread failed; ``__cause__`` is the original exception and traceback."""


class Cancelled(Exception):
    """The consumer's ``cancel`` check asked to stop while it waited for a batch."""


class BatchMemoryError(InputError):
    """A batch buffer larger than this machine can allocate: bad settings, said in one line."""


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

    Each buffer holds ``rows`` rows of every field. With ``recycle`` the buffers of a
    released batch are reused (no allocation, no page faults in the hot path); without
    it each batch gets fresh arrays, but the number in flight is bounded all the same.
    ``batch_size`` (the size asked for, which ``rows`` may be below) names the setting
    when a buffer cannot be allocated.

    Producers that found no buffer free sleep in :meth:`wait` until ``wake_at`` buffers
    are free again (or :meth:`wake` is called), then fill them in one go: waking a thread
    and handing it the GIL for every batch cost more than building a small batch (about
    80 us of CPU a batch on PyTorch digits, taken from a step that holds the GIL).
    """

    def __init__(self, fields, rows: int, capacity: int, recycle: bool = True, batch_size: int | None = None):
        self.fields, self.rows, self.capacity, self.recycle = fields, rows, capacity, recycle
        self.batch_size = rows if batch_size is None else batch_size
        self.buffer_bytes = rows * sum(f.row_bytes for f in fields.values())
        self._memory = psutil.virtual_memory().total  # no buffer can be larger than this
        self._free: list[dict[str, np.ndarray]] = []
        self._allocated = 0
        self._available = capacity  # permits not taken
        self.wake_at = max(1, capacity // 2)
        lock = threading.Lock()
        self._room = threading.Condition(lock)  # wake_at buffers are free (producers wait for this)
        self._freed = threading.Condition(lock)  # a buffer is free (acquire waits for this)

    def prime(self) -> None:
        """Allocate one buffer now, in the calling thread: a batch too large for the
        machine is an error where the stream is made, not later in a worker."""
        self._free.append(self._allocate())

    def acquire(self, stop: threading.Event, timeout: float | None = None) -> dict[str, np.ndarray] | None:
        """A free buffer, waiting up to ``timeout`` seconds (None: as long as it takes);
        None when the time is up or once ``stop`` is set. Raises
        :class:`BatchMemoryError` (the permit given back) when a new buffer cannot be
        allocated."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._room:
            while not self._available:
                if stop.is_set() or (deadline is not None and time.monotonic() >= deadline):
                    return None
                self._freed.wait(POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic()))
            self._available -= 1
            if self._free:
                return self._free.pop()
        try:
            return self._allocate()
        except BaseException:
            self.release(None)
            raise

    def _allocate(self) -> dict[str, np.ndarray]:
        try:
            if self.buffer_bytes > self._memory:
                raise MemoryError(f"{self.buffer_bytes} bytes: more than the machine's memory")
            buffers = {name: np.empty((self.rows, *f.row_shape), f.dtype) for name, f in self.fields.items()}
        except MemoryError as e:
            raise BatchMemoryError(self._too_large()) from e
        self._allocated += 1
        return buffers

    def _too_large(self) -> str:
        row_bytes = sum(f.row_bytes for f in self.fields.values())
        need = f"{_size(self.buffer_bytes)} ({self.rows} rows of {row_bytes:,} bytes)"
        total = _size(self._memory)
        if not self._allocated:
            return (f"batch_size={self.batch_size}: one batch needs {need}, more memory than this machine "
                    f"can allocate ({total} in all); use a smaller batch_size")
        return (f"batch_size={self.batch_size}: batch buffer {self._allocated + 1} of {self.capacity} needs "
                f"{need}, more memory than this machine can allocate now ({total} in all); use a smaller "
                "batch_size or max_queue")

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for ``wake_at`` buffers to be free (or for
        :meth:`wake`), without taking one."""
        with self._room:
            if self._available < self.wake_at:
                self._room.wait(timeout)

    def wake(self) -> None:
        """Wake the waiting producers whatever the number of free buffers (the consumer
        waits for a batch)."""
        with self._room:
            self._room.notify_all()

    def release(self, buffers: dict[str, np.ndarray] | None) -> None:
        with self._room:
            if buffers is not None and self.recycle:
                self._free.append(buffers)
            self._available += 1
            self._freed.notify()
            if self._available == self.wake_at:
                self._room.notify_all()


def _size(nbytes: int) -> str:
    """Bytes for people: ``_size(3 * 2**30) == '3.0 GiB'``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes} bytes"


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

    def ready(self, epoch: int, block: int) -> bool:
        """Whether the block is decoded (without error) and waiting for its users."""
        entry = self._entries.get((epoch, block))
        return entry is not None and entry.ready.is_set() and entry.error is None

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


_AGAIN = object()  # a worker decoded a block ahead: it comes back for more
_WAIT = object()  # a worker found no buffer free: it waits for one, then comes back


@dataclass
class _Failure:
    plan: BatchPlan | None
    error: BaseException
    where: str | None = None  # what the worker was doing, when it was not building ``plan``


def _produce(ref: weakref.ref, pool: BufferPool, stop: threading.Event) -> None:
    """A producer thread. It holds its Prefetcher (through ``ref``) only while it works,
    not while it waits for a buffer, so a Prefetcher dropped without ``close`` (whose
    buffers are then all in use) is collected, and its threads end."""
    prefetcher = ref()
    if prefetcher is None:
        return
    try:
        prefetcher._started()
    except BaseException as e:
        prefetcher._fail(e, "starting")
        return
    del prefetcher
    while not stop.is_set():
        prefetcher = ref()
        if prefetcher is None:
            return
        outcome = prefetcher._step()
        del prefetcher
        if outcome is _WAIT:
            pool.wait(POLL_S)
        elif not outcome:
            return


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
        raise_when_starved: raise producers below normal priority to normal once the
            consumer has waited for over ``STARVED_SHARE`` of the last
            ``STARVED_WINDOW_S`` seconds (:mod:`pipetrain.priority`). Defaults to True.
        on_raised: called (in the consumer's thread) with ``{"was", "waited_s",
            "window_s"}`` when the producers were raised. Defaults to None.
        cancel: checked while the consumer waits for a batch; once it returns true,
            the wait ends with :class:`Cancelled` (the stream stays open: close it).
            Defaults to None.

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
        raise_when_starved: bool = True,
        on_raised: Callable[[dict], None] | None = None,
        cancel: Callable[[], object] | None = None,
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
        self.raise_when_starved, self.on_raised, self._cancel = raise_when_starved, on_raised, cancel
        self._waits = WaitWindow()
        # No batch is larger than the data: a batch_size beyond it must not size the buffers.
        rows = max(1, min(batch_size, int(blocks.rows.sum())))
        if max_queue_bytes is not None:
            batch_bytes = rows * sum(f.row_bytes for f in source.fields.values())
            max_queue = max(1, min(max_queue, max_queue_bytes // max(1, batch_bytes)))
        # One buffer more than max_queue: the one the consumer holds.
        self.pool = BufferPool(source.fields, rows, max_queue + 1, recycle, batch_size=batch_size)
        self.pool.prime()
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
            threading.Thread(target=_produce, args=(weakref.ref(self), self.pool, self._stop),
                             name=f"{name}-producer-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # -- producer side ------------------------------------------------------------

    def _take(self):
        """A buffer and the next plan, as (seq, plan, buffers); None when the stream is
        done or closing; ``_AGAIN`` after decoding a block ahead; ``_WAIT`` when no
        buffer is free (the worker waits for one a moment, then looks again for
        read-ahead work: the look-ahead moves on when another worker takes a batch).

        Buffers are taken before plans and plans are issued in order, so the earliest
        undelivered batch always gets a buffer: no deadlock when the pool is dry. While
        every buffer is in use, the worker decodes blocks for batches further ahead."""
        if self._stop.is_set() or self._total is not None:
            return None
        buffers = self.pool.acquire(self._stop, timeout=0)
        if buffers is None:
            return _AGAIN if self._read_ahead() else _WAIT
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
                self._end_with(_Failure(None, e))
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

    def _end_with(self, failure: _Failure) -> None:
        """End the stream with ``failure``, delivered after the batches already handed
        to workers (under ``_dispatch``, so that no plan is issued meanwhile)."""
        with self._done:
            if self._total is None:
                self._results[self._issued] = failure
                self._total = self._issued + 1
            self._done.notify_all()

    def _started(self) -> None:
        with self._priority_lock:  # not between raise_priority's reading and its setting
            self._tids.append(threading.get_native_id())
            if self.priority != "normal":
                set_priority(self.priority)

    def _step(self):
        """One piece of a worker's work: build the next batch or decode a block ahead
        (True), find no buffer free (``_WAIT``), or find the stream over (False).
        Nothing escapes: an error while building a batch is delivered in its place, one
        anywhere else ends the stream."""
        doing = "taking the next batch"
        try:
            taken = self._take()
            if taken is _AGAIN:
                return True
            if taken is _WAIT:
                return _WAIT
            if taken is None:
                return False
            seq, plan, buffers = taken
            doing = f"handing over epoch {plan.epoch + 1}, batch {plan.index + 1}"
            try:
                result: Batch | _Failure = self._build(plan, buffers)
            except _Stopped:
                self.pool.release(buffers)
                return False
            except BaseException as e:
                self.pool.release(buffers)
                result = _Failure(plan, e)
            with self._done:
                self._results[seq] = result
                self._done.notify_all()
            return True
        except _Stopped:
            return False
        except BaseException as e:
            self._fail(e, doing)
            return False

    def _fail(self, error: BaseException, doing: str) -> None:
        """A worker failed outside a batch: the stream ends with its error, naming the
        thread and what it was doing."""
        with self._dispatch:
            self._end_with(_Failure(None, error, f"{threading.current_thread().name}, {doing}"))

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
        while True:
            with self._done:
                result = self._results.pop(self._next, None)
                if result is None and self._ended():
                    raise StopIteration
            if result is None:
                result = self._build_here()
            if result is not None:
                break
            with self._done:
                if self._next in self._results or self._ended():  # came meanwhile: taken (or ended) above
                    continue
                # Workers deliver under this lock: if none is alive now, none will.
                alive = any(t.is_alive() for t in self._threads)
                if alive:
                    self.pool.wake()  # producers below the pool's wake_at mark start now
                    self._done.wait(POLL_S)
            if not alive:
                self.close()
                raise PipelineError(f"every producer thread has stopped, and batch {self._next} of the stream "
                                    "never came (were the threads killed?)")
            if self._cancel is not None and self._cancel():
                raise Cancelled(f"cancelled while waiting for batch {self._next} of the stream")
            self._check_starved(time.perf_counter(), waiting_since=t0)
        self._next += 1
        if isinstance(result, _Failure):
            self.close()
            where = (f" (epoch {result.plan.epoch + 1}, batch {result.plan.index + 1})" if result.plan  # from 1, as shown
                     else f" ({result.where})" if result.where else "")
            raise PipelineError(f"a producer thread failed{where}: {result.error}") from result.error
        now = time.perf_counter()
        result.wait_s = now - t0
        self._waits.add(t0, now)
        self._check_starved(now)
        self._held = result
        return result

    def _ended(self) -> bool:
        """(Under ``_done``) the stream is closed, or every batch is delivered."""
        return self._stop.is_set() or (self._total is not None and self._next >= self._total)

    def _build_here(self) -> Batch | _Failure | None:
        """The batch the consumer waits for, built in its own thread when no worker has
        taken it yet and it is only a copy out of blocks already decoded; else None.

        Where the step holds the GIL and the cores (PyTorch on CPU), idle-priority
        workers run only once the consumer waits: every batch then cost a wait, two
        thread switches and a hand-over of the GIL, more than the copy itself (digits:
        the consumer waited at 63% of its batches). Copying here costs the same copy and
        nothing else. Decoding stays with the workers."""
        with self._dispatch:
            if self._issued != self._next or self._stop.is_set() or self._total is not None:
                return None
            if not self._ahead:
                self._peek()
                if not self._ahead:
                    return None
            seq, plan = self._ahead[0]
            if isinstance(plan, BaseException) or not all(
                    not self._direct(part) and self.cache.ready(plan.epoch, part.block) for part in plan.parts):
                return None
            try:
                buffers = self.pool.acquire(self._stop, timeout=0)
            except Exception:  # no memory for a new buffer: a worker meets it too, and says so
                return None
            if buffers is None:
                return None
            self._ahead.popleft()
            self._issued = seq + 1
        try:
            return self._build(plan, buffers)
        except Exception as e:
            self.pool.release(buffers)
            return _Failure(plan, e)
        except BaseException as e:  # Ctrl-C while copying: it goes up; the batch is lost, and says so if asked again
            self.pool.release(buffers)
            with self._done:
                self._results[seq] = _Failure(plan, e)
            raise

    def _check_starved(self, now: float, waiting_since: float | None = None) -> None:
        """Other processes keep the cores so busy that idle-time producers hardly run:
        give them a normal share rather than let training crawl."""
        if self.priority == "normal" or not self.raise_when_starved:
            return
        if self._waits.starved(now, waiting_since):
            was, waited = self.priority, self._waits.waited(now, waiting_since)
            self.raise_priority()
            if self.on_raised is not None:
                self.on_raised({"was": was, "waited_s": round(waited, 3), "window_s": self._waits.window_s})

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
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()


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
