"""The remote fetch path without a network: a store that serves an object's bytes from
memory (on fsspec's event loop, as the real stores do) and counts the requests. What
must hold: every byte as stored, the read-ahead budget, and few requests when the
hints come in a shuffled order."""

from __future__ import annotations

import asyncio

import numpy as np

from pipetrain.ranges import Fetcher, FetchSettings
from pipetrain.remote import ObjectInfo, Store


class MemoryStore(Store):
    """An object in memory; ``requests`` lists the (start, stop) of every GET."""

    def __init__(self, data: bytes):
        import fsspec.asyn

        self.data = data
        self.requests: list[tuple[int, int]] = []
        self._loop = fsspec.asyn.get_loop()
        super().__init__(None, "mem")

    @property
    def loop(self):
        return self._loop

    async def get(self, obj: ObjectInfo, start: int, stop: int) -> bytes:
        self.requests.append((start, stop))
        await asyncio.sleep(0)
        return self.data[start:stop]


def an_object(n: int = 64, size: int = 1000, seed: int = 0):
    data = np.random.default_rng(seed).integers(0, 256, n * size, dtype=np.uint8).tobytes()
    store = MemoryStore(data)
    return store, ObjectInfo("mem://bucket/a.h5", len(data), '"v1"'), [(i * size, size) for i in range(n)]


def test_ranges_hinted_in_a_shuffled_order_are_fetched_joined_with_their_hinted_neighbours():
    """A block shuffle names chunks in a random order, one block at a time: a request
    for a chunk that is due takes the hinted chunks beside it in the file along, so the
    whole object comes in far fewer requests than chunks, every byte as stored, and the
    bytes held never pass the budget."""
    store, obj, ranges = an_object(n=64, size=1000)
    order = np.random.default_rng(1).permutation(len(ranges))
    settings = FetchSettings(readahead_bytes=32_000, coalesce_bytes=8_000)
    fetcher = Fetcher(settings)
    try:
        hinted, held = 0, []
        for k, i in enumerate(order):
            # As the pipeline does: name blocks while the budget has room, then read the next.
            while hinted < len(order):
                hinted += 1
                if not fetcher.will_need(obj, store, [ranges[order[hinted - 1]]]):
                    break
            assert hinted > k
            held.append(fetcher._held)
            start, size = ranges[i]
            (data,) = fetcher.read(obj, store, [(start, size)])
            assert bytes(data) == store.data[start : start + size]
        assert fetcher.stats.hinted_hits == len(ranges) and fetcher.stats.demand == 0
        assert max(held) <= settings.readahead_bytes + 1000
        assert len(store.requests) <= len(ranges) // 2, len(store.requests)
    finally:
        fetcher.close()
