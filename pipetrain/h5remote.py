"""HDF5 files in a bucket: h5py opens them through a file object whose metadata pages are
fetched once and kept on disk, keyed by the object's version.

h5py reads a file's metadata (superblock, object headers, the chunk index's B-tree
nodes) in small pieces, one after the other. Through :class:`RemoteFile` each piece is
served from 64 KiB pages fetched with ranged GETs; the pages read while the file is
opened are written to a metadata cache on disk (``~/.cache/pipetrain/hdf5-metadata`` or
``$PIPETRAIN_CACHE``), named by the URL and keyed by the object's version (ETag or
generation) and size. The next open of the same version, by a second run or by every
process of a distributed run on the machine, reads them from disk: no request but the
one that learns the version (none when a glob's listing gave it). A new version of the
object has another key, so a cache entry never serves bytes of another version.

Chunk bytes do not go through here: :mod:`pipetrain.ranges` fetches them in parallel.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

from pipetrain.ranges import Fetcher
from pipetrain.remote import ObjectInfo, Store

PAGE = 64 << 10  # bytes per metadata page
FIRST_PAGES = 4  # pages fetched by the first read: superblock, root group and headers are there
RECORD_LIMIT = 16 << 20  # at most this much of a file's open is kept in the cache
KEEP_PAGES = 2  # pages kept in memory once the file is open (h5py rarely reads more; many files stay small)
SIGNATURE = b"\x89HDF\r\n\x1a\n"
FORMAT = "pipetrain-hdf5-metadata-1"


def default_cache_dir() -> Path:
    root = os.environ.get("PIPETRAIN_CACHE")
    if root:
        return Path(root) / "hdf5-metadata"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pipetrain" / "hdf5-metadata"


class MetadataCache:
    """Pages of HDF5 files read while opening them, on disk, one file per object version.
    Entries are written atomically; an unreadable entry is ignored (and rewritten)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, obj: ObjectInfo) -> Path:
        name = hashlib.sha256(obj.url.encode()).hexdigest()[:24]
        version = hashlib.sha256(obj.key().encode()).hexdigest()[:16]
        return self.folder / f"{name}-{version}.pages"

    def load(self, obj: ObjectInfo) -> tuple[dict[int, bytes], dict]:
        """(pages, notes) kept for this version of the object; empty when none are (or
        when its version cannot tell one content from another: a file replaced by one of
        the same size was read through the old one's pages)."""
        if not obj.versioned:
            return {}, {}
        try:
            with open(self.path(obj), "rb") as f:
                header = json.loads(f.readline())
                if header.get("format") != FORMAT or header.get("key") != obj.key():
                    return {}, {}
                pages = {}
                digest = hashlib.sha256()
                for page, size in header["pages"]:
                    data = f.read(size)
                    if len(data) != size:
                        return {}, {}
                    digest.update(data)
                    pages[int(page)] = data
                if digest.hexdigest() != header.get("sha256"):  # damaged on disk: not to be trusted
                    return {}, {}
                return pages, header.get("notes") or {}
        except (OSError, ValueError, KeyError, TypeError):
            return {}, {}

    def save(self, obj: ObjectInfo, pages: dict[int, bytes], notes: dict) -> None:
        """Keep the pages (best effort: a cache that cannot be written is no error)."""
        if not obj.versioned:
            return
        digest = hashlib.sha256()
        for p in sorted(pages):
            digest.update(pages[p])
        header = {"format": FORMAT, "key": obj.key(), "url": obj.url, "sha256": digest.hexdigest(),
                  "pages": [[p, len(pages[p])] for p in sorted(pages)], "notes": notes}
        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(json.dumps(header).encode() + b"\n")
                    for p in sorted(pages):
                        f.write(pages[p])
                os.replace(tmp, self.path(obj))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise


