"""Read row ranges of a chunked HDF5 dataset from its raw chunks, past h5py's global lock.

h5py runs every HDF5 call under one process-wide lock, so threads reading compressed
data through h5py take turns (DESIGN.md, "Facts we measured"). This module reads the
dataset's chunk index once, with h5py, when the reader is opened; after that a read
touches neither h5py nor HDF5 (but for one check of each chunk, on its first read,
below):

1. each chunk's stored bytes come from the reader's *byte source*: positioned reads
   (``os.preadv``, which releases the GIL) on its own file descriptor for a local file
   (:class:`FileBytes`), or ranged GETs, all of a read's chunks in flight at once, for an
   object in a bucket (:class:`pipetrain.ranges.RemoteBytes`);
2. the filter pipeline is undone in the calling thread with decoders that release
   the GIL (libdeflate, ISA-L, zlib, lz4, zstd, blosc, ...) and numpy;
3. the decoded chunk lands in the output array with at most one copy (two with the
   shuffle filter), or none when a whole chunk decodes straight into the output.

Anything this path cannot reproduce byte for byte makes `open_chunk_reader` return a
one-line reason instead, and the caller falls back to h5py's own read.

A damaged file is never a quiet answer. The index is checked when the reader opens
(every chunk inside the dataset and the file, once, not overlapping another); the first
and last row-chunks are compared with h5py's read; and, for a file on disk, the first
read of each chunk asks HDF5's own lookup for it (``read_direct_chunk``, a search of the
index, not a decode) and compares the stored bytes, so that rows HDF5 would not find (a
damaged index node: h5py returns fill values there) or would read elsewhere are not read
from the wrong place either. Each of these raises :class:`DamagedChunk`, which names the
file, the dataset and the rows, as does a chunk that does not decode or that the file
holds only part of.

For an object in a bucket the lookup is not made: h5py would fetch each chunk a second
time, one request after another under its lock. What is read there is pinned to the
version whose index was checked (every ranged GET names it), the index checks run at
every open, and the edge-chunk comparison once per version (``verified``); what only the
lookup finds (an index whose search and walk disagree about a chunk between the edges)
goes unseen there.
"""

from __future__ import annotations

import contextlib
import operator
import os
import threading
from dataclasses import dataclass

import h5py
import numpy as np
from h5py._objects import phil as _phil  # h5py's lock around the HDF5 library

from pipetrain.codecs import FILTER_NAMES, Stage, fastest, stages, unshuffle_planes
from pipetrain.errors import InputError, located
from pipetrain.remote import RemoteReadError

__all__ = ["ChunkReader", "DamagedChunk", "FileBytes", "check_index", "open_chunk_reader", "read_path"]


class DamagedChunk(InputError):
    """Stored rows that cannot be read as the file describes them (a corrupt or truncated
    chunk, a damaged chunk index), said in one line naming the file, dataset and rows."""


class _ShortRead(OSError):
    """A byte source holds fewer bytes than a chunk's range asks for: the file ends
    inside the chunk (truncated after the reader opened). DamagedChunk to callers."""


# File drivers whose file is one ordinary file on disk, addressed as HDF5 addresses it.
_PLAIN_DRIVERS = ("sec2", "stdio")

# ------------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class _FeaturePart:
    """Where one column of chunks (fixed coordinates past the row axis) lands in a row."""

    dst: tuple[slice, ...]  # in the output row, past the row axis
    src: tuple[slice, ...]  # in the chunk, past the row axis: the part inside the dataset
    origin: tuple[int, ...]  # element offset of the chunk past the row axis


class _Scratch:
    """Per-thread buffers, so the hot path allocates nothing per chunk."""

    def __init__(self, stored: int, decoded: int):
        self.stored = np.empty(stored, np.uint8)
        self.decoded = np.empty(decoded, np.uint8)


