"""HDF5 files and the datasets a model trains on: open, validate, describe, read rows.

An :class:`H5Source` is one or many HDF5 files holding the same datasets (``x``, ``y``
and optionally ``sample_weight``). Opening it checks everything that can be checked
without a model, and says what is wrong in one line that names the file and dataset.
Reads are contiguous row ranges; chunked, compressed datasets are read from their raw
chunks and decoded in the calling thread (:mod:`pipetrain.chunks`), so that several
producer threads decode in parallel instead of queueing on h5py's global lock.

A file may be a URL (``s3://``, ``gs://``, ``https://``): h5py then opens it through a
file object whose metadata pages are cached on disk by the object's version
(:mod:`pipetrain.h5remote`), and chunks come from parallel ranged GETs
(:mod:`pipetrain.ranges`), fetched ahead of time when the reader is told which rows
come next (:meth:`H5Source.will_need`).

The source knows nothing of batches or models: the plan says which rows, the pipeline
asks for them.
"""

from __future__ import annotations

import contextlib
import glob
import math
import operator
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipetrain.chunks import ChunkReader, open_chunk_reader
from pipetrain.errors import InputError
from pipetrain.remote import is_url

Names = str | Sequence[str] | Mapping[str, str]

BLOCK_BYTES = 1 << 20  # blocks hold at least this much of the largest dataset when chunks are small


class SourceError(InputError):
    """Bad input: a file, a dataset or a setting that cannot be used, said in one line."""


class SourceReadError(OSError):
    """Reading rows failed (an I/O error), with where it happened."""


class CorruptDataError(SourceError):
    """Rows could not be decoded (a corrupt or truncated chunk): bad input, found mid-run."""


@dataclass(frozen=True)
class Field:
    """One dataset that a batch carries: its name in the files, and one row's shape and dtype."""

    name: str
    row_shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike],
                 storage_options: dict | None = None) -> list[Path | str]:
    """Files from paths, URLs and globs of either, in the order given (each glob sorted);
    a URL stays a string."""
    return _expand(paths, storage_options)[0]


