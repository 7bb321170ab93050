"""Batch lines written as the writer writes them, parsed as columns with one orjson call.

A long history's batch lines are one *template* filled with other numbers: the same keys
in the same order, the same type and run id, only the numbers differ. :func:`parse` takes
the first line as the template and reads lines that are exactly the template with other
numbers in its number places by parsing all their numbers as ONE JSON array, which is
then cut into columns: no dict per line.

It gives exactly what ``json.loads`` of every line gives, or None (the caller parses the
lines one by one) where it cannot tell:

- every byte of every line outside the number places must be the template's byte (a
  renamed key, another run id, a space, a second type key, a text or null for a
  number: None);
- each number place must hold one JSON number of the template's kind there (an int
  where the template has an int, a float where it has a float): the array parse of all
  of them finds exactly as many values as places, and their types are checked;
- what orjson reads unlike json (an integer beyond 64 bits, which orjson reads as a
  float; NaN, Infinity, 1e400, which it refuses): None.
"""

from __future__ import annotations

import re

import numpy as np
import orjson

from pipetrain.table import Column, column_of

_NUMBER = re.compile(rb"-?[0-9][-+.eE0-9]*")
_WIDE = 2.0**63  # orjson reads an integer of this magnitude or more as a float (or not at all)
_EXACT = 2.0**53  # every integer below this magnitude is exact in a float64
_COLON, _NEWLINE = ord(":"), ord("\n")


class Template:
    """One line cut into its fixed pieces and its number places (``slots``): the line
    is ``pieces[0] slot0 pieces[1] slot1 ... pieces[m]``; each piece after the first
    begins with the byte that ends the number before it (a comma or the closing brace)."""

    __slots__ = ("record", "keys", "fixed", "slot_keys", "slot_types", "pieces", "colons", "slot_colons",
                 "outside", "piece_runs", "run_is_slot")

    def __init__(self, record, fixed, slot_keys, slot_types, pieces):
        self.record, self.keys, self.fixed = record, tuple(record), fixed
        self.slot_keys, self.slot_types, self.pieces = slot_keys, slot_types, pieces
        line = b"".join(pieces)  # (the pieces alone: a number holds no colon)
        self.colons = line.count(b":")
        self.slot_colons = [b"".join(pieces[: j + 1]).count(b":") - 1 for j in range(len(slot_keys))]
        # A line with its number places cut out: the pieces, and the newline.
        self.outside = np.frombuffer(line + b"\n", dtype=np.uint8)
        self.piece_runs = np.array([len(p) for p in pieces], dtype=np.int64)
        self.piece_runs[-1] += 1  # the newline
        self.run_is_slot = np.arange(2 * len(pieces) - 1) % 2 == 1  # piece, slot, piece, ..., piece


def template(line: bytes) -> Template | None:
    """The template of one line (without its newline): None for a line that is not a
    flat JSON object written without spaces, or that holds no number."""
    if not line.startswith(b"{"):
        return None
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if type(record) is not dict:
        return None
    fixed, slot_keys, slot_types, pieces = {}, [], [], []
    at, piece = 1, 0
    for i, (key, value) in enumerate(record.items()):
        head = (b"," if i else b"") + orjson.dumps(key) + b":"
        if not line.startswith(head, at):
            return None  # written otherwise (spaces, escapes, a key twice)
        at += len(head)
        kind = type(value)
        if kind is int or kind is float:
            number = _NUMBER.match(line, at)
            if number is None:
                return None
            pieces.append(line[piece:at])
            slot_keys.append(key)
            slot_types.append(kind)
            at = piece = number.end()
        elif value is None or kind is bool or kind is str:  # the same in every line: one value for all
            text = orjson.dumps(value)
            if not line.startswith(text, at):
                return None
            at += len(text)
            fixed[key] = value
        else:  # a list or an object: mutable, one per record
            return None
    if line[at:] != b"}" or not slot_keys:
        return None
    pieces.append(line[piece:])
    return Template(record, fixed, slot_keys, slot_types, pieces)