class ChunkReader:
    """Reads row ranges of one chunked HDF5 dataset from raw chunks, in the calling thread.

    Open it with `open_chunk_reader`. `read` may be called from many threads at once:
    the reader holds no lock, and every thread gets its own scratch buffers.

    Example::

        reader = open_chunk_reader(h5py.File("train.h5")["images"])
        if isinstance(reader, str):
            print("falling back to h5py:", reader)
        else:
            batch, nbytes = reader.read(0, 256)
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    filters: tuple[str, ...]
    codec: str

    def __init__(
        self,
        *,
        filename: str,
        name: str,
        data,
        shape,
        dtype,
        chunks,
        stages: list[Stage | None],
        fillvalue,
        offsets: np.ndarray,
        sizes: np.ndarray,
        masks: np.ndarray,
        filters: tuple[str, ...],
        dsid=None,
    ):
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.chunks = tuple(int(n) for n in chunks)
        self.filters = filters
        self._filename = filename
        self._name = name
        self._data = data  # the byte source: FileBytes, or RemoteBytes for an object in a bucket
        self.stages = stages
        self._fill = np.asarray(fillvalue, dtype=self.dtype)
        # Chunk index by grid coordinate: row-chunk, then the column of chunks past it.
        rows = offsets.shape[0] if offsets.ndim else 0
        self._offsets = offsets.reshape(rows, -1)
        self._sizes = sizes.reshape(rows, -1)
        self._masks = masks.reshape(rows, -1)
        self._chunk_nbytes = int(np.prod(self.chunks)) * self.dtype.itemsize
        self._row_nbytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._parts = _feature_parts(self.shape, self.chunks)
        # A whole row-chunk is then one contiguous block of the output.
        self._rows_contiguous = self.chunks[1:] == self.shape[1:]
        self._max_stored = max(int(sizes.max()) if sizes.size else 0, self._chunk_nbytes)
        self._plans: dict[int, tuple[tuple[Stage, ...], int]] = {}
        self._local = threading.local()
        # HDF5's own lookup of each stored chunk, made on its first read (see the module
        # docstring); without a dataset to ask (an object in a bucket, tests), none is made.
        self._dsid = dsid
        self._checked = np.zeros(self._offsets.shape, bool) if dsid is not None else None
        self.codec = _describe(filters, [s for s in stages if s is not None], getattr(data, "remote", False))

    # -- public ---------------------------------------------------------------------

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """Rows [start, stop) (shape (stop-start, *shape[1:]), dtype) and the number of bytes fetched from the file.

        With `out` (C-contiguous, right shape and dtype), write into it and return it.
        Thread-safe: many threads call read() at once.
        """
        start, stop = operator.index(start), operator.index(stop)
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"{self._where()}: rows {start}:{stop} are outside 0:{self.shape[0]}")
        out = self._output(out, stop - start)
        if stop == start:
            return out, 0
        if self._data is None:
            raise ValueError(f"{self._where()}: the chunk reader is closed")
        flat = out.reshape(-1).view(np.uint8)
        scratch = self._scratch()
        tasks, requests = [], []
        for row_chunk, column, part in self._chunks(start, stop):
            offset = int(self._offsets[row_chunk, column])
            if offset < 0:  # never written: HDF5 reads the fill value
                out[self._dst(row_chunk, part, start, stop)] = self._fill
                continue
            size = int(self._sizes[row_chunk, column])
            direct = self._direct(row_chunk, start, stop, flat)
            stages, unshuffle = self._plan(int(self._masks[row_chunk, column]))
            raw = not stages and not unshuffle and direct is not None and size == self._chunk_nbytes
            tasks.append((row_chunk, column, part, direct, raw))
            requests.append((offset, size, direct if raw else scratch.stored[:size]))
        # All of the read's chunk ranges are named at once: a remote source fetches them
        # side by side; a local one reads each when its turn comes.
        chunks = self._data.read(requests)
        fetched = 0
        for (row_chunk, column, part, direct, raw), (_, size, _) in zip(tasks, requests, strict=True):
            try:
                data = next(chunks)
            except _ShortRead as exc:
                raise DamagedChunk(f"{self._where(row_chunk, column, start, stop)}: {exc}") from None
            except OSError as exc:  # the disk or the network failed: not the file's fault
                raise OSError(located(self._where(row_chunk, column, start, stop), exc, self._filename)) from exc
            self._lookup(row_chunk, column, data, start, stop)
            if raw:
                if data is not direct:  # fetched elsewhere (a remote source): one copy
                    direct[:] = np.frombuffer(data, np.uint8)
            else:
                self._place(row_chunk, column, part, start, stop, out, data, direct)
            fetched += size
        return out, fetched

    def index_digest(self) -> bytes:
        """A hash of the dataset's shape, dtype, chunking, filters and chunk index (where
        each chunk lies, its stored size and filter mask), from memory: a data file's
        fingerprint (:mod:`pipetrain.fingerprint`)."""
        from pipetrain.fingerprint import index_digest

        return index_digest(self.shape, self.dtype, self.chunks, self.filters,
                            self._offsets, self._sizes, self._masks)

    def will_need(self, start: int, stop: int) -> bool:
        """Hint that rows [start, stop) will be read soon (a remote source fetches their
        chunks ahead); whether the source welcomes more hints."""
        if self._data is None or not getattr(self._data, "remote", False):
            return False
        ranges = [(int(self._offsets[r, c]), int(self._sizes[r, c])) for r, c, _ in self._chunks(start, stop)
                  if self._offsets[r, c] >= 0]
        return self._data.will_need(ranges)

    def _chunks(self, start: int, stop: int):
        """(row chunk, column, part) of every chunk that holds rows [start, stop)."""
        rows_per_chunk = self.chunks[0]
        for row_chunk in range(start // rows_per_chunk, (stop - 1) // rows_per_chunk + 1):
            for column, part in enumerate(self._parts):
                yield row_chunk, column, part

    def _dst(self, row_chunk: int, part: _FeaturePart, start: int, stop: int) -> tuple:
        first = row_chunk * self.chunks[0]
        lo, hi = max(start, first), min(stop, first + self.chunks[0])
        return (slice(lo - start, hi - start),) + part.dst

    def _direct(self, row_chunk: int, start: int, stop: int, flat: np.ndarray) -> np.ndarray | None:
        """The run of the output a whole chunk fills, when it is one contiguous run."""
        first = row_chunk * self.chunks[0]
        if not (self._rows_contiguous and start <= first and first + self.chunks[0] <= stop):
            return None
        return flat[(first - start) * self._row_nbytes : (first + self.chunks[0] - start) * self._row_nbytes]

    def close(self) -> None:
        """Close the byte source. Call it once every read() has returned."""
        data, self._data = self._data, None
        if data is not None:
            data.close()

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # Only a fallback: owners call close().
        with contextlib.suppress(AttributeError, OSError):
            self.close()

    def __repr__(self) -> str:
        return (
            f"<ChunkReader {self._filename}:{self._name} shape={self.shape} "
            f"chunks={self.chunks} {self.codec}>"
        )

    # -- hot path -------------------------------------------------------------------

    def _place(
        self,
        row_chunk: int,
        column: int,
        part: _FeaturePart,
        start: int,
        stop: int,
        out: np.ndarray,
        data,
        direct: np.ndarray | None,
    ) -> None:
        """Decode one chunk's stored bytes and put the part that lies in rows [start, stop)
        into `out` (straight into it when the chunk is one contiguous run of it)."""
        first = row_chunk * self.chunks[0]
        stages, unshuffle = self._plan(int(self._masks[row_chunk, column]))
        scratch = self._scratch()
        whole = direct is not None
        for index, stage in enumerate(stages):
            last = index == len(stages) - 1
            dest = (direct if whole and not unshuffle else scratch.decoded) if last else None
            try:
                data = stage.decode(data, dest)
            except MemoryError:
                raise
            except Exception as exc:  # codecs raise their own types; name the chunk
                raise DamagedChunk(
                    f"{self._where(row_chunk, column, start, stop)}: "
                    f"{stage.name} via {stage.via}: {exc}"
                ) from exc
        decoded = memoryview(data).nbytes
        if decoded != self._chunk_nbytes:
            raise DamagedChunk(
                f"{self._where(row_chunk, column, start, stop)}: decoded {decoded} "
                f"bytes, expected {self._chunk_nbytes}"
            )
        if data is direct and direct is not None:
            return
        dst = self._dst(row_chunk, part, start, stop)
        lo = max(start, first)
        src = (slice(lo - first, lo - first + dst[0].stop - dst[0].start),) + part.src
        if unshuffle:
            planes = np.frombuffer(data, np.uint8).reshape((unshuffle,) + self.chunks)
            unshuffle_planes(planes[(slice(None),) + src], out[dst])
        else:
            out[dst] = np.frombuffer(data, self.dtype).reshape(self.chunks)[src]

    def _lookup(self, row_chunk: int, column: int, stored, start: int, stop: int) -> None:
        """Once per chunk: HDF5's own index search must find the same stored bytes (and
        filter mask) that the index walk gave us, else HDF5's read would differ."""
        if self._checked is None or self._checked[row_chunk, column]:
            return
        origin = (row_chunk * self.chunks[0],) + self._parts[column].origin
        if not self._dsid.valid:
            raise ValueError(f"{self._where()}: its HDF5 file was closed; keep it open while the reader reads")
        try:
            mask, expected = _raw_chunk(self._dsid, origin, int(self._sizes[row_chunk, column]), self._chunk_nbytes)
        except Exception as exc:  # h5py raises OSError, or others on a damaged index
            raise DamagedChunk(
                f"{self._where(row_chunk, column, start, stop)}: the chunk index is damaged "
                f"(HDF5's own lookup fails: {' '.join(str(exc).split())})"
            ) from None
        if int(mask) != int(self._masks[row_chunk, column]) or not np.array_equal(
            np.frombuffer(expected, np.uint8), np.frombuffer(stored, np.uint8)
        ):
            raise DamagedChunk(
                f"{self._where(row_chunk, column, start, stop)}: the chunk index is damaged "
                "(HDF5's own lookup finds other bytes than its index lists)"
            )
        self._checked[row_chunk, column] = True

    def _plan(self, mask: int) -> tuple[tuple[Stage, ...], int]:
        """Decode stages (in decode order) for a chunk's filter mask, and the unshuffle item size.

        A set bit i in the mask means filter i was skipped when the chunk was written.
        When the outermost applied filter is shuffle, it is undone while placing the
        chunk into the output, which saves a copy.
        """
        plan = self._plans.get(mask)
        if plan is None:
            applied = [s for i, s in enumerate(self.stages) if s is not None and not mask >> i & 1]
            unshuffle = 0
            if applied and applied[0].shuffle_itemsize:
                unshuffle = applied.pop(0).shuffle_itemsize
            plan = self._plans[mask] = (tuple(reversed(applied)), unshuffle)
        return plan

    def _scratch(self) -> _Scratch:
        try:
            return self._local.scratch
        except AttributeError:
            scratch = self._local.scratch = _Scratch(self._max_stored, self._chunk_nbytes)
            return scratch

    def _output(self, out: np.ndarray | None, rows: int) -> np.ndarray:
        shape = (rows,) + self.shape[1:]
        if out is None:
            return np.empty(shape, self.dtype)
        if out.shape != shape or out.dtype != self.dtype:
            raise ValueError(
                f"{self._where()}: out has shape {out.shape} and dtype {out.dtype}, "
                f"expected {shape} and {self.dtype}"
            )
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(f"{self._where()}: out must be a writeable C-contiguous array")
        return out

    def _where(
        self,
        row_chunk: int | None = None,
        column: int = 0,
        start: int | None = None,
        stop: int | None = None,
    ) -> str:
        """"file: dataset 'name' rows a-b" for messages: the rows of the chunk being read
        that were asked for (and the chunk's origin, when chunks split rows)."""
        where = f"{self._filename}: dataset '{self._name}'"
        if row_chunk is not None:
            origin = (row_chunk * self.chunks[0],) + self._parts[column].origin
            first = max(start, origin[0])
            last = min(stop, origin[0] + self.chunks[0])
            where += f" rows {first}-{last}" + (f" (chunk at {origin})" if len(self._parts) > 1 else "")
        return where


