"""Finding records in a long history without parsing every line.

A long run's history is almost all batch lines: a 2,000,000-batch history (450 MB) holds
about 10,000 other lines (run, epoch, system, end). The writer begins every batch line
with the same bytes (``{"type":"batch",``), so the other lines are found at the speed of
a byte search, in blocks of a few MB read one after the other:

- :func:`blocks` reads a file (or a byte range of it) as blocks of complete lines;
- :meth:`Block.others` gives the lines of a block that do not begin as a batch line
  (each run, epoch, system and end record, and any line another tool or a person wrote);
- :meth:`Block.clean` tells whether the block's batch lines are surely batch records as
  far as a reader that skips them can tell: no second ``"type"`` key, no whitespace and
  no escape (``\\u0074ype``) in them. A block that is not clean is parsed line by line.

So a reader that wants the epochs parses 200 lines, not 2,000,000, and gets exactly what
parsing every line would give: every line it skips is a batch record or not a record at
all. :func:`loads` parses with orjson when it is installed (``pip install
"pipetrain[fast]"``), and gives exactly what :func:`json.loads` gives.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Iterator

import orjson  # 3-5x faster than json for a history's lines (the tests set it to None to read with json alone)

BLOCK_BYTES = 8 << 20
BATCH_PREFIX = b'{"type":"batch",'
SYSTEM_PREFIX = b'{"type":"system",'
_NOT_IN_BATCH_LINES = (b"\\", b" ", b"\t", b"\r", b',"type"')
_OTHER_LINE = re.compile(rb"\n(?!" + re.escape(BATCH_PREFIX) + rb")")
# orjson reads an integer beyond 64 bits as a float, where json keeps it an int. Such an
# integer has 19 digits or more in a row, which the writer never writes (a float has at
# most 17 significant digits): bytes with such a run are parsed by json.
_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS = b"0" * 19


# orjson parses up to 1,024 levels of nesting, json.loads as deep as Python's recursion
# limit lets it (about 1,000 less the caller's depth): a line that may nest deep enough to
# tell them apart, which takes _DEEP opening brackets, is parsed by json.
_DEEP = 256


def is_sample(line: bytes) -> bool:
    """Whether a line is surely a system record or no record at all: it begins as the
    writer's system lines do and holds no other ``"type"`` key (nor an escape that could
    spell one), so no reader can take it for a record of another type."""
    return line.startswith(SYSTEM_PREFIX) and line.count(b'"type"') == 1 and b"\\" not in line


def _long_digits(data: bytes) -> bool:
    return data.translate(_DIGITS).find(_LONG_DIGITS) >= 0


def _may_nest_deep(data: bytes, lines: int) -> bool:
    """Whether a line of ``data`` (``lines`` lines, each an object) may nest _DEEP deep."""
    return data.count(b"[") + data.count(b"{") - lines >= _DEEP


def _orjson_can(lines: list[bytes], data: bytes | None) -> list[bool]:
    """For each line, whether orjson parses it as json.loads would, as far as nesting goes."""
    if not _may_nest_deep(data if data is not None else b"".join(lines), len(lines)):
        return [True] * len(lines)
    return [not _may_nest_deep(line, 1) for line in lines]


def loads(line: bytes):
    """``json.loads(line)``, faster: orjson where it gives the same value, json where
    orjson refuses what json accepts (NaN, a byte-order mark, a lone surrogate) or may
    differ (integers beyond 64 bits). Raises ValueError (or RecursionError) as json does."""
    if orjson is not None and not _long_digits(line) and not _may_nest_deep(line, 1):
        try:
            return orjson.loads(line)
        except orjson.JSONDecodeError:
            pass
    return json.loads(line)


def loads_many(lines: list[bytes], data: bytes | None = None) -> list:
    """:func:`decode` of each line (``data``: the lines joined, if the caller has it)."""
    data = data if data is not None else b"".join(lines)
    if orjson is not None and not _long_digits(data) and all(_orjson_can(lines, data)):
        try:
            return list(map(orjson.loads, lines))
        except orjson.JSONDecodeError:
            pass
    return [decode(line) for line in lines]


def loads_wide(lines: list[bytes], data: bytes | None = None) -> list | None:
    """orjson's parse of each line, or None where orjson is missing, refuses one of them
    or may nest deeper than json (``data``: the lines joined, if the caller has it).
    Unlike :func:`loads_many` it does not look for integers beyond 64 bits, which
    orjson reads as floats of magnitude 2**63 or more: the caller checks its values
    (see :func:`pipetrain.reading.read_history`)."""
    if orjson is None or not all(_orjson_can(lines, data)):
        return None
    try:
        return list(map(orjson.loads, lines))
    except orjson.JSONDecodeError:
        return None


def decode(line: bytes):
    """:func:`loads`, or None for a line that is not JSON."""
    try:
        return loads(line)
    except (ValueError, RecursionError):
        return None


class Block:
    """Complete lines of a file: ``data[:end]`` begins at byte ``offset`` of the file and
    ends with a newline, except the final fragment of a file that does not end with one
    (``final``). (``data`` may go on after ``end``: a block is not copied to cut it.)"""

    __slots__ = ("offset", "data", "end", "final")

    def __init__(self, offset: int, data: bytes, end: int | None = None, final: bool = False):
        self.offset, self.data, self.final = offset, data, final
        self.end = len(data) if end is None else end

    def lines(self) -> list[tuple[int, int]]:
        """(start, end) of every line."""
        spans, at = [], 0
        for line in self.data[: self.end].split(b"\n")[: None if self.final else -1]:
            spans.append((at, at + len(line)))
            at += len(line) + 1
        return spans

    def others(self) -> list[tuple[int, int]]:
        """(start, end) in ``data`` of each line that does not begin as a batch line; end
        is the position of its newline (or of the block's end)."""
        data, stop = self.data, self.end
        starts = [m.end() for m in _OTHER_LINE.finditer(data, 0, stop)]
        if starts and starts[-1] >= stop:
            starts.pop()
        if stop and not data.startswith(BATCH_PREFIX):
            starts.insert(0, 0)
        out = []
        for start in starts:
            end = data.find(b"\n", start, stop)
            out.append((start, stop if end < 0 else end))
        return out

    def clean(self, others: list[tuple[int, int]]) -> bool:
        """Whether every line that begins as a batch line is a batch record or no record
        at all, as far as a reader that skips it can tell: the writer's batch lines hold
        no ``,"type"`` (a second type key), no whitespace (a key spaced from its comma)
        and no backslash (an escape that spells ``type``). Such bytes inside the other
        lines are theirs."""
        data, stop = self.data, self.end
        starts = [s for s, _ in others]
        for needle in _NOT_IN_BATCH_LINES:
            found = data.find(needle, 0, stop)
            while found >= 0:
                i = bisect.bisect_right(starts, found) - 1
                if i < 0 or found >= others[i][1]:
                    return False
                found = data.find(needle, others[i][1], stop)
        return True

    def batch_runs(self, others: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """(start, end) of each run of consecutive batch lines (end after the newline)."""
        runs, at = [], 0
        for start, end in others:
            if start > at:
                runs.append((at, start))
            at = end + 1
        if at < self.end:
            runs.append((at, self.end))
        return runs


def blocks(fd: int, start: int = 0, stop: int | None = None, size: int | None = None) -> Iterator[Block]:
    """The bytes of an open file from ``start`` to ``stop`` (default: its end now) as
    blocks of complete lines, about ``size`` bytes each (default BLOCK_BYTES); a last
    line without its newline comes as a final block."""
    size = size or BLOCK_BYTES
    if stop is None:
        stop = os.fstat(fd).st_size
    at = start
    while at < stop:
        data = os.pread(fd, min(size, stop - at), at)
        if not data:
            break
        cut = data.rfind(b"\n") + 1
        while not cut and at + len(data) < stop:  # a line longer than a block
            more = os.pread(fd, min(size, stop - at - len(data)), at + len(data))
            if not more:
                break
            cut = (data + more).rfind(b"\n") + 1
            data += more
        if not cut:
            yield Block(at, data, final=True)
            return
        yield Block(at, data, cut)
        at += cut  # the partial line after the cut is read again with the next block


def line_end(fd: int, size: int) -> int:
    """The offset just after the file's last newline (0 if it has none), reading back
    from ``size`` in bounded pieces (one byte when the file ends with a newline there)."""
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    end = size
    while end > 0:
        start = max(0, end - 65536)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0