def _expand(paths, storage_options) -> tuple[list[Path | str], dict]:
    """Files and URLs, and what listing a URL glob told about its objects (url -> ObjectInfo)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path | str] = []
    objects: dict = {}
    for p in paths:
        text = os.fspath(p)
        if is_url(text):
            if _url_has_magic(text):
                from pipetrain import remote

                try:
                    found = remote.expand(text, storage_options)
                except remote.RemoteInputError as e:
                    raise SourceError(str(e)) from None
                objects.update((o.url, o) for o in found)
                files.extend(o.url for o in found)
            else:
                files.append(text)
        elif glob.has_magic(text):
            matches = sorted(glob.glob(text))
            if not matches:
                raise SourceError(f"{text}: no file matches")
            files.extend(Path(m) for m in matches)
        else:
            files.append(Path(text))
    if not files:
        raise SourceError("no data files given")
    return files, objects


def _names(names: Names | None, what: str) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str):
        return [names]
    values = list(names.values()) if isinstance(names, Mapping) else list(names)
    if not values or not all(isinstance(n, str) and n for n in values):
        raise SourceError(f"{what}={names!r}: expected a dataset name, a list of names or a dict of names")
    return values


def _arrange(names: Names | None, arrays: Mapping[str, np.ndarray]):
    """The arrays in the structure the names were given in (one, a list, or a dict)."""
    if names is None:
        return None
    if isinstance(names, str):
        return arrays[names]
    if isinstance(names, Mapping):
        return {key: arrays[name] for key, name in names.items()}
    return [arrays[name] for name in names]


class H5Source:
    """Rows of named datasets from one or many HDF5 files.

    Args:
        paths: a file, a glob (``"data/train-*.h5"``), or a list of them; files are read
            in the order given, each glob sorted.
        x: the input dataset name; a list of names for a multi-input model (in input
            order); or a dict keyed by the model's input names.
        y: the target dataset name(s), in the same forms (keyed by output names). Defaults
            to None (a model whose loss needs no targets).
        sample_weight: the name of a dataset of per-row weights. Defaults to None.
        allow_external: allow external links, external storage and virtual datasets that
            point outside the folders of the data files. Defaults to False (refused).
        storage_options: for URLs: the options of the fsspec filesystem (``s3fs``,
            ``gcsfs``, HTTP), e.g. ``{"anon": True}`` or ``{"profile": "research",
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}``. Defaults to None
            (the environment's credentials and endpoint).
        metadata_cache: for URLs: the folder where the HDF5 metadata of each object
            version is kept, True for the default (``$PIPETRAIN_CACHE`` or
            ``~/.cache/pipetrain``), or None for none. Defaults to True.
        fetch: for URLs: a :class:`pipetrain.ranges.FetchSettings` (requests in flight,
            coalescing, read-ahead budget, retries). Defaults to None (its defaults).
        rows: the rows to use, as a ``slice`` of the files' rows taken one after the
            other: whole numbers are row numbers (negative ones count from the end),
            floats are fractions of all rows (``slice(None, 0.9)``: the first 90%).
            Nothing is copied: the plan reads only these rows. Defaults to None (all).

    Example::

        train = pipetrain.H5Source("data/train-*.h5", x="images", y="labels")
        train.rows, train.fields
        train, val = train.split(0.1)   # the last 10% of the rows validate, as fit's validation_split
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        x: Names,
        y: Names | None = None,
        sample_weight: str | None = None,
        *,
        allow_external: bool = False,
        storage_options: dict | None = None,
        metadata_cache: bool | str | os.PathLike | None = True,
        fetch=None,
        rows: slice | None = None,
    ):
        self._given = dict(paths=paths, x=x, y=y, sample_weight=sample_weight, allow_external=allow_external,
                           storage_options=storage_options, metadata_cache=metadata_cache, fetch=fetch)
        self.storage_options = dict(storage_options or {})
        self.paths, self._objects = _expand(paths, self.storage_options)
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.allow_external = allow_external
        self.metadata_cache, self.fetch = metadata_cache, fetch
        self._fetcher = None  # ranged reads of the remote files, made on first use
        self._remote: list = []  # the remote files, opened (h5remote.RemoteH5)
        self.versions: dict[str, dict] = {}  # url -> {"size", "version"} as opened
        names = _names(x, "x") + _names(y, "y") + _names(sample_weight, "sample_weight")
        if not _names(x, "x"):
            raise SourceError("x: no input dataset named")
        self.names = list(dict.fromkeys(names))  # unique, in order
        self._roots = {p.resolve().parent for p in self.paths if isinstance(p, Path)}
        self._files: list[h5py.File] = []
        self._readers: list[dict[str, ChunkReader | h5py.Dataset]] = []
        self.rows_per_file: list[int] = []
        self.fields: dict[str, Field] = {}
        self._first_pages: dict = {}
        self._to_prefetch: list = []
        try:
            self._prefetch(first=True)
            for path in self.paths:
                self._open(path)
        except BaseException:
            self.close()
            raise
        self.rows_total = sum(self.rows_per_file)
        try:
            self.row_range = row_range(rows, self.rows_total)
        except SourceError:
            self.close()
            raise
        # Per file: the (start, stop) of its rows in the range, in the file's own rows.
        self.row_ranges: list[tuple[int, int]] = []
        offset = 0
        for n in self.rows_per_file:
            lo, hi = max(self.row_range[0] - offset, 0), min(self.row_range[1] - offset, n)
            self.row_ranges.append((lo, hi) if lo < hi else (0, 0))
            offset += n
        self.rows = self.row_range[1] - self.row_range[0]

    def split(self, validation_split: float) -> tuple[H5Source, H5Source]:
        """(training, validation): the last ``validation_split`` of this source's rows
        validate, the rest train, as ``fit(validation_split=...)`` takes them (from the
        end, before any shuffling; the training part has ``floor(rows * (1 -
        validation_split))`` rows). Both read the same files; nothing is copied."""
        if not (isinstance(validation_split, float) and 0.0 < validation_split < 1.0):
            raise SourceError(f"validation_split={validation_split!r}: expected a fraction between 0 and 1")
        start, stop = self.row_range
        cut = start + math.floor(self.rows * (1.0 - validation_split))
        if cut in (start, stop):
            raise SourceError(f"validation_split={validation_split}: {self.rows} rows cannot be split into "
                              "a training and a validation part")
        return tuple(H5Source(**self._given, rows=slice(a, b)) for a, b in ((start, cut), (cut, stop)))

    # -- opening and validation -------------------------------------------------

    PREFETCH_FILES = 64  # files whose first pages are requested ahead of their open

    def _prefetch(self, first: bool = False) -> None:
        """Many objects from a glob: request the first pages (their metadata; for small
        files all of it) of the next files side by side, before opening them one by one
        (``first``: before the first open; then after each open, one more file)."""
        if first:
            self._to_prefetch = [self._objects[p] for p in self.paths if isinstance(p, str) and p in self._objects]
            if len(self._to_prefetch) < 2:
                self._to_prefetch = []
                return
        if not self._to_prefetch:
            return
        from pipetrain import h5remote, ranges
        from pipetrain.remote import RemoteInputError, store_for

        try:
            if self._fetcher is None:
                self._fetcher = ranges.Fetcher(self.fetch)
            while self._to_prefetch and len(self._first_pages) < self.PREFETCH_FILES:
                obj = self._to_prefetch.pop(0)
                self._first_pages.update(h5remote.prefetch_first_pages(
                    [obj], lambda url: store_for(url, self.storage_options), self._fetcher, self.metadata_cache))
                if obj.url not in self._first_pages:
                    self._first_pages[obj.url] = None  # cached on disk: nothing to fetch
        except RemoteInputError as e:
            raise SourceError(str(e)) from None

    def _open(self, path: Path | str) -> None:
        if isinstance(path, str):
            self._open_remote(path)
            return
        if not path.exists():
            raise SourceError(f"{path}: no such file")
        if path.is_dir():
            raise SourceError(f"{path}: is a folder, not an HDF5 file")
        if not h5py.is_hdf5(path):
            raise SourceError(f"{path}: not an HDF5 file")
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise SourceError(f"{path}: cannot be opened as HDF5 (truncated or corrupted?): {e}") from None
        self._add_file(f, path)

    def _open_remote(self, url: str) -> None:
        """Open an object in a bucket: its version, its metadata (from the cache on disk
        when this version was opened before), then its datasets as for a local file."""
        from pipetrain import h5remote, ranges, remote

        try:
            if self._fetcher is None:
                self._fetcher = ranges.Fetcher(self.fetch)
            opened = h5remote.RemoteH5(url, self.storage_options, self.metadata_cache, self._fetcher,
                                       self._objects.get(url), self._first_pages.pop(url, None))
            self._remote.append(opened)
            self._add_file(opened.file, url, opened.chunk_bytes, opened.verified)
            opened.opened()
        except remote.RemoteInputError as e:
            raise SourceError(str(e)) from None
        except remote.RemoteReadError as e:
            raise SourceReadError(str(e)) from None
        self.versions[url] = {"size": opened.obj.size, "version": opened.obj.version}
        self._prefetch()

    def _add_file(self, f: h5py.File, path: Path | str, data=None, verified: dict | None = None) -> None:
        """Check the named datasets of an open file and open their readers (raw chunks
        from ``data()``, a new byte source, or from the file on disk)."""
        self._files.append(f)
        readers: dict[str, ChunkReader | h5py.Dataset] = {}
        rows: dict[str, int] = {}
        for name in self.names:
            dset = self._dataset(f, path, name)
            rows[name] = dset.shape[0]
            known = verified.setdefault(name, {}) if verified is not None else None
            reader = open_chunk_reader(dset, data() if data is not None else None, known)
            readers[name] = reader if isinstance(reader, ChunkReader) else dset
        first = self.names[0]
        for name, n in rows.items():
            if n != rows[first]:
                raise SourceError(
                    f"{path}: dataset '{name}' has {n} rows but '{first}' has {rows[first]}; "
                    "all datasets of a file need the same number of rows"
                )
        self._readers.append(readers)
        self.rows_per_file.append(rows[first])

    def _dataset(self, f: h5py.File, path: Path, name: str) -> h5py.Dataset:
        if name not in f:
            found = ", ".join(sorted(_dataset_names(f))[:10]) or "none"
            raise SourceError(f"{path}: no dataset '{name}' (datasets: {found})")
        self._check_links(f, path, name)
        try:
            dset = f[name]
        except (KeyError, OSError) as e:
            raise SourceError(f"{path}: dataset '{name}' cannot be opened: {e}") from None
        if not isinstance(dset, h5py.Dataset):
            raise SourceError(f"{path}: '{name}' is a group, not a dataset")
        if dset.dtype.kind not in "biuf":
            raise SourceError(f"{path}: dataset '{name}' has dtype {dset.dtype}; pipetrain needs numbers")
        if dset.ndim == 0:
            raise SourceError(f"{path}: dataset '{name}' is a scalar; pipetrain needs one row per sample")
        if dset.shape[0] == 0:
            raise SourceError(f"{path}: dataset '{name}' is empty (0 rows)")
        self._check_storage(path, name, dset)
        field = Field(name, tuple(dset.shape[1:]), np.dtype(dset.dtype))
        known = self.fields.setdefault(name, field)
        if (known.row_shape, known.dtype) != (field.row_shape, field.dtype):
            raise SourceError(
                f"{path}: dataset '{name}' rows are {field.row_shape} {field.dtype} but "
                f"{self.paths[0]} has {known.row_shape} {known.dtype}"
            )
        return dset

    def _outside(self, target: Path | str) -> bool:
        if isinstance(target, str):  # beside an object in a bucket: never one of our folders
            return True
        target = target.resolve()
        return not any(target.is_relative_to(root) for root in self._roots)

    def _refuse(self, path: Path | str, name: str, what: str, target: Path | str) -> None:
        if not self.allow_external and self._outside(target):
            raise SourceError(
                f"{path}: dataset '{name}' is {what} {target}, outside the data files' folders "
                "(allow it with allow_external=True or --allow-external)"
            )

    def _check_links(self, f: h5py.File, path: Path, name: str) -> None:
        """External links anywhere along the dataset's path may point anywhere on disk."""
        parts = [p for p in name.split("/") if p]
        for i in range(1, len(parts) + 1):
            link = f.get("/".join(parts[:i]), getlink=True)
            if isinstance(link, h5py.ExternalLink):
                self._refuse(path, name, "an external link to", _beside(path, link.filename))

    def _check_storage(self, path: Path, name: str, dset: h5py.Dataset) -> None:
        for filename, _offset, _size in dset.external or ():
            self._refuse(path, name, "stored in the external file", _beside(path, os.fsdecode(filename)))
        if dset.is_virtual:
            for source in dset.virtual_sources():
                if source.file_name != ".":
                    self._refuse(path, name, "a virtual dataset reading", _beside(path, source.file_name))

    def check_model(self, model) -> None:
        """Check that the datasets fit the model's inputs (and output names), once the
        model is known. Models without declared inputs (not built yet) are not checked."""
        inputs = getattr(model, "inputs", None)
        try:
            inputs = list(inputs) if inputs else []
        except TypeError:
            inputs = []
        if not inputs:
            return
        input_names = [getattr(t, "name", None) for t in inputs]
        where = self.paths[0]
        if isinstance(self.x, Mapping):
            missing = [k for k in input_names if k not in self.x]
            unknown = [k for k in self.x if k not in input_names]
            if missing or unknown:
                raise SourceError(
                    f"x={dict(self.x)!r} does not match the model's inputs {input_names}"
                    + (f" (no dataset for {missing})" if missing else "")
                    + (f" (no input named {unknown})" if unknown else "")
                )
            pairs = [(self.x[k], t) for k, t in zip(input_names, inputs, strict=True)]
        else:
            names = _names(self.x, "x")
            if len(names) != len(inputs):
                raise SourceError(
                    f"x names {len(names)} dataset(s) ({', '.join(names)}) but the model has "
                    f"{len(inputs)} input(s) ({', '.join(map(str, input_names))})"
                )
            pairs = list(zip(names, inputs, strict=True))
        for name, tensor in pairs:
            expected = tuple(tensor.shape[1:])
            got = self.fields[name].row_shape
            fits = len(expected) == len(got) and all(e is None or e == g for e, g in zip(expected, got, strict=True))
            if not fits:
                shown = tuple("None" if e is None else e for e in expected)
                raise SourceError(
                    f"{where}: dataset '{name}' rows are {got} but the model's input "
                    f"'{tensor.name}' expects {shown}"
                )
        if isinstance(self.y, Mapping):
            outputs = list(getattr(model, "output_names", None) or [])
            unknown = [k for k in self.y if outputs and k not in outputs]
            if unknown:
                raise SourceError(f"y={dict(self.y)!r}: the model has no output named {unknown} (outputs: {outputs})")

    # -- reading ----------------------------------------------------------------

    def block_rows(self) -> list[int]:
        """Rows per block for each file: whole chunks of the largest dataset, at least
        ``BLOCK_BYTES`` of it, so that a block decodes whole chunks and nothing else."""
        main = max(self.names, key=lambda n: self.fields[n].row_bytes)
        row_bytes = max(1, self.fields[main].row_bytes)
        per_file = []
        for f in self._files:
            chunks = f[main].chunks
            if chunks is None:
                per_file.append(max(1, BLOCK_BYTES // row_bytes))
            else:
                chunk_rows = chunks[0]
                per_file.append(chunk_rows * max(1, BLOCK_BYTES // (chunk_rows * row_bytes)))
        return per_file

    def read(
        self, file: int, start: int, stop: int, out: Mapping[str, np.ndarray] | None = None,
        names: Iterable[str] | None = None,
    ) -> tuple[dict[str, np.ndarray], int]:
        """Rows [start, stop) of every dataset (or of ``names``) of file number ``file``,
        and the bytes fetched from disk (compressed size on the fast path). With ``out``
        (C-contiguous arrays by dataset name), the rows are decoded straight into them."""
        arrays, fetched = {}, 0
        readers = self._readers[file]
        for name in readers if names is None else names:
            reader = readers[name]
            dest = out[name] if out is not None else None
            try:
                if isinstance(reader, ChunkReader):
                    arrays[name], n = reader.read(start, stop, out=dest)
                elif dest is not None:
                    reader.read_direct(dest, source_sel=np.s_[start:stop])
                    arrays[name], n = dest, dest.nbytes
                else:
                    arrays[name] = reader[start:stop]
                    n = arrays[name].nbytes
            except OSError as e:
                raise SourceReadError(f"{self.paths[file]}: dataset '{name}' rows {start}-{stop}: {e}") from e
            except Exception as e:
                raise CorruptDataError(f"{self.paths[file]}: dataset '{name}' rows {start}-{stop}: {e}") from e
            fetched += n
        return arrays, fetched

    def will_need(self, file: int, start: int, stop: int) -> bool:
        """A hint: rows [start, stop) of file number ``file`` will be read soon. A remote
        file starts fetching their chunks (within its read-ahead budget); a local one does
        nothing. Returns whether more hints are welcome (False for local files, and once
        the read-ahead budget is full)."""
        if self._fetcher is None or not isinstance(self.paths[file], str):
            return False
        wants = False
        for reader in self._readers[file].values():
            if isinstance(reader, ChunkReader):
                wants = reader.will_need(start, stop) or wants
        return wants

    def drop_hints(self) -> None:
        """Forget the rows hinted and not read yet (the plan that named them was dropped)."""
        if self._fetcher is not None:
            self._fetcher.drop_hints()

    def arrange(self, arrays: Mapping[str, np.ndarray]):
        """(x, y, sample_weight) from arrays keyed by dataset name, in the given structure."""
        return _arrange(self.x, arrays), _arrange(self.y, arrays), _arrange(self.sample_weight, arrays)

    def read_path(self) -> dict[str, str]:
        """Per dataset: the read path of the first file (raw chunks or h5py, and why)."""
        from pipetrain.chunks import read_path

        if isinstance(self.paths[0], str):  # a URL: its readers are open already
            return {name: reader.codec if isinstance(reader, ChunkReader) else "h5py read"
                    for name, reader in self._readers[0].items()}
        return {name: read_path(self._files[0][name]) for name in self.names}

    def describe(self) -> dict:
        return {
            "files": [str(p) for p in self.paths],
            "rows": self.rows,
            "rows_per_file": list(self.rows_per_file),
            "row_range": list(self.row_range),
            "x": self.x, "y": self.y, "sample_weight": self.sample_weight,
            "fields": {n: {"shape": list(f.row_shape), "dtype": str(f.dtype)} for n, f in self.fields.items()},
            **({"versions": dict(self.versions)} if self.versions else {}),
        }

    # -- lifetime ---------------------------------------------------------------

    def close(self) -> None:
        for readers in self._readers:
            for reader in readers.values():
                if isinstance(reader, ChunkReader):
                    reader.close()
        for f in self._files:
            with contextlib.suppress(Exception):  # closing twice or at interpreter exit
                f.close()
        if self._fetcher is not None:
            self._fetcher.close()
        self._readers, self._files, self._remote = [], [], []

    def __enter__(self) -> H5Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        files = self.paths[0] if len(self.paths) == 1 else f"{len(self.paths)} files"
        part = getattr(self, "row_range", None)
        part = f" [{part[0]}:{part[1]}]" if part and self.rows != self.rows_total else ""
        return f"H5Source({files}, rows={getattr(self, 'rows', '?')}{part}, x={self.x!r}, y={self.y!r})"


def row_range(rows: slice | None, total: int) -> tuple[int, int]:
    """(start, stop) of the rows a ``slice`` selects out of ``total``: whole numbers are
    rows (negative ones from the end, as in Python), floats fractions of ``total``.

    >>> row_range(slice(None, 0.9), 1000), row_range(slice(-100, None), 1000)
    ((0, 900), (900, 1000))
    """
    if rows is None:
        return 0, total
    if not isinstance(rows, slice) or rows.step not in (None, 1):
        raise SourceError(f"rows={rows!r}: expected a slice of rows such as slice(0, 1000) or slice(0.9, None)")

    def bound(value, default: int) -> int:
        if value is None:
            return default
        if isinstance(value, float):
            if not 0.0 <= value <= 1.0:
                raise SourceError(f"rows={rows!r}: a fraction must be between 0.0 and 1.0")
            return math.floor(total * value)
        try:
            index = operator.index(value)
        except TypeError:
            raise SourceError(f"rows={rows!r}: bounds must be row numbers or fractions") from None
        return min(max(index + total if index < 0 else index, 0), total)

    start, stop = bound(rows.start, 0), bound(rows.stop, total)
    if stop <= start:
        raise SourceError(f"rows={rows!r} selects no row of the {total:,} rows")
    return start, stop


def _url_has_magic(url: str) -> bool:
    """A URL glob: ``*``, ``?`` or ``[`` in its path (a web URL's query, as in a signed
    URL, is not part of the pattern)."""
    from urllib.parse import urlsplit

    path = urlsplit(url).path if url.lower().startswith(("http://", "https://")) else url.split("://", 1)[1]
    return glob.has_magic(path)


def _beside(path: Path | str, filename: str) -> Path | str:
    """Where a file named inside ``path`` (an external link's target) would be."""
    if isinstance(path, str):
        return path.rsplit("/", 1)[0] + "/" + filename
    return path.parent / filename


def _dataset_names(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names