def _feature_parts(shape: tuple[int, ...], chunks: tuple[int, ...]) -> list[_FeaturePart]:
    """The columns of chunks past the row axis, in C order of their grid coordinates."""
    axes = []
    for size, chunk in zip(shape[1:], chunks[1:], strict=True):
        axes.append([(k, min(chunk, size - k)) for k in range(0, max(size, 1), chunk)])
    parts = []
    for coords in np.ndindex(*(len(a) for a in axes)):
        picked = [axes[d][i] for d, i in enumerate(coords)]
        parts.append(
            _FeaturePart(
                dst=tuple(slice(k, k + n) for k, n in picked),
                src=tuple(slice(0, n) for _, n in picked),
                origin=tuple(k for k, _ in picked),
            )
        )
    return parts


def _describe(filters: tuple[str, ...], stages: list[Stage], remote: bool = False) -> str:
    """One line for humans, e.g. 'raw chunks: shuffle+gzip via numpy + isal, threads scale'."""
    reads = "parallel ranged GETs" if remote else "positioned reads"
    if not stages:
        return f"raw chunks: unfiltered, {reads}, threads scale"
    via = " + ".join(dict.fromkeys(s.via for s in stages))
    return f"raw chunks: {'+'.join(filters)} via {via}{', ' + reads if remote else ''}, threads scale"


