"""A history's index: where its lines other than batch lines are, so that a reader that
wants only those (``tail``'s first look, ``read_history`` of epochs or system samples)
reads them, not the whole file.

A long history is almost all batch lines: 2,000,000 of them (450 MB) hold about 10,000
other lines (run, epoch, system, end). :class:`IndexWriter`, kept by the history's
writer, appends where each other line is to ``<history>.index`` (``history.jsonl.index``
in a run folder); nothing is written to it for a batch line. :func:`read` gives a reader
those lines, each checked against the history's bytes, and the offset up to which they
are all there is: the reader scans only what comes after it (the batch lines since the
last other line, and anything appended by hand).

The index is binary, little-endian. A 32-byte header: ``PTINDEX1``, the history's inode
(u64), how many of its first bytes were hashed (u32) and their BLAKE2b-64 digest. Then
24-byte entries: offset (u64), length (u32), CRC-32 of the line (u32), mtime_ns (i64).
An entry of length 0 is a *seal* (no line: its offset is where the file ended; in the
CRC's place, 1 when the writer closed the file). Each entry says: the line at ``offset``
is whole (a newline before and after it) with that CRC, and every line between the
previous entry and it begins as a batch line written by the writer (or is empty); its
mtime_ns, when not 0, is the history's mtime when the file ended with it.

A reader trusts the longest run of entries that check out and scans the rest. So the
index is ignored (the reader scans as if there were none) when it is missing, not a
file, unreadable, written for another file (inode or first bytes differ); a torn last
entry, an entry whose line differs (a line inserted, removed or changed by hand moves or
changes the bytes at the offsets that follow), or one beyond the file's end ends the
run of entries there. A history whose size or mtime is not what its writer sealed when
it closed it, or that ends where an entry says but with another mtime, was changed by
something other than its writer: the whole index is ignored. What no check sees is an
edit that keeps every byte's position in a history whose writer did not close it (a
run killed, or still running) and that has grown since the last line the index lists (a
batch line's ``"batch"`` changed to ``"epoch"`` in place): a history is written by its
run, and an editor writes a new file (a new inode).

The writer's own bytes are never at risk: an index that cannot be written (a folder in
the way, no permission, a full disk) is left as it is, true for what it covers, with one
warning, and the run goes on without it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from pipetrain import scan

SUFFIX = ".index"
MAGIC = b"PTINDEX1"
HEAD_BYTES = 4096  # the history's first bytes that the header hashes
_HEADER = struct.Struct("<8sQI8s4x")
_ENTRY = struct.Struct("<QIIq")
CLOSED = 1  # a seal's flag (in the CRC's place): written when the writer closed the history


def path_for(history: str | os.PathLike) -> Path:
    """The index of a history: ``runs/a/history.jsonl`` -> ``runs/a/history.jsonl.index``."""
    history = Path(history)
    return history.with_name(history.name + SUFFIX)


@dataclass
class Known:
    """What a valid index says of a history: ``lines`` (offset, bytes without the newline)
    in file order, and ``covered``, the offset (after a newline) before which every line
    not among them begins as a batch line or is empty."""

    lines: list[tuple[int, bytes]] = field(default_factory=list)
    covered: int = 0
    entries: int = 0  # how many entries checked out (seals included)
    sealed: tuple[int, int] = (0, 0)  # (end, mtime_ns) of the last of them


def _head_digest(fd: int, length: int) -> bytes:
    return hashlib.blake2b(os.pread(fd, length, 0), digest_size=8).digest()


def _read_index(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read(fd: int, path: str | os.PathLike | None, stop: int | None = None) -> Known:
    """The lines the index at ``path`` lists for the history open as ``fd``, up to
    ``stop`` (default: the file's end), each checked against the file; ``Known()`` (the
    reader scans from 0) when there is no valid index. Never raises for the index."""
    if path is None:
        return Known()
    try:
        raw = _read_index(Path(path))
        info = os.fstat(fd)
        if len(raw) < _HEADER.size:
            return Known()
        magic, inode, head_len, digest = _HEADER.unpack_from(raw)
        if magic != MAGIC or inode != info.st_ino or head_len > info.st_size or _head_digest(fd, head_len) != digest:
            return Known()
        return _check(fd, raw, info, info.st_size if stop is None else min(stop, info.st_size))
    except (OSError, ValueError):
        return Known()


def _check(fd: int, raw: bytes, info: os.stat_result, stop: int) -> Known:
    """The entries that check out, in order, up to the first that does not."""
    known = Known()
    end = 0
    count = (len(raw) - _HEADER.size) // _ENTRY.size  # a torn last entry is left out
    entries = list(_ENTRY.iter_unpack(raw[_HEADER.size: _HEADER.size + count * _ENTRY.size]))
    if entries and entries[-1][1] == 0 and entries[-1][2] & CLOSED and \
            (entries[-1][0], entries[-1][3]) != (info.st_size, info.st_mtime_ns):
        return Known()  # the file changed after its writer closed it, and no writer wrote that
    for offset, length, crc, mtime in entries:
        after = offset + length + 1 if length else offset
        if offset < end or after > stop:
            break
        if length:
            start = offset - 1 if offset else 0
            data = os.pread(fd, after - start, start)
            line = data[1:-1] if offset else data[:-1]
            if (offset and data[:1] != b"\n") or data[-1:] != b"\n" or zlib.crc32(line) != crc:
                break
            known.lines.append((offset, line))
        elif offset and os.pread(fd, 1, offset - 1) != b"\n":
            break
        end = after
        known.entries += 1
        known.sealed = (after, mtime)
    known.covered = end
    sealed_end, sealed_mtime = known.sealed
    if sealed_mtime and sealed_end == info.st_size and info.st_mtime_ns != sealed_mtime:
        return Known()  # changed in place since the writer last wrote it
    return known


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
        self.on = stat.S_ISREG(os.fstat(fd).st_mode)  # a device as history (/dev/null): no index
        if self.on:
            self._guard(self._open)

    def _open(self) -> None:
        known = read(self._history, self.path, scan.line_end(self._history, os.fstat(self._history).st_size))
        if known.entries:
            os.truncate(self.path, _HEADER.size + known.entries * _ENTRY.size)  # a torn or stale tail goes
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            # A seal made at close is followed at once by one that is not: readers see a
            # writer at work (its lines may come before the next entry), not a closed file.
            self.covered, self._sealed = known.covered, (0, 0)

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
            self._fd, self.covered = -1, 0
        mtime = info.st_mtime_ns if stop == info.st_size else 0
        entries = [[offset, len(line), zlib.crc32(line), 0] for offset, line in _lines(self._history, self.covered, stop)]
        if closing and mtime:
            entries.append([stop, 0, CLOSED, mtime])
        elif entries and entries[-1][0] + entries[-1][1] + 1 == stop:
            entries[-1][3] = mtime
        elif stop > self.covered or (mtime and (stop, mtime) != self._sealed):
            entries.append([stop, 0, 0, mtime])
        if not entries:
            return
        data = b"".join(_ENTRY.pack(*e) for e in entries)
        if self._fd < 0:
            self._create(data, stop)
        elif os.write(self._fd, data) != len(data):
            raise OSError(errno.ENOSPC, "short write (disk full?)")
        self.covered, self._sealed = stop, (stop, mtime)

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
