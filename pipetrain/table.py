"""Records of one type as columns: a long run's batch and system records in numpy arrays,
not one dict per line, that still read as the list of dicts they were parsed from.

A :class:`Table` keeps, for each key, one array over all rows (float64, int64, bool, a
categorical of strings, or objects where a key's values mix kinds), and for each row the
*shape* it had: its keys, in their order. A row read back (``table[i]``, iteration) is
the very dict its line parsed to - the same keys in the same order, ints as ints, floats
as floats, nulls as None, text and lists as they were - so code written for the lists of
dicts keeps working, while :meth:`Table.array` and :meth:`Table.to_pandas` hand out the
columns without building a dict per row. Unknown keys are columns like any other.

Example::

    h = pipetrain.read_history("runs/exp1")
    h.batches.array("loss")              # float64, NaN where null, missing or not a number
    h.batches[-1]                        # the last batch record, a dict
    [b["loss"] for b in h.batches[-50:]] # a slice is a Table too
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import chain

import numpy as np

ROWS_PER_DICT_CHUNK = 65536  # rows turned into dicts at a time when iterating

_NUMBER = (int, float)


class Column:
    """One key's values over all rows of a table. ``kind``: ``f`` float64 (with ``null``
    marking JSON nulls), ``i`` int64, ``b`` bool, ``s`` strings (``values`` are codes into
    ``categories``), ``o`` any Python values. Rows whose shape lacks the key hold a filler."""

    __slots__ = ("kind", "values", "null", "categories")

    def __init__(self, kind: str, values: np.ndarray, null: np.ndarray | None = None,
                 categories: list | None = None):
        self.kind, self.values, self.null, self.categories = kind, values, null, categories

    def __len__(self) -> int:
        return len(self.values)

    def take(self, index) -> Column:
        null = None if self.null is None else self.null[index]
        if null is not None and not null.any():
            null = None
        return Column(self.kind, self.values[index], null, self.categories)

    def tolist(self) -> list:
        """The Python values, as the parser gave them."""
        if self.kind == "s":
            return self.objects().tolist()
        values = self.values.tolist()
        if self.null is not None:
            for i in np.flatnonzero(self.null).tolist():
                values[i] = None
        return values

    def objects(self) -> np.ndarray:
        """A text column's values as an object array (the very str objects it holds)."""
        categories = np.empty(max(1, len(self.categories)), dtype=object)  # a filler's codes point at None
        categories[: len(self.categories)] = self.categories
        return categories[self.values]

    def get(self, i: int):
        if self.kind == "s":
            return self.categories[int(self.values[i])]
        if self.null is not None and self.null[i]:
            return None
        value = self.values[i]
        return value if self.kind == "o" else value.item()

    def numbers(self) -> np.ndarray:
        """float64 values; NaN where a value is null or not a number."""
        if self.kind in ("f", "i"):
            out = self.values.astype(np.float64)
            if self.null is not None:
                out[self.null] = np.nan
            return out
        if self.kind == "o":
            return np.array([float(v) if type(v) in _NUMBER else np.nan for v in self.values.tolist()],
                            dtype=np.float64)
        return np.full(len(self.values), np.nan)  # bools and text are not measurements


def column_of(values: Sequence, kinds: set | None = None) -> Column:
    """The column that holds ``values`` (Python values from the JSON parser) exactly;
    ``kinds``: the set of their types, if the caller has it."""
    if kinds is None:
        kinds = set(map(type, values))
    n = len(values)
    if kinds == {float}:
        return Column("f", np.fromiter(values, dtype=np.float64, count=n))
    if kinds == {float, type(None)}:
        null = np.fromiter(map(_is_none, values), dtype=bool, count=n)
        return Column("f", np.array(values, dtype=np.float64), null)  # None becomes NaN
    if kinds == {int}:
        try:
            return Column("i", np.fromiter(values, dtype=np.int64, count=n))
        except OverflowError:  # beyond 64 bits: kept as Python ints
            pass
    elif kinds == {bool}:
        return Column("b", np.fromiter(values, dtype=bool, count=n))
    elif kinds == {str}:
        first = values[0]
        if values.count(first) == n:
            return Column("s", np.zeros(n, dtype=np.int32), categories=[first])
        index: dict = {}
        codes = [index.setdefault(v, len(index)) for v in values]
        return Column("s", np.array(codes, dtype=np.int32), categories=list(index))
    column = np.empty(n, dtype=object)
    column[:] = list(values)
    return Column("o", column)