# --------------------------------------------------------------------------- opening


class FileBytes:
    """A local file's bytes, by positioned reads on its own descriptor (``os.preadv``,
    which releases the GIL): the byte source of a :class:`ChunkReader` on disk."""

    remote = False

    def __init__(self, filename: str):
        self.name = filename
        self._fd = os.open(filename, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    @property
    def size(self) -> int:
        """The file's size in bytes now (the chunk index must lie inside it)."""
        return os.fstat(self._fd).st_size

    def read(self, requests):
        """For (offset, size, buffer) requests, fill each buffer in turn and yield it."""
        for offset, size, into in requests:
            yield self._pread(into, offset, size)

    def _pread(self, into: np.ndarray, offset: int, size: int) -> np.ndarray:
        if self._fd < 0:
            raise OSError(f"{self.name}: the file is closed")
        view = memoryview(into).cast("B")[:size]
        done = 0
        while done < size:
            try:
                got = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as exc:
                raise OSError(exc.errno, f"read failed at byte {offset + done}: {exc.strerror}") from exc
            if got <= 0:
                raise _ShortRead(f"short read, {done} of {size} bytes at byte {offset} (file truncated?)")
            done += got
        return into

    def will_need(self, ranges) -> bool:
        return False

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self):  # only a fallback: the reader closes it
        with contextlib.suppress(AttributeError, OSError):
            self.close()


