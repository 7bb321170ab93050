"""A history's index: where its lines other than batch lines are, so that a reader that
wants only those (``tail``'s first look, ``read_history`` of epochs or system samples)
reads them, not the whole file.

A long history is almost all batch lines: 2,000,000 of them (450 MB) hold about 10,000
other lines (run, epoch, system, end), and most of those are system samples (one every
2 s: 43,000 in a day). :class:`IndexWriter`, kept by the history's writer, appends where
each other line is, and whether it is a sample that a reader may leave unread, to
``<history>.index`` (``history.jsonl.index`` in a run folder); nothing is written to it
for a batch line. :func:`read` gives a reader those lines, each checked against the
history's bytes, and the offset up to which they are all there is: the reader scans only
what comes after it (the batch lines since the last other line, and anything appended by
hand). A reader that needs only some of the samples (``tail``'s first look) leaves the
others unread.

The index is binary, little-endian. A 32-byte header: ``PTINDEX3``, the history's inode
(u64), how many of its first bytes were hashed (u32) and their BLAKE2b-64 digest. Then
32-byte entries: offset (u64), length (u32; its top bit set for a *sample*, a line a
reader may leave unread), CRC-32 of the line (u32), mtime_ns (i64), and the *chain*
(u64): the sum of a mix of each entry's fields and place, up to this one (:func:`chain`). A sample is a
system record or no record at all (a line that begins as the writer's system lines do
and holds no other ``"type"`` key nor escape: :func:`pipetrain.scan.is_sample`) that
is either not shown (of one of the other processes its segment's run record names, in
a distributed run) or says its process's peak RSS: a ``peak_rss_mb`` at least its
``rss_mb`` and the peak of every sample shown marked before it since its segment's run
record, so that the last one marked says the peak of them all. The writer decides it
from the line, wherever the line comes from (an older pipetrain's sample, without its
peak, or one edited by hand is not marked).
An entry of length 0 is a *seal* (no line: its offset is where the file ended; in the
CRC's place, 1 when the writer closed the file). Each entry says: the line at
``offset`` is whole (a newline before and after it) with that CRC, and every line
between the previous entry and it begins as a batch line written by the writer (or is
empty); its mtime_ns, when not 0, is the history's mtime when the file ended with it.
An older pipetrain's index is read as it was written: ``PTINDEX1`` (no entry marked) as
one whose entries are all to be read, ``PTINDEX2`` (24-byte entries, no chain) with its
marks; a writer that meets one (a resume) writes a new index in its place.

An entry that is read is checked: a reader reads every entry but the samples', the
samples it needs, and the last entry (a seal, usually). An entry that is not read is
trusted only before one that checks out: a line inserted or removed before that one
moves it, which its check catches. The first entry read that does not check out (a
line inserted, removed or changed by hand moves or changes the bytes at the offsets
that follow), a torn last entry, one beyond the file's end, or the first whose chain is
not the sum of the entries up to it (the index itself damaged: an entry dropped, moved
or changed, whose lines may all still check out) ends the entries trusted at the last
one before it that checks out, and the reader scans from there; entries out of order
are no writer's: the whole index is ignored. The index
is ignored (the reader scans as if there were none) when it is missing, not a file,
unreadable, written for another file (inode or first bytes differ). A history whose
size or mtime is not what its writer sealed when it closed it, or that ends where an
entry says but with another mtime, was changed by something other than its writer: the
whole index is ignored. What no check sees is an edit that keeps every byte's position,
in a history whose writer did not close it (a run killed, or still running) and that
has grown since the last line the index lists, of a line that is not read: a batch line
(its ``"batch"`` changed to ``"epoch"`` in place), or a system sample that the reader
leaves unread (its ``"rss_mb":512.5`` changed to ``"rss_mb":999.9``). A history is
written by its run, and an editor writes a new file (a new inode).

The writer's own bytes are never at risk: an index that cannot be written (a folder in
the way, no permission, a full disk) is left as it is, true for what it covers, with one
warning, and the run goes on without it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import stat
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipetrain import scan

SUFFIX = ".index"
MAGIC = b"PTINDEX3"
VERSIONS = {b"PTINDEX1": 1, b"PTINDEX2": 2, MAGIC: 3}  # (1: no entry marked a sample; 1 and 2: no chain)
HEAD_BYTES = 4096  # the history's first bytes that the header hashes
_HEADER = struct.Struct("<8sQI8s4x")
_FIELDS = [("offset", "<u8"), ("length", "<u4"), ("crc", "<u4"), ("mtime", "<i8")]
_ENTRIES = {1: np.dtype(_FIELDS), 2: np.dtype(_FIELDS), 3: np.dtype([*_FIELDS, ("chain", "<u8")])}
ENTRY_BYTES = _ENTRIES[3].itemsize
# The chain: each entry's mix of its fields and its place, summed over it and the entries
# before it (mod 2**64; odd multipliers, so every field and place moves it).
_MIX = [np.uint64(k) for k in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                               0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53)]
SAMPLE = 1 << 31  # in an entry's length (version 2 on): the line is a sample, one a reader may leave unread
CLOSED = 1  # a seal's flag (in the CRC's place): written when the writer closed the history


def chain(entries: np.ndarray, first: int = 0, before: int = 0) -> np.ndarray:
    """The chain value of each of ``entries`` (the index's entries ``first`` on, after
    one whose chain is ``before``): a dropped, moved or changed entry (a bit of a sample's
    mark included) changes its own and every later one."""
    k = _MIX
    with np.errstate(over="ignore"):
        place = np.arange(first + 1, first + 1 + len(entries), dtype=np.uint64)
        mixed = ((entries["offset"].astype(np.uint64) * k[0]) ^ (entries["length"].astype(np.uint64) * k[1])
                 ^ (entries["crc"].astype(np.uint64) * k[2]) ^ (entries["mtime"].astype(np.uint64) * k[3])
                 ^ (place * k[4])) * k[5]
        return np.cumsum(mixed, dtype=np.uint64) + np.uint64(before)


def path_for(history: str | os.PathLike) -> Path:
    """The index of a history: ``runs/a/history.jsonl`` -> ``runs/a/history.jsonl.index``."""
    history = Path(history)
    return history.with_name(history.name + SUFFIX)


@dataclass
class Known:
    """What a valid index says of a history: ``lines`` (offset, bytes without the newline)
    in file order, and ``covered``, the offset (after a newline) before which every line
    not among them begins as a batch line or is empty. Read with ``samples=False``, the
    system samples' lines are not among ``lines``: where they are is in ``samples``
    (offsets, in file order) and ``sample_lengths``, and :meth:`sample` reads one."""

    lines: list[tuple[int, bytes]] = field(default_factory=list)
    covered: int = 0
    entries: int = 0  # how many entries checked out (seals included)
    sealed: tuple[int, int] = (0, 0)  # (end, mtime_ns) of the last of them
    version: int = 0  # the index's format (0: no valid index)
    chain: int = 0  # the chain value of the last entry that checked out (format 3)
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sample_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    _listing: _Listing | None = field(default=None, repr=False, compare=False)
    _ids: np.ndarray | None = field(default=None, repr=False, compare=False)  # samples' entry numbers

    def sample(self, k: int) -> bytes | None:
        """The line of ``samples[k]``, checked against the file. None when it does not
        check out: then this Known is shortened, in place, to the entries before it that
        do (whatever was taken from it before is to be taken again)."""
        line = self._listing.line(int(self._ids[k]))
        if line is None:
            self.become(self._listing.known())
        return line

    def become(self, other: Known) -> None:
        """Say, in place, what ``other`` says (readers holding this Known see it)."""
        for name in ("lines", "covered", "entries", "sealed", "chain", "samples", "sample_lengths", "_ids"):
            setattr(self, name, getattr(other, name))


def _head_digest(fd: int, length: int) -> bytes:
    return hashlib.blake2b(os.pread(fd, length, 0), digest_size=8).digest()


def _read_index(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        chunks = [os.read(fd, _HEADER.size)]
        if chunks[0][:len(MAGIC)] not in VERSIONS:  # no index (zeros, another file): its header says so, not all of it
            return b""
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read(fd: int, path: str | os.PathLike | None, stop: int | None = None, *, samples: bool = True) -> Known:
    """The lines the index at ``path`` lists for the history open as ``fd``, up to
    ``stop`` (default: the file's end), each checked against the file; ``Known()`` (the
    reader scans from 0) when there is no valid index. ``samples=False``: the system
    samples' lines are left unread (:attr:`Known.samples`), each trusted only before a
    line that checks out. Never raises for the index."""
    if path is None:
        return Known()
    try:
        listing = _Listing.open(fd, Path(path), stop)
        if listing is None:
            return Known()
        if samples:
            listing.check_samples()
        return listing.known()
    except (OSError, ValueError):
        return Known()


class _Listing:
    """The entries of a valid index, checked as they are read. At once: each entry's
    place (after the one before it, within ``stop``), every entry but the samples'
    (the first that does not check out ends the listing before it), and the last one
    (entries that are not read are trusted only before one that checks out). A sample's
    line when it is asked for (:meth:`line`)."""

    def __init__(self, fd: int, entries: np.ndarray, version: int, info: os.stat_result, stop: int):
        self.fd, self.info, self.version = fd, info, version
        length = entries["length"].astype(np.int64)
        self.sample = (length & SAMPLE).astype(bool) if version >= 2 else np.zeros(len(entries), dtype=bool)
        self.length = length & (SAMPLE - 1) if version >= 2 else length
        self.crc = entries["crc"]
        self.mtime = entries["mtime"]
        offset = entries["offset"]
        placed = offset <= np.uint64(stop)  # (before adding to it: a garbled offset may be near 2**64)
        self.offset = np.where(placed, offset, 0).astype(np.int64)
        self.after = np.where(self.length > 0, self.offset + self.length + 1, self.offset)
        before = np.concatenate([np.zeros(1, dtype=np.int64), self.after[:-1]])
        bad = np.flatnonzero(~placed | (self.after > stop) | (self.offset < before))
        self.count = int(bad[0]) if len(bad) else len(entries)  # entries that may check out
        if self.count < len(entries) and placed[self.count] and self.offset[self.count] < before[self.count]:
            self.count = 0  # entries out of order: no writer wrote that (two swapped hide the line between)
        self.chain = entries["chain"] if version >= 3 else None
        if self.chain is not None:  # an entry dropped, moved or changed: those before it are the index's
            broken = np.flatnonzero(chain(entries[: self.count]) != self.chain[: self.count])
            self.count = int(broken[0]) if len(broken) else self.count
        self.lines: dict[int, bytes] = {}  # entry: its line, for the lines that checked out
        self.checked = np.zeros(len(entries), dtype=bool)
        for i in np.flatnonzero(~self.sample[: self.count]).tolist():
            if not self._check(i):
                self.count = i
                break
        self._settle()

    @classmethod
    def open(cls, fd: int, path: Path, stop: int | None) -> _Listing | None:
        raw = _read_index(path)
        info = os.fstat(fd)
        if len(raw) < _HEADER.size:
            return None
        magic, inode, head_len, digest = _HEADER.unpack_from(raw)
        if magic not in VERSIONS or inode != info.st_ino or head_len > info.st_size or \
                _head_digest(fd, head_len) != digest:
            return None
        dtype = _ENTRIES[VERSIONS[magic]]
        count = (len(raw) - _HEADER.size) // dtype.itemsize  # a torn last entry is left out
        entries = np.frombuffer(raw, dtype, count, _HEADER.size)
        if count and entries["length"][-1] == 0 and entries["crc"][-1] & CLOSED and \
                (int(entries["offset"][-1]), int(entries["mtime"][-1])) != (info.st_size, info.st_mtime_ns):
            return None  # the file changed after its writer closed it, and no writer wrote that
        stop = info.st_size if stop is None else min(stop, info.st_size)
        return cls(fd, entries, VERSIONS[magic], info, stop)

    def _check(self, i: int) -> bool:
        """Whether entry ``i`` checks out: its line whole at its offset with its CRC (a
        seal: a line ends where it says the file ended)."""
        offset, length = int(self.offset[i]), int(self.length[i])
        if length:
            start = offset - 1 if offset else 0
            data = os.pread(self.fd, offset + length + 1 - start, start)
            line = data[1:-1] if offset else data[:-1]
            if (offset and data[:1] != b"\n") or data[-1:] != b"\n" or zlib.crc32(line) != self.crc[i]:
                return False
            self.lines[i] = line
        elif offset and os.pread(self.fd, 1, offset - 1) != b"\n":
            return False
        self.checked[i] = True
        return True

    def _settle(self) -> None:
        """End the listing with an entry that checks out; none at all if the file was
        changed in place since its writer last wrote it."""
        while self.count and not self.checked[self.count - 1]:
            if not self._check(self.count - 1):
                self.count -= 1
        if self.count:
            end, mtime = int(self.after[self.count - 1]), int(self.mtime[self.count - 1])
            if mtime and end == self.info.st_size and self.info.st_mtime_ns != mtime:
                self.count = 0  # changed in place since the writer last wrote it

    def line(self, i: int) -> bytes | None:
        """Entry ``i``'s line, checked; None (and the listing ends before it) when it does not check out."""
        if i >= self.count:
            return None
        if not self.checked[i] and not self._check(i):
            self.count = i
            self._settle()
            return None
        return self.lines[i]

    def check_samples(self) -> None:
        for i in np.flatnonzero(self.sample[: self.count] & ~self.checked[: self.count]).tolist():
            if not self._check(i):
                self.count = i
                self._settle()
                return

    def known(self) -> Known:
        n = self.count
        lines = [(int(self.offset[i]), self.lines[i]) for i in sorted(self.lines) if i < n]
        ids = np.flatnonzero(self.sample[:n] & ~self.checked[:n])
        end = (int(self.after[n - 1]), int(self.mtime[n - 1])) if n else (0, 0)
        last = int(self.chain[n - 1]) if n and self.chain is not None else 0
        return Known(lines, end[0], n, end, self.version, last, self.offset[ids], self.length[ids], self, ids)