def _transposed(rows: list[dict], shape: tuple) -> tuple[list[list], dict[str, set]]:
    """The values of rows that share the key tuple ``shape``, key by key (one pass over
    all values, then a strided slice per key), and the set of their types per key."""
    width = len(shape)
    flat = list(chain.from_iterable(map(dict.values, rows)))
    columns = [flat[j::width] for j in range(width)]
    types = list(map(type, flat))
    first = types[:width]
    if types == first * len(rows):  # each key's values of one type (the usual case)
        return columns, {k: {t} for k, t in zip(shape, first, strict=True)}
    return columns, {k: set(map(type, v)) for k, v in zip(shape, columns, strict=True)}


def _is_none(value) -> bool:
    return value is None


def _filler(kind: str, n: int) -> Column:
    if kind == "f":
        return Column("f", np.full(n, np.nan))
    if kind == "i":
        return Column("i", np.zeros(n, dtype=np.int64))
    if kind == "b":
        return Column("b", np.zeros(n, dtype=bool))
    if kind == "s":
        return Column("s", np.zeros(n, dtype=np.int32), categories=[])
    return Column("o", np.full(n, None, dtype=object))


def _as_objects(column: Column) -> np.ndarray:
    out = np.empty(len(column), dtype=object)
    out[:] = column.tolist()
    return out


def concat(parts: list[Column | None], sizes: list[int]) -> Column:
    """One column from the columns of consecutive pieces (None: the piece lacks the key)."""
    present = [p for p in parts if p is not None]
    if not present:
        return _filler("o", sum(sizes))
    kinds = {p.kind for p in present}
    if len(kinds) > 1:  # a key whose values mix kinds across pieces: exact Python values
        parts = [None if p is None else Column("o", _as_objects(p)) for p in parts]
        kinds = {"o"}
    kind = kinds.pop()
    parts = [_filler(kind, n) if p is None else p for p, n in zip(parts, sizes, strict=True)]
    if len(parts) == 1:
        return parts[0]
    if kind == "s":
        index: dict = {}
        codes = []
        for p in parts:
            remap = np.array([index.setdefault(c, len(index)) for c in p.categories] or [0], dtype=np.int32)
            codes.append(remap[p.values])
        return Column("s", np.concatenate(codes), categories=list(index))
    values = np.concatenate([p.values for p in parts])
    null = None
    if any(p.null is not None for p in parts):
        null = np.concatenate([p.null if p.null is not None else np.zeros(len(p), dtype=bool) for p in parts])
    return Column(kind, values, null)