def open_chunk_reader(dset: h5py.Dataset, data=None, verified: dict | None = None) -> ChunkReader | str:
    """The fast reader for `dset`, or a one-line reason why pipetrain must fall back to h5py's own read.

    Reasons look like "contiguous layout", "filter fletcher32 is not supported",
    "file driver 'core'", "lzf needs imagecodecs (pip install imagecodecs)".

    `data` is the byte source of the chunks (default: the dataset's file on disk, read by
    :class:`FileBytes`; :class:`pipetrain.ranges.RemoteBytes` for an object in a bucket);
    the reader owns it and closes it. `verified` carries what an earlier open of the same
    version of the file found (address base, self-check passed), so that it need not be
    checked again; it is filled in when the reader is opened.
    """
    return _open_chunk_reader(dset, data=data, verified=verified)


def read_path(dset, data=None) -> str:
    """One line saying which path pipetrain will use for this dataset and why (for `pipetrain inspect`)."""
    try:
        reader = open_chunk_reader(dset, data)
    except DamagedChunk as exc:
        return f"damaged: {exc}"
    if isinstance(reader, str):
        return f"h5py read (threads take turns under h5py's lock): {reader}"
    with reader:
        return reader.codec


def _open_chunk_reader(
    dset: h5py.Dataset, prefer: dict[str, str] | None = None, data=None, verified: dict | None = None
) -> ChunkReader | str:
    """`open_chunk_reader`, with `prefer` forcing a decoder back end per filter
    (e.g. {"gzip": "zlib"}) for tests and benchmarks."""
    reason = _unsupported(dset, local=data is None)
    if reason is None and data is None:
        filename = dset.file.filename
        try:
            data = FileBytes(filename)
        except OSError as exc:
            reason = f"cannot open {filename} for raw reads: {exc.strerror}"
    if reason:
        return _closed(data, reason)
    try:
        return _open(dset, prefer, data, verified if verified is not None else {})
    except BaseException:
        data.close()
        raise


def _open(dset, prefer, data, verified: dict) -> ChunkReader | str:
    """The reader over byte source `data` (closed when a reason is returned), after the
    checks that make a damaged file a DamagedChunk rather than a quiet answer."""
    dcpl = dset.id.get_create_plist()
    dtype = dset.dtype
    chunks = tuple(dset.chunks)
    chunk_nbytes = int(np.prod(chunks)) * dtype.itemsize
    pipeline = stages(dcpl, dtype, chunk_nbytes, prefer or {})
    if isinstance(pipeline, str):
        return _closed(data, pipeline)
    filters = tuple(
        FILTER_NAMES.get(dcpl.get_filter(i)[0], "?") for i in range(dcpl.get_nfilters())
    )
    filename = data.name
    name = (dset.name or "(anonymous)").lstrip("/")
    offsets, sizes, masks, first = _walk_index(dset, filename, name)
    if first is not None:
        base = verified.get("base")
        if base is None:
            base = _address_base(dset, data, *first)
        if base is None:
            return _closed(data, "chunk addresses from HDF5 do not match the file (self-check)")
        offsets[offsets >= 0] += base
        verified["base"] = base
    real = sum(1 << i for i, stage in enumerate(pipeline) if stage is not None)
    _check_index(filename, name, tuple(dset.shape), chunks, offsets, sizes, masks, real, chunk_nbytes, data.size)
    if not prefer and not data.remote:  # (in a bucket, a chunk to time would cost a request)
        pipeline = fastest(pipeline, lambda: _first_stored(data, offsets, sizes, masks), chunk_nbytes,
                           (name, dtype.str, chunks))
    reader = ChunkReader(
        filename=filename,
        name=name,
        data=data,
        shape=dset.shape,
        dtype=dtype,
        chunks=chunks,
        stages=pipeline,
        fillvalue=_fill_value(dset),
        offsets=offsets,
        sizes=sizes,
        masks=masks,
        filters=filters,
        # A remote object's lookups would fetch every chunk twice (module docstring).
        dsid=None if data.remote else dset.id,
    )
    if not verified.get("checked"):
        _self_check(reader, dset, offsets)  # DamagedChunk when the edge chunks differ
        verified["checked"] = True
    return reader


