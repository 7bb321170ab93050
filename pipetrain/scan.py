"""Finding records in a long history without parsing every line.

A long run's history is almost all batch lines: a 2,000,000-batch history (450 MB) holds
about 10,000 other lines (run, epoch, system, end). The writer begins every batch line
with the same bytes (``{"type":"batch",``), so the other lines are found at the speed of
a byte search, in blocks of a few MB read one after the other:

- :func:`blocks` reads a file (or a byte range of it) as blocks of complete lines;
- :meth:`Block.others` gives the lines of a block that do not begin as a batch line
  (each run, epoch, system and end record, and any line another tool or a person wrote);
- :meth:`Block.clean` tells whether the block's batch lines are surely batch records as
  far as a reader that skips them can tell: no second ``"type"`` key and no escape
  (``\\u0074ype``) anywhere in them. A block that is not clean is parsed line by line.

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
from dataclasses import dataclass

try:  # optional: 3-5x faster than json for a history's lines
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None

BLOCK_BYTES = 8 << 20
BATCH_PREFIX = b'{"type":"batch",'
SYSTEM_PREFIX = b'{"type":"system",'
_OTHER_LINE = re.compile(rb"\n(?!" + re.escape(BATCH_PREFIX) + rb")")
# orjson reads an integer beyond 64 bits as a float, where json keeps it an int. Such an
# integer has 19 digits or more in a row, which the writer never writes (a float has at
# most 17 significant digits): bytes with such a run are parsed by json.
_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS = b"0" * 19


def _long_digits(data: bytes) -> bool:
    return data.translate(_DIGITS).find(_LONG_DIGITS) >= 0


def loads(line: bytes):
    """``json.loads(line)``, faster: orjson where it gives the same value, json where
    orjson refuses what json accepts (NaN, a byte-order mark, a lone surrogate) or may
    differ (integers beyond 64 bits). Raises ValueError (or RecursionError) as json does."""
    if orjson is not None and not _long_digits(line):
        try:
            return orjson.loads(line)
        except orjson.JSONDecodeError:
            pass
    return json.loads(line)


def loads_many(lines: list[bytes], data: bytes | None = None) -> list:
    """:func:`decode` of each line (``data``: the lines joined, if the caller has it)."""
    if orjson is not None and not _long_digits(data if data is not None else b"".join(lines)):
        try:
            return list(map(orjson.loads, lines))
        except orjson.JSONDecodeError:
            pass
    return [decode(line) for line in lines]


def decode(line: bytes):
    """:func:`loads`, or None for a line that is not JSON."""
    try:
        return loads(line)
    except (ValueError, RecursionError):
        return None


@dataclass
class Block:
    """Complete lines of a file: ``data`` begins at byte ``offset`` and ends with a
    newline, except the final fragment of a file that does not end with one (``final``)."""

    offset: int
    data: bytes
    final: bool = False

    def others(self) -> list[tuple[int, int]]:
        """(start, end) in ``data`` of each line that does not begin as a batch line; end
        is the position of its newline (or the end of ``data``)."""
        data = self.data
        starts = [m.end() for m in _OTHER_LINE.finditer(data)]
        if starts and starts[-1] >= len(data):
            starts.pop()
        if data and not data.startswith(BATCH_PREFIX):
            starts.insert(0, 0)
        out = []
        for start in starts:
            end = data.find(b"\n", start)
            out.append((start, len(data) if end < 0 else end))
        return out

    def clean(self, others: list[tuple[int, int]]) -> bool:
        """Whether every line that begins as a batch line is a batch record or no record
        at all: its only ``"type"`` key is the first, and no escape could spell another."""
        data = self.data
        lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
        in_others = sum(data.count(b'"type"', s, e) for s, e in others)
        if data.count(b'"type"') != lines - len(others) + in_others:
            return False
        starts = [s for s, _ in others]
        slash = data.find(b"\\")
        while slash >= 0:  # each escape must be inside one of the other lines
            i = bisect.bisect_right(starts, slash) - 1
            if i < 0 or slash >= others[i][1]:
                return False
            slash = data.find(b"\\", others[i][1])
        return True

    def batch_runs(self, others: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """(start, end) of each run of consecutive batch lines (end after the newline)."""
        runs, at = [], 0
        for start, end in others:
            if start > at:
                runs.append((at, start))
            at = end + 1
        if at < len(self.data):
            runs.append((at, len(self.data)))
        return runs


def blocks(fd: int, start: int = 0, stop: int | None = None, size: int = BLOCK_BYTES) -> Iterator[Block]:
    """The bytes of an open file from ``start`` to ``stop`` (default: its end now) as
    blocks of complete lines; a last line without its newline comes as a final block."""
    if stop is None:
        stop = os.fstat(fd).st_size
    at, rest = start, b""
    while at < stop:
        chunk = os.pread(fd, min(size, stop - at), at)
        if not chunk:
            break
        at += len(chunk)
        data = rest + chunk if rest else chunk
        cut = data.rfind(b"\n") + 1
        if cut:
            yield Block(at - len(data), data[:cut] if cut < len(data) else data)
        rest = data[cut:]
    if rest:
        yield Block(at - len(rest), rest, final=True)


def line_end(fd: int, size: int) -> int:
    """The offset just after the file's last newline (0 if it has none), reading back
    from ``size`` in bounded pieces."""
    end = size
    while end > 0:
        start = max(0, end - 65536)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0