class Table(Sequence):
    """Rows of records as columns; a sequence of dicts (see the module's docstring)."""

    def __init__(self, columns: dict[str, Column] | None = None, shapes: list[tuple] | None = None,
                 shape_of: np.ndarray | None = None):
        self.columns = columns or {}
        self.shapes = shapes or []
        self.shape_of = shape_of if shape_of is not None else np.zeros(0, dtype=np.int32)
        self._used: np.ndarray | None = None

    @classmethod
    def from_records(cls, records: list[dict]) -> Table:
        builder = TableBuilder()
        builder.add(records)
        return builder.build()

    def __len__(self) -> int:
        return len(self.shape_of)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        i = range(len(self))[index]  # negative indexes and bounds, as a list has them
        shape = self.shapes[self.shape_of[i]]
        columns = self.columns
        return {k: columns[k].get(i) for k in shape}

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, len(self), ROWS_PER_DICT_CHUNK):
            yield from self._dicts(start, min(len(self), start + ROWS_PER_DICT_CHUNK))

    def _dicts(self, start: int, stop: int) -> list[dict]:
        part = self.take(np.arange(start, stop)) if (start, stop) != (0, len(self)) else self
        lists = {k: c.tolist() for k, c in part.columns.items()}
        out = []
        shape_of = part.shape_of.tolist()
        if len(set(shape_of)) == 1:
            shape = part.shapes[shape_of[0]]
            return [dict(zip(shape, row, strict=True)) for row in zip(*(lists[k] for k in shape), strict=True)]
        for i, s in enumerate(shape_of):
            out.append({k: lists[k][i] for k in part.shapes[s]})
        return out

    def __eq__(self, other) -> bool:
        if isinstance(other, (Table, list, tuple)):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"<Table of {len(self)} records: {', '.join(self.columns)}>"

    def __reversed__(self):
        for i in range(len(self) - 1, -1, -1):
            yield self[i]

    def take(self, index) -> Table:
        """The rows at ``index`` (integer positions or a boolean mask), as a Table."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        shape_of = self.shape_of[index]
        used = np.unique(shape_of)
        keys = {k for s in used.tolist() for k in self.shapes[s]}
        columns = {k: c.take(index) for k, c in self.columns.items() if k in keys}
        return Table(columns, self.shapes, shape_of)

    def has(self, name: str) -> np.ndarray:
        """Whether each row has the key ``name``."""
        lacking = self._lacking(name)
        return np.ones(len(self), dtype=bool) if lacking is None else ~lacking

    def _lacking(self, name: str) -> np.ndarray | None:
        """Whether each row lacks the key ``name``; None where no row does."""
        with_key = np.array([name in s for s in self.shapes] or [False], dtype=bool)
        if with_key.all() or not len(self):
            return None
        if self._used is None:  # the shapes some row has
            self._used = np.bincount(self.shape_of, minlength=len(self.shapes)) > 0
        if with_key[self._used[: len(with_key)]].all():
            return None
        return ~with_key[self.shape_of]

    def array(self, name: str) -> np.ndarray:
        """The values of ``name`` as float64: NaN where a row lacks it, where it is null,
        and where it is not a number (text in a hand-edited file)."""
        column = self.columns.get(name)
        if column is None:
            return np.full(len(self), np.nan)
        out = column.numbers()
        lacking = self._lacking(name)
        if lacking is not None:
            out[lacking] = np.nan
        return out

    def ints(self, name: str, exact: bool = False) -> np.ndarray:
        """The values of a position or count (``epoch``, ``batch``, ``size``) as int64,
        as readers take them: a missing or null value counts as 0. One beyond 64 bits
        is clipped to int64, or, ``exact``, kept (then the array holds Python ints)."""
        column = self.columns.get(name)
        if column is None:
            return np.zeros(len(self), dtype=np.int64)
        if column.kind == "i":
            out = column.values.copy()
        else:
            low, high = np.iinfo(np.int64).min, np.iinfo(np.int64).max
            values = [v if type(v) is int else 0 for v in column.tolist()]
            if exact and any(not low <= v <= high for v in values):
                out = np.array(values, dtype=object)
            else:
                out = np.array([min(max(v, low), high) for v in values], dtype=np.int64)
        lacking = self._lacking(name)
        if lacking is not None:
            out[lacking] = 0
        return out

    def to_pandas(self):
        """A DataFrame, one row per record and one column per key, as
        ``pandas.DataFrame(list(table))`` gives it, built from the columns."""
        import pandas as pd

        data = {}
        for name, column in self.columns.items():
            lacking = self._lacking(name)
            if column.kind == "f" and column.null is None and lacking is None:
                data[name] = column.values  # (copied by pandas)
            elif column.kind == "f" or (column.kind == "i" and lacking is not None):
                data[name] = self.array(name)  # NaN where null or missing, as pandas has it
            elif column.kind == "i" or (column.kind == "b" and lacking is None):
                data[name] = column.values
            elif column.kind in ("s", "b"):  # (a bool's filler where the key is missing is False: NaN, as pandas has it)
                values = column.objects() if column.kind == "s" else column.values.astype(object)
                if lacking is not None:
                    values[lacking] = np.nan
                data[name] = values
            else:
                values = column.tolist()
                if lacking is not None:
                    for i in np.flatnonzero(lacking).tolist():
                        values[i] = np.nan
                data[name] = values
        return pd.DataFrame(data, index=pd.RangeIndex(len(self)))


class TableBuilder:
    """Collects parsed records (dicts) piece by piece; :meth:`build` makes the Table."""

    def __init__(self):
        self._shapes: dict[tuple, int] = {}
        self._pieces: list[tuple[int, dict[str, Column]]] = []  # (rows, columns)
        self._shape_of: list[np.ndarray] = []
        self.rows = 0

    def add(self, records: list[dict], accept=None, check=None) -> bool:
        """Append records (any keys, any order). With ``accept``, a function of a shape's
        {key: set of value types}, the records are appended only if it accepts every
        shape among them (and False is returned otherwise); ``check``, a function of a
        shape's {key: Column}, likewise once the columns are built."""
        if not records:
            return True
        keys = list(map(tuple, records))
        first = keys[0]
        if keys.count(first) == len(keys):
            groups = [(first, records)]
        else:
            groups, start = [], 0
            for i in range(1, len(keys) + 1):  # consecutive runs of one shape
                if i == len(keys) or keys[i] != keys[start]:
                    groups.append((keys[start], records[start:i]))
                    start = i
        pieces = []
        for shape, group in groups:
            values, kinds = _transposed(group, shape)
            if accept is not None and not accept(kinds):
                return False
            columns = {k: column_of(v, kinds[k]) for k, v in zip(shape, values, strict=True)}
            if check is not None and not check(columns):
                return False
            pieces.append((shape, len(group), columns))
        for shape, n, columns in pieces:
            self.add_columns(shape, n, columns)
        return True

    def add_columns(self, shape: tuple, n: int, columns: dict[str, Column]) -> None:
        """Append ``n`` records that all have the keys ``shape``, given as their columns
        (each as :func:`column_of` makes it from the values)."""
        sid = self._shapes.setdefault(shape, len(self._shapes))
        self._pieces.append((n, columns))
        self._shape_of.append(np.full(n, sid, dtype=np.int32))
        self.rows += n

    def extend(self, other: TableBuilder) -> None:
        """Append the records ``other`` collected, after this builder's."""
        remap = np.array([self._shapes.setdefault(shape, len(self._shapes)) for shape in other._shapes] or [0],
                         dtype=np.int32)
        self._pieces += other._pieces
        self._shape_of += [remap[shape_of] for shape_of in other._shape_of]
        self.rows += other.rows

    def ints(self, name: str, rows: int | None = None, exact: bool = False) -> np.ndarray:
        """:meth:`Table.ints` of the records added so far (of the first ``rows`` of them)."""
        pieces, shape_of, count = [], [], 0
        for piece, shapes in zip(self._pieces, self._shape_of, strict=True):
            if rows is not None and count >= rows:
                break
            pieces.append(piece)
            shape_of.append(shapes)
            count += piece[0]
        column = concat([cols.get(name) for _, cols in pieces], [n for n, _ in pieces])
        shape_of = np.concatenate(shape_of) if shape_of else np.zeros(0, dtype=np.int32)
        return Table({name: column}, list(self._shapes), shape_of).ints(name, exact)[:rows]

    def build(self, keep: np.ndarray | None = None) -> Table:
        """The table of every record added (or of those where ``keep`` is True)."""
        shapes = list(self._shapes)
        shape_of = np.concatenate(self._shape_of) if self._shape_of else np.zeros(0, dtype=np.int32)
        dropping = keep is not None and not keep.all()
        kept_shapes = np.unique(shape_of[keep] if dropping else shape_of).tolist()
        order: dict[str, None] = {}
        for shape in shapes:  # keys in the order they first appear, as pandas orders them
            if shapes.index(shape) in kept_shapes:
                order.update(dict.fromkeys(shape))
        if dropping:  # dropped from the pieces that hold such rows, before they are joined
            self._pieces[:] = self._kept_pieces(keep)
            shape_of = shape_of[keep]
        sizes = [n for n, _ in self._pieces]
        columns = {}
        for name in order:
            columns[name] = concat([cols.get(name) for _, cols in self._pieces], sizes)
            for _, cols in self._pieces:  # free each piece's part as soon as it is joined
                cols.pop(name, None)
        self._pieces.clear()
        return Table(columns, shapes, shape_of)

    def _kept_pieces(self, keep: np.ndarray) -> list[tuple[int, dict[str, Column]]]:
        out, at = [], 0
        for n, columns in self._pieces:
            mask = keep[at: at + n]
            at += n
            if mask.all():
                out.append((n, columns))
            elif mask.any():
                out.append((int(mask.sum()), {k: c.take(mask) for k, c in columns.items()}))
        return out