def _first_stored(data, offsets: np.ndarray, sizes: np.ndarray, masks: np.ndarray) -> bytes | None:
    """The first chunk stored with every filter applied, as the file holds it (None: none is)."""
    whole = np.flatnonzero((offsets.ravel() >= 0) & (sizes.ravel() > 0) & (masks.ravel() == 0))
    if not whole.size:
        return None
    at = int(whole[0])
    size = int(sizes.ravel()[at])
    try:
        return next(iter(data.read([(int(offsets.ravel()[at]), size, np.empty(size, np.uint8))])))
    except OSError:
        return None  # (the reader's own read says what is wrong, in its words)


def _closed(data, reason: str) -> str:
    if data is not None:
        data.close()
    return reason


def check_index(dset, filename: str | None = None, file_size: int | None = None) -> None:
    """The structural checks of :func:`_check_index` for a chunked dataset that h5py
    reads (a filter the fast path does not undo): DamagedChunk naming the rows.
    ``filename`` and ``file_size`` name and size the file (a URL and the object's size
    for an object in a bucket); by default, the file h5py opened on disk."""
    if dset.chunks is None or dset.is_virtual or dset.id.get_create_plist().get_external_count():
        return
    filename = filename or dset.file.filename
    name = (dset.name or "(anonymous)").lstrip("/")
    offsets, sizes, masks, _ = _walk_index(dset, filename, name)
    base = int(dset.file.userblock_size) if h5py.version.hdf5_version_tuple < (1, 14, 4) else 0
    offsets[offsets >= 0] += base
    _check_index(
        filename, name, tuple(dset.shape), tuple(dset.chunks), offsets, sizes, masks,
        unfiltered_bits=(1 << dset.id.get_create_plist().get_nfilters()) - 1,
        chunk_nbytes=int(np.prod(dset.chunks)) * dset.dtype.itemsize,
        file_size=os.path.getsize(filename) if file_size is None else file_size,
    )


def _walk_index(dset, filename: str, name: str):
    """:func:`_chunk_index`, with a walk that fails (a damaged index node) said as
    DamagedChunk; a remote read that fails (the network, not the file) passes through."""
    try:
        return _chunk_index(dset)
    except (InputError, RemoteReadError):
        raise
    except Exception as exc:
        raise DamagedChunk(
            f"{filename}: dataset '{name}': the chunk index is damaged ({' '.join(str(exc).split())})"
        ) from None