def parse(data: bytes, like: Template | None = None) -> tuple[Template, np.ndarray, dict[str, Column]] | None:
    """The lines of ``data`` (complete lines, each ending with a newline) as columns:
    (their template, where their newlines are, {key: Column} in the template's key order), or None
    where a line is not the template (``like``, or ``data``'s first line) filled with
    numbers of its kinds, or orjson may read one unlike json."""
    first = data.find(b"\n")
    t = like or template(data[:first])
    if t is None:
        return None
    arr = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(arr == _NEWLINE)
    n, m = len(ends), len(t.slot_keys)
    if not n or ends[-1] != len(data) - 1:
        return None
    colons = np.flatnonzero(arr == _COLON)
    if len(colons) != n * t.colons:
        return None
    # Where each number begins (just after its key's colon) and ends (its piece after it
    # has the template's length), then whether every byte outside is the template's.
    starts = colons.reshape(n, t.colons)[:, t.slot_colons] + 1
    stops = np.empty_like(starts)
    lengths = np.array([len(p) for p in t.pieces], dtype=np.int64)
    stops[:, :-1] = starts[:, 1:] - lengths[1:-1]
    stops[:, -1] = ends - lengths[-1]
    line_starts = np.empty(n, dtype=np.int64)
    line_starts[0] = 0
    line_starts[1:] = ends[:-1] + 1
    if not ((starts[:, 0] - line_starts == lengths[0]).all() and (stops > starts).all()):
        return None
    # Every byte outside the number places is the template's: the data with the places
    # cut out is the template's pieces (and newline), n times over.
    runs = np.empty((n, 2 * m + 1), dtype=np.int64)
    runs[:, 0::2] = t.piece_runs
    runs[:, 1::2] = stops - starts
    in_slot = np.repeat(np.tile(t.run_is_slot, n), runs.ravel())
    outside = arr[~in_slot]
    if len(outside) != n * len(t.outside) or not (outside.reshape(n, -1) == t.outside).all():
        return None
    # The numbers, each with the byte after it (a comma, or the brace that closes the
    # line, made a comma), cut out as one JSON array.
    in_slot[stops.ravel()] = True
    closers = np.cumsum(runs[:, 1::2].sum(axis=1) + m)  # where each line's last closer lands
    numbers = np.empty(int(closers[-1]) + 1, dtype=np.uint8)
    numbers[0] = ord("[")
    np.compress(in_slot, arr, out=numbers[1:])
    numbers[closers] = ord(",")
    numbers[-1] = ord("]")
    try:
        flat = orjson.loads(memoryview(numbers))
    except orjson.JSONDecodeError:
        return None
    if len(flat) != n * m or list(map(type, flat)) != t.slot_types * n:
        return None  # a place held no number, two numbers, or one of another kind
    columns = _columns(t, flat, n)
    if columns is None:
        return None
    for key, value in t.fixed.items():
        columns[key] = column_of([value] * n, {type(value)})
    return t, ends, {key: columns[key] for key in t.keys}


def _columns(t: Template, flat: list, n: int) -> dict[str, Column] | None:
    m = len(t.slot_keys)
    values = np.array(flat, dtype=np.float64).reshape(n, m)
    if not (np.abs(values) < _WIDE).all():
        return None  # an integer beyond 64 bits that orjson read as a float, or one near it
    out = {}
    for j, (key, kind) in enumerate(zip(t.slot_keys, t.slot_types, strict=True)):
        column = np.ascontiguousarray(values[:, j])
        if kind is int:
            if (np.abs(column) < _EXACT).all():
                column = column.astype(np.int64)
            else:  # large integers: each exactly
                column = np.fromiter(flat[j::m], dtype=np.int64, count=n)
            out[key] = Column("i", column)
        else:
            out[key] = Column("f", column)
    return out