def _lines(fd: int, start: int, stop: int) -> list[tuple[int, bytes]]:
    """(offset, line) of each line in ``start..stop`` (complete lines) that a reader must
    parse: those that do not begin as a batch line, and those that do but hold bytes the
    writer's batch lines never hold (a second ``"type"``, a space, an escape); not empty ones."""
    out = []
    for block in scan.blocks(fd, start, stop):
        others = block.others()
        if not block.clean(others):
            starts = {a for a, _ in others}
            others = [(a, b) for a, b in block.lines() if a in starts or _suspect(block.data[a:b])]
        out += [(block.offset + a, block.data[a:b]) for a, b in others if b > a]
    return out


def _suspect(line: bytes) -> bool:
    return any(needle in line for needle in scan._NOT_IN_BATCH_LINES)


class IndexWriter:
    """Keeps the index of a history that ``fd`` (open for appending) writes.

    Made when the history is opened, before its writer cuts a torn last line (which
    changes the file's mtime): it keeps the entries that check out and drops the rest.
    :meth:`update` - after a line other than a batch line is written, after the torn
    line is cut, at close - lists the lines written since (found in the file itself, so
    lines another process appended are listed too) and seals. A history from an older
    pipetrain gets its index at its first resume."""

    def __init__(self, history: str | os.PathLike, fd: int):
        self.path = path_for(history)
        self._history = fd
        self._fd = -1
        self.covered = 0
        self._sealed = (0, 0)
        # Of the segment the lines listed next belong to: the highest peak of the samples
        # shown marked so far (None: not known, when it began before what this writer
        # saw) and how many processes its run record says it runs on.
        self._peak: float | None = -math.inf
        self._processes = 0
        self._entries, self._chain = 0, 0  # entries in the index, and the last one's chain value
        self.on = stat.S_ISREG(os.fstat(fd).st_mode)  # a device as history (/dev/null): no index
        if self.on:
            self._guard(self._open)

    def _open(self) -> None:
        known = read(self._history, self.path, scan.line_end(self._history, os.fstat(self._history).st_size))
        if known.entries and known.version == 3:  # (an older one, without marks or chain, is made anew)
            os.truncate(self.path, _HEADER.size + known.entries * ENTRY_BYTES)  # a torn or stale tail goes
            self._entries, self._chain = known.entries, known.chain
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            # A seal made at close is followed at once by one that is not: readers see a
            # writer at work (its lines may come before the next entry), not a closed file.
            self.covered, self._sealed, self._peak, self._processes = known.covered, (0, 0), None, 0

    def update(self, closing: bool = False) -> None:
        if self.on:
            self._guard(lambda: self._update(closing))

    def _update(self, closing: bool) -> None:
        info = os.fstat(self._history)
        stop = scan.line_end(self._history, info.st_size)
        if stop == 0:  # made when there is a first line: the header hashes the file's first bytes
            return
        if stop < self.covered:  # cut short by another hand while written: a new index
            os.close(self._fd)
            self._fd, self.covered, self._peak, self._processes = -1, 0, -math.inf, 0
        if self._fd < 0:
            self._entries, self._chain = 0, 0
        mtime = info.st_mtime_ns if stop == info.st_size else 0
        entries = [[offset, len(line), zlib.crc32(line), 0, self._unread_ok(line)]
                   for offset, line in _lines(self._history, self.covered, stop)]
        if any(e[1] >= SAMPLE for e in entries):  # never the writer's (one write moves less than 2 GiB)
            raise OSError(errno.EFBIG, "a line of 2 GiB or more")
        if closing and mtime:
            entries.append([stop, 0, CLOSED, mtime, False])
        elif entries and entries[-1][0] + entries[-1][1] + 1 == stop:
            entries[-1][3] = mtime
        elif stop > self.covered or (mtime and (stop, mtime) != self._sealed):
            entries.append([stop, 0, 0, mtime, False])
        if not entries:
            return
        rows = np.zeros(len(entries), dtype=_ENTRIES[3])
        for i, (offset, length, crc, mtime, sample) in enumerate(entries):
            rows[i] = (offset, length | (SAMPLE if sample else 0), crc, mtime, 0)
        rows["chain"] = chain(rows, self._entries, self._chain)
        data = rows.tobytes()
        if self._fd < 0:
            self._create(data, stop)
        elif os.write(self._fd, data) != len(data):
            raise OSError(errno.ENOSPC, "short write (disk full?)")
        self.covered, self._sealed = stop, (stop, mtime)
        self._entries, self._chain = self._entries + len(rows), int(rows["chain"][-1])

    def _unread_ok(self, line: bytes) -> bool:
        """Whether ``line``'s entry is marked a sample, one a reader may leave unread (see
        the module's docstring): a system sample of another of its segment's processes
        (not shown: a reader finds the latest of each from the end), or one shown whose
        ``peak_rss_mb`` is at least its ``rss_mb`` and the peak of every sample shown
        marked since the segment began - the last one marked says them all."""
        from pipetrain.history import is_number, is_shown, processes_of, well_formed  # (history imports this)

        record = scan.decode(line)
        if not scan.is_sample(line):
            if type(record) is dict and record.get("type") == "run" and well_formed(record):
                self._peak, self._processes = -math.inf, processes_of(record)  # a new segment: new processes
            return False
        if type(record) is not dict or not well_formed(record):
            return True  # no record at all
        if not is_shown(record):
            return 0 < int(record["process"]) < self._processes
        rss, peak = record.get("rss_mb"), record.get("peak_rss_mb")
        if self._peak is None or not is_number(peak) or not peak >= self._peak or (is_number(rss) and rss > peak):
            return False  # (an older pipetrain's sample, one edited by hand, or after what this writer saw)
        self._peak = peak
        return True

    def _create(self, entries: bytes, stop: int) -> None:
        """A new index (header and ``entries``), put in place at once: a reader sees the
        old one or the new one."""
        head = min(HEAD_BYTES, stop)
        data = _HEADER.pack(MAGIC, os.fstat(self._history).st_ino, head, _head_digest(self._history, head)) + entries
        fd, temp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write (disk full?)")
                os.fchmod(fd, 0o644)
            finally:
                os.close(fd)
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def _guard(self, step) -> None:
        try:
            step()
        except OSError as e:
            self.on = False
            self.close()
            warnings.warn(f"{self.path}: cannot keep the history's index ({e.strerror or e}); the history is "
                          "written on without it (readers scan the file instead)", RuntimeWarning, stacklevel=4)

    def close(self) -> None:
        """Seal (the file's size and mtime now) and close."""
        if self.on:
            self.update(closing=True)
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def remove(history: str | os.PathLike) -> None:
    """Remove a history's index (``overwrite`` removes the history)."""
    try:
        path_for(history).unlink()
    except FileNotFoundError:
        pass