def _check_index(
    filename: str, name: str, shape: tuple, chunks: tuple, offsets: np.ndarray, sizes: np.ndarray,
    masks: np.ndarray, unfiltered_bits: int | None, chunk_nbytes: int, file_size: int,
) -> None:
    """Every listed chunk lies inside the file and overlaps no other chunk; a chunk that
    no size-changing filter touched (``unfiltered_bits``: the mask bits of those filters,
    None to skip this check) holds a whole chunk. Else DamagedChunk naming its rows."""
    grid = offsets.shape
    offsets, sizes, masks = offsets.reshape(-1), sizes.reshape(-1).astype(np.int64), masks.reshape(-1)
    stored = np.flatnonzero(offsets >= 0)
    if not stored.size:
        return

    def rows(index: int) -> str:
        coords = np.unravel_index(int(index), grid)
        origin = tuple(int(c) * n for c, n in zip(coords, chunks, strict=True))
        first, last = origin[0], min(origin[0] + chunks[0], shape[0])
        return f"rows {first}-{last}" + (f" (chunk at {origin})" if len(shape) > 1 and any(origin[1:]) else "")

    def damaged(index: int, why: str) -> DamagedChunk:
        return DamagedChunk(f"{filename}: dataset '{name}' {rows(index)}: {why}")

    ends = offsets[stored] + sizes[stored]
    bad = stored[(sizes[stored] <= 0) | (ends > file_size)]
    if bad.size:
        i = int(bad[0])
        raise damaged(
            i,
            f"its chunk of {int(sizes[i])} bytes at byte {int(offsets[i])} lies outside the "
            f"file of {file_size} bytes (truncated or damaged)",
        )
    order = stored[np.argsort(offsets[stored], kind="stable")]
    overlap = np.flatnonzero(offsets[order][1:] < (offsets[order] + sizes[order])[:-1])
    if overlap.size:
        earlier, later = int(order[overlap[0]]), int(order[overlap[0] + 1])
        raise damaged(earlier, f"its chunk overlaps the chunk of {rows(later)} (damaged index)")
    if unfiltered_bits is None:
        return
    unfiltered = stored[masks[stored] & unfiltered_bits == unfiltered_bits]
    wrong = unfiltered[sizes[unfiltered] != chunk_nbytes]
    if wrong.size:
        i = int(wrong[0])
        raise damaged(
            i,
            f"its unfiltered chunk is stored as {int(sizes[i])} bytes, not {chunk_nbytes} (damaged index)",
        )


def _fill_value(dset):
    """What h5py's read returns for a chunk that was never written.

    HDF5 fills such rows with the fill value, unless the fill time is "never" or the
    fill value is undefined: then it leaves the buffer alone, and h5py's buffer is zeros.
    """
    dcpl = dset.id.get_create_plist()
    if (
        dcpl.get_fill_time() == h5py.h5d.FILL_TIME_NEVER
        or dcpl.fill_value_defined() == h5py.h5d.FILL_VALUE_UNDEFINED
    ):
        return 0
    return dset.fillvalue


def _unsupported(dset, local: bool = True) -> str | None:
    """Why the raw-chunk path cannot serve `dset` (storage, file, dtype), or None.
    `local`: its chunks are read from the file on disk h5py opened."""
    if not isinstance(dset, h5py.Dataset):
        return f"not an h5py dataset: {type(dset).__name__}"
    if local and not hasattr(os, "preadv"):
        return "no positioned reads (os.preadv) on this platform"
    f = dset.file
    if local and f.driver not in _PLAIN_DRIVERS:
        return f"file driver '{f.driver}'"
    if f.mode != "r":
        return "file open for writing (chunks may still sit in HDF5's cache)"
    if getattr(f, "swmr_mode", False):
        return "SWMR mode (the chunk index may change while we read)"
    if dset.is_virtual:
        return "virtual dataset"
    dcpl = dset.id.get_create_plist()
    if dcpl.get_external_count():
        return "external storage"
    layout = dcpl.get_layout()
    if layout == h5py.h5d.COMPACT:
        return "compact layout"
    if layout == h5py.h5d.CONTIGUOUS:
        return "contiguous layout"
    if layout != h5py.h5d.CHUNKED:
        return f"layout {layout}"
    dtype = dset.dtype
    if dtype.kind not in "biufc" or dtype.subdtype is not None or dtype.fields:
        return f"dtype {dtype} is not a plain number type"
    # Raw bytes equal h5py's result only if h5py reads the stored type without converting.
    if not h5py.h5t.py_create(dtype).equal(dset.id.get_type()):
        return f"stored type differs from numpy's {dtype} (h5py converts it)"
    return None