class RemoteFile(io.RawIOBase):
    """A read-only file object over a remote object, for h5py: reads are served from
    pages, fetched with ranged GETs (missing pages of one read in one request each run).
    ``recorded`` holds the pages read since it was created (until :meth:`opened`)."""

    def __init__(self, obj: ObjectInfo, store: Store, fetcher: Fetcher, pages: dict[int, bytes] | None = None):
        super().__init__()
        self.obj, self.store, self.fetcher = obj, store, fetcher
        self.name = obj.url
        self._pos = 0
        self._pages: OrderedDict[int, bytes] = OrderedDict(sorted((pages or {}).items()))
        self.recorded: dict[int, bytes] | None = {}
        self.fetched_pages = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.obj.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.obj.size - self._pos))
        if n == 0:
            return 0
        done = 0
        for page, data in self._pages_for(self._pos, self._pos + n):
            lo = max(self._pos, page * PAGE)
            hi = min(self._pos + n, page * PAGE + len(data))
            view[done : done + hi - lo] = data[lo - page * PAGE : hi - page * PAGE]
            done += hi - lo
        self._pos += n
        return n

    def cached(self, offset: int, size: int) -> bytes | None:
        """While the file opens: bytes [offset, offset+size) if every page holding them is
        in memory, else None (always None once it is open: reads then go to the network,
        where every request names the version)."""
        first, last = offset // PAGE, (offset + size - 1) // PAGE
        if self.recorded is None or size <= 0 or any(p not in self._pages for p in range(first, last + 1)):
            return None
        joined = b"".join(self._pages[p] for p in range(first, last + 1))
        return joined[offset - first * PAGE : offset - first * PAGE + size]

    def read_at(self, offset: int, size: int) -> bytes:
        self.seek(offset)
        return self.read(size)

    def _pages_for(self, start: int, stop: int):
        wanted = list(range(start // PAGE, (stop - 1) // PAGE + 1))
        missing = [p for p in wanted if p not in self._pages]
        if missing:
            if missing[0] == 0:  # the first read of a file: its first pages hold most metadata
                last = min((self.obj.size - 1) // PAGE, FIRST_PAGES - 1)
                missing = sorted(set(missing) | set(range(last + 1)))
            self._fetch(missing)
        for p in wanted:
            data = self._pages[p]
            self._pages.move_to_end(p)
            if self.recorded is not None and sum(map(len, self.recorded.values())) < RECORD_LIMIT:
                self.recorded[p] = data
            yield p, data
        if self.recorded is None:
            while len(self._pages) > KEEP_PAGES:
                self._pages.popitem(last=False)

    def _fetch(self, pages: list[int]) -> None:
        """Fetch pages, runs of consecutive ones in one request each, all at once."""
        runs: list[list[int]] = []
        for p in pages:
            if runs and p == runs[-1][-1] + 1:
                runs[-1].append(p)
            else:
                runs.append([p])
        ranges = []
        for run in runs:
            start = run[0] * PAGE
            ranges.append((start, min(self.obj.size, (run[-1] + 1) * PAGE) - start))
        for run, data in zip(runs, self.fetcher.read(self.obj, self.store, ranges), strict=True):
            data = bytes(data)
            for i, p in enumerate(run):
                self._pages[p] = data[i * PAGE : (i + 1) * PAGE]
        self.fetched_pages += len(pages)

    def opened(self) -> dict[int, bytes]:
        """The file is open: stop recording; the pages read so far (for the cache)."""
        recorded, self.recorded = self.recorded or {}, None
        while len(self._pages) > KEEP_PAGES:
            self._pages.popitem(last=False)
        return recorded


def hdf5_offset(f: RemoteFile) -> int | None:
    """Where the HDF5 superblock starts (0, or after a user block of 512, 1024, 2048, ...
    bytes), or None when the object is not an HDF5 file."""
    offset = 0
    while offset + len(SIGNATURE) <= f.obj.size:
        if f.read_at(offset, len(SIGNATURE)) == SIGNATURE:
            return offset
        offset = 512 if offset == 0 else offset * 2
    return None


class RemoteH5:
    """An HDF5 file in a bucket, opened: ``file`` is h5py's File on a :class:`RemoteFile`
    (its metadata from the cache on disk when this version was opened before), and
    :meth:`chunk_bytes` gives the byte sources its chunk readers fetch from.

    Raises :class:`~pipetrain.remote.RemoteInputError` (missing, denied, not HDF5) or
    :class:`~pipetrain.remote.RemoteReadError` (the network failed for good)."""

    def __init__(self, url: str, storage_options: dict | None = None, metadata_cache=True,
                 fetcher: Fetcher | None = None, obj: ObjectInfo | None = None, first_pages=None):
        import h5py

        from pipetrain import remote
        from pipetrain.ranges import Fetcher as _Fetcher

        self.store = remote.store_for(url, storage_options)
        self._own_fetcher = fetcher is None
        self.fetcher = fetcher or _Fetcher()
        self.obj = obj or remote.stat(url, storage_options, self.fetcher.settings)
        self.cache = None
        if metadata_cache:
            self.cache = MetadataCache(default_cache_dir() if metadata_cache is True else metadata_cache)
        self._pages, notes = self.cache.load(self.obj) if self.cache is not None else ({}, {})
        if not self._pages and first_pages is not None:  # fetched with other files' (prefetch_first_pages)
            self._pages = first_pages.pages()
        self.verified = {name: dict(v) for name, v in (notes.get("datasets") or {}).items()}
        self._before = repr(sorted(self.verified.items()))
        self.fileobj = RemoteFile(self.obj, self.store, self.fetcher, self._pages)
        self.file = None
        try:
            if hdf5_offset(self.fileobj) is None:
                raise remote.RemoteInputError(f"{url}: not an HDF5 file ({self.obj.size} bytes, no HDF5 signature)")
            try:
                self.file = h5py.File(self.fileobj, "r")
            except (remote.RemoteInputError, remote.RemoteReadError):
                raise
            except OSError as e:
                raise remote.RemoteInputError(f"{url}: cannot be opened as HDF5 (truncated or corrupted?): {e}") from None
        except BaseException:
            self.close()
            raise

    def chunk_bytes(self):
        """A new byte source over the object, for one chunk reader."""
        from pipetrain.ranges import RemoteBytes

        return RemoteBytes(self.obj, self.store, self.fetcher, peek=self.fileobj.cached)

    def opened(self) -> None:
        """Everything needed is open: keep the metadata pages (and what the chunk readers
        verified, in ``verified``) for the next open of this version."""
        recorded = self.fileobj.opened()
        if self.cache is not None and (self.fileobj.fetched_pages or repr(sorted(self.verified.items())) != self._before):
            self.cache.save(self.obj, {**self._pages, **recorded}, {"datasets": self.verified})
        self._pages = {}

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(Exception):
                self.file.close()
        if self._own_fetcher:
            self.fetcher.close()


class FirstPages:
    """The first pages of an object, requested now and waited for when the file opens."""

    def __init__(self, obj: ObjectInfo, store: Store, fetcher: Fetcher):
        self._size = min(obj.size, FIRST_PAGES * PAGE)
        self._data = fetcher.read(obj, store, [(0, self._size)]) if self._size else iter(())

    def pages(self) -> dict[int, bytes]:
        try:
            data = bytes(next(self._data))
        except (StopIteration, OSError, ValueError):
            return {}  # the open fetches them again and reports what is wrong
        return {i: data[i * PAGE : (i + 1) * PAGE] for i in range(-(-len(data) // PAGE))}


def prefetch_first_pages(objs, store_for, fetcher: Fetcher, metadata_cache) -> dict[str, FirstPages]:
    """For many objects at once: request the first pages of each whose metadata is not
    in the cache, side by side (opening a file reads them one request after another)."""
    cache = None
    if metadata_cache:
        cache = MetadataCache(default_cache_dir() if metadata_cache is True else metadata_cache)
    out = {}
    for obj in objs:
        if cache is not None and cache.path(obj).exists():
            continue
        out[obj.url] = FirstPages(obj, store_for(obj.url), fetcher)
    return out
