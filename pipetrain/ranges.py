"""Concurrent ranged GETs for the remote files of one source: many requests in flight,
adjacent ranges joined, retries with backoff, lengths checked, read-ahead in a byte budget.

Reads wait on the network, not the CPU, so many more requests are in flight
(``max_requests``) than there are decoding threads. Requests run as coroutines on the
event loop of the fsspec filesystem (its own I/O thread); callers get
``concurrent.futures.Future`` objects and wait on them, without the GIL held.

Read-ahead works by hints (the way ``posix_fadvise(WILLNEED)`` does for a disk): a reader
names byte ranges it will need (:meth:`Fetcher.will_need`); they are fetched while the
budget ``readahead_bytes`` allows, held until read (:meth:`Fetcher.read`), then
dropped. Ranges a read needs that no hint covered are fetched at once, all of the read's
ranges together. Memory stays bounded: the budget for hinted bytes, plus the ranges of
the reads in progress (one block per producer thread, as for local files).

Hints arrive a few chunks at a time. Those in the nearer half of the budget (in the
order they were named) are *due*; due hints are held back until ``coalesce_bytes`` of
them wait (or the read-ahead runs low), then each goes out joined with the hinted
ranges beside it in the file, due or not, in one request of up to ``coalesce_bytes``.
In file order that joins the next chunks; in a block-shuffled epoch, whose blocks come
in random order, the far half of the budget is a pool of hinted chunks from which a due
chunk's neighbours come along (the W1 file's shuffled epoch: 223 requests instead of
389 for its 782 chunks). Every byte fetched was hinted, so the budget still bounds
memory. Each request is retried on throttling and dropped connections
with exponential backoff and jitter, and its length is checked; what fails for good is
one :class:`~pipetrain.remote.RemoteReadError` naming the URL, the bytes and the cause.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import math
import numbers
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from pipetrain.remote import (
    Failed,
    ObjectChangedError,
    ObjectInfo,
    RemoteInputError,
    RemoteReadError,
    Store,
    classify,
    describe,
    settled,
    within,
)

MAX_GAP = 8 << 10  # bytes between two ranges that are still fetched in one request


@dataclass(frozen=True)
class FetchSettings:
    """How a source reads its remote files.

    Args:
        max_requests: ranged GETs in flight at once. Defaults to 32.
        coalesce_bytes: adjacent ranges are joined into one request up to this size.
            Defaults to 4 MiB.
        readahead_bytes: bytes fetched ahead of the reads (held or in flight).
            Defaults to 64 MiB.
        retries: further attempts of a request after a transient failure (throttling,
            5xx, dropped connection, time-out, short body). Defaults to 8.
        backoff_s: the wait before the first retry; it doubles each time (with jitter)
            up to ``max_backoff_s``. Defaults to 0.2 s and 5 s.
        timeout_s: seconds one request may take. Defaults to 60.
    """

    max_requests: int = 32
    coalesce_bytes: int = 4 << 20
    readahead_bytes: int = 64 << 20
    retries: int = 8
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    timeout_s: float = 60.0

    def __post_init__(self):
        # Checked here, not only in from_env: no request slot (max_requests=0) waited
        # forever, and a time-out of 0 or NaN failed every read as the network's fault.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _valid(f.name, value):
                raise RemoteInputError(f"fetch: {f.name}={value!r}: {_VALID[f.name]}")

    @classmethod
    def from_env(cls, text: str | None = None) -> FetchSettings:
        """The defaults, changed by ``$PIPETRAIN_FETCH`` (e.g. ``"retries=3
        max_requests=64"``): how the command line tunes them."""
        text = os.environ.get("PIPETRAIN_FETCH", "") if text is None else text
        values = {}
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        for item in text.replace(",", " ").split():
            name, _, value = item.partition("=")
            try:
                number = float(value) if kinds.get(name) in ("float", float) else int(value)
                if name not in kinds or not _valid(name, number):
                    raise ValueError
            except ValueError:
                raise RemoteInputError(
                    f"PIPETRAIN_FETCH: {item!r} is not NAME=NUMBER with NAME one of {', '.join(kinds)}"
                ) from None
            values[name] = number
        return cls(**values)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt`` (from 0): doubling, with jitter."""
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * _JITTER.uniform(0.5, 1.0)


# Not the global random: a retry would move the user's random state (which a checkpoint
# holds: a resume without that retry would draw otherwise), and processes seeded alike
# would retry in step.
_JITTER = random.Random()


_VALID = {
    "max_requests": "expected a whole number >= 1",
    "coalesce_bytes": "expected a whole number >= 0",
    "readahead_bytes": "expected a whole number >= 0",
    "retries": "expected a whole number >= 0",
    "backoff_s": "expected a number of seconds >= 0",
    "max_backoff_s": "expected a number of seconds >= 0",
    "timeout_s": "expected a number of seconds above 0",
}


def _valid(name: str, value) -> bool:
    """Whether ``value`` is a usable FetchSettings ``name`` (NaN never is)."""
    if name in ("backoff_s", "max_backoff_s", "timeout_s"):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            return False
        return value > 0 if name == "timeout_s" else value >= 0
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return False
    return value >= (1 if name == "max_requests" else 0)


class _Request:
    """One GET of bytes [start, stop) of an object, shared by the ranges it covers."""

    __slots__ = ("future", "start")

    def __init__(self, future: concurrent.futures.Future, start: int):
        self.future, self.start = future, start


@dataclass
class _Hint:
    """A hinted range: waiting for a request, or in flight / fetched and not read yet."""

    obj: ObjectInfo
    store: Store
    start: int
    size: int
    wanted: int = 1  # reads that will take it (a chunk two blocks share is hinted twice)
    request: _Request | None = None


@dataclass
class Stats:
    requests: int = 0
    bytes: int = 0
    retries: int = 0
    hinted_hits: int = 0
    demand: int = 0
    seconds: float = 0.0
    errors: dict = field(default_factory=dict)


class Fetcher:
    """Ranged reads for the remote files of one source. Thread-safe."""

    def __init__(self, settings: FetchSettings | None = None):
        self.settings = settings or FetchSettings.from_env()
        self.stats = Stats()
        self._lock = threading.Lock()
        self._hints: dict[tuple[str, int, int], _Hint] = {}  # in hint order
        self._held = 0  # bytes of hints waiting, in flight or fetched
        self._waiting = 0  # bytes of hints not requested yet
        self._semaphores: dict[int, asyncio.Semaphore] = {}
        self._futures: set[concurrent.futures.Future] = set()
        self._closed = False

    # -- reading ----------------------------------------------------------------------

    def read(self, obj: ObjectInfo, store: Store, ranges: Sequence[tuple[int, int]]) -> Iterator[memoryview]:
        """The bytes of each (start, size) range, in order; all are requested before the
        first is waited for. Raises RemoteReadError (or bad input: changed, missing)."""
        with self._lock:
            self._check_open()
            needed = {(obj.url, s, n) for s, n in ranges
                      if (obj.url, s, n) in self._hints and self._hints[obj.url, s, n].request is None}
            if needed:
                self._request_waiting(needed)
            handles: list[tuple[_Request, int] | None] = []
            missing = []
            for start, size in ranges:
                key = (obj.url, start, size)
                hint = self._hints.get(key)
                if hint is None:
                    handles.append(None)
                    missing.append((start, size))
                    continue
                self.stats.hinted_hits += 1
                handles.append((hint.request, start - hint.request.start))
                hint.wanted -= 1
                if hint.wanted <= 0:
                    del self._hints[key]
                    self._held -= size
            self.stats.demand += len(missing)
            placed = {}
            for group in _coalesce([(start, size) for start, size in missing], self.settings.coalesce_bytes):
                request = self._request(obj, store, group[0][0], group[-1][0] + group[-1][1])
                for start, size in group:
                    placed[start, size] = (request, start - request.start)
            handles = [h if h is not None else placed[r] for h, r in zip(handles, ranges, strict=True)]
            self._pump()
        return self._wait(obj, handles, ranges)

    def _wait(self, obj, handles, ranges) -> Iterator[memoryview]:
        for (request, offset), (start, size) in zip(handles, ranges, strict=True):
            try:
                data = request.future.result()
            except concurrent.futures.CancelledError:
                raise RemoteReadError(f"{obj.url}: bytes {start}-{start + size}: the reader was closed") from None
            if isinstance(data, Failed):  # (see settled)
                raise data.error
            yield memoryview(data)[offset : offset + size]

    # -- read-ahead -------------------------------------------------------------------

    def will_need(self, obj: ObjectInfo, store: Store, ranges: Sequence[tuple[int, int]]) -> bool:
        """Hint that these (start, size) ranges will be read; whether more hints are
        welcome (False once the read-ahead budget is full)."""
        settings = self.settings
        with self._lock:
            if self._closed:
                return False
            for start, size in ranges:
                key = (obj.url, start, size)
                hint = self._hints.get(key)
                if hint is not None:
                    hint.wanted += 1
                    continue
                self._hints[key] = _Hint(obj, store, start, size)
                self._held += size
                self._waiting += size
            self._pump()
            return self._held < settings.readahead_bytes

    def _pump(self) -> None:
        """Request the waiting hints that are due (the nearer half of the budget, in hint
        order) once enough of them wait to fill a joined request, or when little is left
        in flight ahead of the reads. Under the lock."""
        if not self._waiting:
            return
        settings = self.settings
        near = max(settings.coalesce_bytes, settings.readahead_bytes // 2)
        due, due_bytes, position = set(), 0, 0
        for key, hint in self._hints.items():
            if position >= near:
                break
            if hint.request is None:
                due.add(key)
                due_bytes += hint.size
            position += hint.size
        if not due:
            return
        ahead = self._held - self._waiting
        if due_bytes >= settings.coalesce_bytes or ahead < settings.coalesce_bytes:
            self._request_waiting(due, join=True)

    def drop_hints(self) -> None:
        """Forget every hint not read yet (the reader's plan ended or changed). Requests in
        flight finish and their bytes are dropped."""
        with self._lock:
            self._hints.clear()
            self._held = self._waiting = 0

    def _request_waiting(self, needed: set, join: bool = False) -> None:
        """Request the ``needed`` hinted ranges (those a read waits for, or those due).
        With ``join``, a request also takes the waiting hints beside its ranges in the
        file, however far ahead they are needed (they are inside the budget already):
        a shuffled epoch's blocks come in random order, and their neighbours are usually
        hinted long before they are due. Under the lock."""
        objects: dict[tuple[str, int], list[_Hint]] = {}
        for key, hint in self._hints.items():
            if hint.request is None and (join or key in needed):
                objects.setdefault((hint.obj.url, id(hint.store)), []).append(hint)
        for hints in objects.values():
            by_start = {(h.start, h.size): h for h in hints}
            url = hints[0].obj.url
            for group in _coalesce(sorted(by_start), self.settings.coalesce_bytes):
                if not any((url, *r) in needed for r in group):
                    continue  # nothing in it is due: it waits for more neighbours
                first = by_start[group[0]]
                request = self._request(first.obj, first.store, group[0][0], group[-1][0] + group[-1][1])
                for r in group:
                    by_start[r].request = request
                    self._waiting -= by_start[r].size

    # -- requests ---------------------------------------------------------------------

    def _request(self, obj: ObjectInfo, store: Store, start: int, stop: int) -> _Request:
        future = asyncio.run_coroutine_threadsafe(settled(self._get(obj, store, start, stop)), store.loop)
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        return _Request(future, start)

    async def _get(self, obj: ObjectInfo, store: Store, start: int, stop: int) -> bytes:
        """Bytes [start, stop) with retries: transient failures are tried again after
        an exponential backoff with jitter; the length is checked."""
        settings = self.settings
        semaphore = self._semaphore()
        t0 = time.monotonic()
        attempt = 0
        while True:
            try:
                async with semaphore:
                    data = await within(store.get(obj, start, stop), settings.timeout_s)
                if len(data) != stop - start:
                    raise _ShortRead(f"expected {stop - start} bytes, got {len(data)}")
                self.stats.requests += 1
                self.stats.bytes += len(data)
                self.stats.seconds += time.monotonic() - t0
                return data
            except asyncio.CancelledError:
                raise
            except RemoteInputError:
                raise
            except Exception as exc:
                kind = "transient" if isinstance(exc, _ShortRead) else classify(exc)
                name = type(exc).__name__
                self.stats.errors[name] = self.stats.errors.get(name, 0) + 1
                if kind == "transient" and attempt < settings.retries:
                    await asyncio.sleep(settings.backoff(attempt))
                    attempt += 1
                    self.stats.retries += 1
                    continue
                raise self._failure(obj, store, start, stop, exc, kind, attempt, time.monotonic() - t0) from exc

    def _failure(self, obj, store, start, stop, exc, kind, attempt, seconds) -> BaseException:
        where = f"{obj.url}: bytes {start}-{stop}"
        if kind == "changed" or (kind == "missing" and obj.version):
            return ObjectChangedError(
                f"{obj.url}: the object changed while it was read (version {obj.version} no longer "
                f"matches: {describe(exc)}); pipetrain does not mix two versions of a file"
            )
        if kind == "missing":
            return RemoteInputError(f"{where}: the object is gone ({describe(exc)})")
        if kind == "denied":
            return RemoteInputError(f"{where}: access denied ({describe(exc)})")
        tries = f" after {attempt + 1} attempts in {seconds:.1f} s" if attempt else ""
        return RemoteReadError(f"{where}: {describe(exc)}{tries}")

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        semaphore = self._semaphores.get(id(loop))
        if semaphore is None:
            semaphore = self._semaphores[id(loop)] = asyncio.Semaphore(self.settings.max_requests)
        return semaphore

    def _check_open(self) -> None:
        if self._closed:
            raise RemoteReadError("the remote reader is closed")

    def close(self) -> None:
        """Cancel every request; reads waiting on one raise RemoteReadError."""
        with self._lock:
            self._closed = True
            self._hints.clear()
            self._held = self._waiting = 0
            futures = list(self._futures)
        for future in futures:
            future.cancel()


class _ShortRead(OSError):
    pass


def _coalesce(ranges: Sequence[tuple[int, int]], limit: int) -> list[list[tuple[int, int]]]:
    """Sorted (start, size) ranges grouped into requests: a group spans adjacent ranges
    (gaps of at most MAX_GAP) and at most ``limit`` bytes (a larger range stays alone)."""
    groups: list[list[tuple[int, int]]] = []
    for start, size in sorted(ranges):
        if groups:
            group = groups[-1]
            first, end = group[0][0], group[-1][0] + group[-1][1]
            if 0 <= start - end <= MAX_GAP and start + size - first <= limit:
                group.append((start, size))
                continue
            if start < end and start + size <= end:  # inside the previous group (a repeat)
                group.append((start, size))
                continue
        groups.append([(start, size)])
    return groups


class RemoteBytes:
    """The bytes of one remote object, read through a source's :class:`Fetcher`
    (the byte source a :class:`~pipetrain.chunks.ChunkReader` reads chunks from)."""

    remote = True

    def __init__(self, obj: ObjectInfo, store: Store, fetcher: Fetcher, peek=None):
        self.obj, self.store, self.fetcher = obj, store, fetcher
        self.name = obj.url
        self.size = obj.size  # of the version opened: the chunk index must lie inside it
        self._peek = peek  # (offset, size) -> bytes already in memory (the file's open pages), or None

    def read(self, requests: Sequence[tuple[int, int, object]]) -> Iterator[memoryview]:
        """For (offset, size, buffer) requests, the bytes of each range in order (the
        buffer is not used: the bytes come as fetched)."""
        for offset, size, _ in requests:
            if offset < 0 or offset + size > self.obj.size:
                raise RemoteReadError(f"{self.name}: bytes {offset}-{offset + size} lie past the object's end "
                                      f"({self.obj.size} bytes)")
        if self._peek is not None:
            held = [self._peek(offset, size) for offset, size, _ in requests]
            if all(h is not None for h in held):
                return iter([memoryview(h) for h in held])
        return self.fetcher.read(self.obj, self.store, [(offset, size) for offset, size, _ in requests])

    def will_need(self, ranges: Sequence[tuple[int, int]]) -> bool:
        return self.fetcher.will_need(self.obj, self.store, ranges)

    def close(self) -> None:
        pass  # the fetcher belongs to the source