def _chunk_index(dset) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple | None]:
    """Offsets (-1 for never written), stored sizes and filter masks by chunk grid coordinate,
    and (origin, offset, size) of the first stored chunk, from one pass over HDF5's index."""
    dsid = dset.id
    shape, chunks = dset.shape, dset.chunks
    grid = tuple(-(-n // c) for n, c in zip(shape, chunks, strict=True))
    records: list = []
    # chunk_iter walks the index once; before HDF5 1.14 its origins were in chunk units.
    if hasattr(dsid, "chunk_iter") and h5py.version.hdf5_version_tuple >= (1, 14, 0):
        dsid.chunk_iter(records.append)
    else:
        records = [dsid.get_chunk_info(i) for i in range(dsid.get_num_chunks())]
    offsets = np.full(grid, -1, np.int64)
    sizes = np.zeros(grid, np.uint32)  # HDF5 chunks are < 4 GiB
    masks = np.zeros(grid, np.uint32)
    if not records:
        return offsets, sizes, masks, None
    origins = np.array([r.chunk_offset for r in records], np.int64).reshape(
        len(records), len(shape)
    )
    step = np.array(chunks, np.int64)
    inside = (origins >= 0) & (origins < np.array(shape, np.int64)) & (origins % step == 0)
    if not inside.all():
        bad = origins[int(np.flatnonzero(~inside.all(axis=1))[0])]
        raise ValueError(f"it lists a chunk at {tuple(int(v) for v in bad)}, outside the dataset's {shape}")
    where = tuple((origins // step).T)
    linear = np.ravel_multi_index(where, grid)
    if np.unique(linear).size != linear.size:
        raise ValueError("it lists a chunk twice")
    offsets[where] = [-1 if r.byte_offset is None else r.byte_offset for r in records]
    sizes[where] = [r.size for r in records]
    masks[where] = [r.filter_mask for r in records]
    first = records[0]
    return offsets, sizes, masks, (tuple(first.chunk_offset), first.byte_offset, first.size)


def _raw_chunk(dsid, origin, size: int, chunk_nbytes: int) -> tuple[int, np.ndarray]:
    """``dsid.read_direct_chunk(origin)``, into a buffer with room to spare.

    h5py sizes its buffer with H5Dget_chunk_storage_size and then lets H5Dread_chunk
    write what the index lookup says; on a damaged file the two can disagree (an
    unfiltered chunk whose key claims more bytes than a chunk holds), and HDF5 writes
    past h5py's buffer, crashing the process later (found by tests/fuzz_files.py).
    """
    room = np.empty(2 * max(size, chunk_nbytes) + 4096, np.uint8)
    with _phil:  # h5py leaves this call unlocked; HDF5 (not thread-safe) must see one caller
        mask, view = dsid.read_direct_chunk(origin, out=room)
    return mask, np.asarray(view)


def _address_base(dset, data, origin, offset: int, size: int) -> int | None:
    """What to add to HDF5's chunk addresses to get file offsets: 0 or the userblock size.

    HDF5 1.14.4 and later report addresses that already include the userblock; older
    versions reported them relative to it (HDFGroup/hdf5#3003). Decide by comparing one
    chunk's bytes with what HDF5 itself returns for it.
    """
    chunk_nbytes = int(np.prod(dset.chunks)) * dset.dtype.itemsize
    try:
        _mask, expected = _raw_chunk(dset.id, origin, size, chunk_nbytes)
    except (AttributeError, OSError, ValueError):
        return 0  # cannot compare; trust the address, the self-check follows
    for base in dict.fromkeys((0, int(dset.file.userblock_size))):
        try:
            got = next(iter(data.read([(offset + base, size, np.empty(size, np.uint8))])))
        except OSError:
            continue
        if bytes(memoryview(got).cast("B")) == expected.tobytes():
            return base
    return None


def _self_check(reader: ChunkReader, dset, offsets: np.ndarray) -> None:
    """Compare the first written row-chunk and the last row-chunk (edge chunks) with
    h5py's read; rows that read differently, or that HDF5 cannot read, are damaged."""
    rows, per_chunk = reader.shape[0], reader.chunks[0]
    if rows == 0:
        return
    written = np.flatnonzero((offsets.reshape(offsets.shape[0], -1) >= 0).any(axis=1))
    firsts = {int(written[0]) * per_chunk} if written.size else set()
    for first in sorted(firsts | {(rows - 1) // per_chunk * per_chunk}):
        last = min(first + per_chunk, rows)
        ours, _ = reader.read(first, last)  # DamagedChunk names the rows
        try:
            theirs = dset[first:last]
        except RemoteReadError:
            raise  # the network failed, not the file
        except OSError as exc:
            if not _filters_available(dset):
                continue  # h5py cannot decode it here (plugin not loaded): nothing to compare
            raise DamagedChunk(
                f"{reader._where()} rows {first}-{last}: HDF5 cannot read them "
                f"({' '.join(str(exc).split())})"
            ) from None
        if ours.dtype != theirs.dtype or ours.tobytes() != theirs.tobytes():
            raise DamagedChunk(
                f"{reader._where()} rows {first}-{last}: h5py's read of them differs from "
                "their stored chunk (damaged chunk or index)"
            )


def _filters_available(dset) -> bool:
    """Whether HDF5 itself has every filter of the dataset's pipeline."""
    dcpl = dset.id.get_create_plist()
    return all(h5py.h5z.filter_avail(dcpl.get_filter(i)[0]) for i in range(dcpl.get_nfilters()))
