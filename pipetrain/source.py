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
import errno
import glob
import math
import operator
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipetrain.chunks import ChunkReader, DamagedChunk, check_index, open_chunk_reader
from pipetrain.codecs import FILTER_NAMES
from pipetrain.errors import InputError, located, one_line
from pipetrain.remote import RemoteReadError, is_url

Names = str | Sequence[str] | Mapping[str, str]

BLOCK_BYTES = 1 << 20  # blocks hold at least this much of the largest dataset when chunks are small


class SourceError(InputError):
    """Bad input: a file, a dataset or a setting that cannot be used, said in one line."""


class SourceReadError(OSError):
    """Reading rows failed (an I/O error), with where it happened."""


class CorruptDataError(SourceError):
    """Rows could not be decoded (a corrupt or truncated chunk): bad input, found mid-run."""


class LabelRangeError(SourceError):
    """A class label outside the range the model's output takes: bad input, found mid-run."""


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
    a URL stays a string. A local path that exists is that file, whatever characters it
    holds (``train[1].h5``); only a path that does not exist is expanded as a glob."""
    return _expand(paths, storage_options)[0]


def _expand(paths, storage_options) -> tuple[list[Path | str], dict]:
    """Files and URLs, and what listing a URL glob told about its objects (url -> ObjectInfo)."""
    given = paths
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    try:
        paths = list(paths)
    except TypeError:
        paths = [None]
    if not all(isinstance(p, (str, bytes, os.PathLike)) for p in paths):
        raise SourceError(f"paths={given!r}: expected a file, URL or glob, or a list of them")
    files: list[Path | str] = []
    objects: dict = {}
    seen: dict[str, str] = {}  # each file, where it was named: a file twice would be read twice an epoch
    for p in paths:
        text = os.fsdecode(p)
        count = len(files)
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
        elif glob.has_magic(text) and not os.path.lexists(text):
            found = glob.glob(text)
            matches = sorted(m for m in found if not os.path.isdir(m))  # (a folder beside the files: as buckets)
            if not matches:
                raise SourceError(f"{text}: no file matches" + (" (only folders)" if found else ""))
            files.extend(Path(m) for m in matches)
        else:
            files.append(Path(text))
        for file in files[count:]:
            key = file if isinstance(file, str) else os.path.realpath(file)
            if key in seen:
                raise SourceError(f"{file}: given twice (as {seen[key]} and {text}); name each file once")
            seen[key] = text
    if not files:
        raise SourceError("no data files given")
    return files, objects


def _names(names: Names | None, what: str) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str):
        return [names]
    if not isinstance(names, (Mapping, list, tuple)):
        raise SourceError(f"{what}={names!r}: expected a dataset name, a list of names or a dict of names")
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
        self._files: list[h5py.File] = []
        self._readers: list[dict[str, ChunkReader | h5py.Dataset]] = []
        self._zero_first: list[set[str]] = []  # per file: datasets read by h5py that HDF5 never fills
        self._datasets: list[dict[str, h5py.Dataset]] = []  # per file, as opened (see _open_dataset)
        self._linked: list[set[str]] = []  # per file: other files its datasets are read from (links, storage)
        self._as_opened: list[tuple | None] = []  # per local file: (device, inode, size, mtime) when opened
        self._label_limits: dict = {}  # dataset name -> pipetrain.labels.LabelLimit
        self.rows_per_file: list[int] = []
        self.fields: dict[str, Field] = {}
        for path in self.paths:
            if isinstance(path, Path):
                check_path(path)
        self._roots = {p.resolve().parent for p in self.paths if isinstance(p, Path)}
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
        try:  # check_path has said what is not an HDF5 file
            f = h5py.File(path, "r")
        except Exception as e:  # OSError, or others from a damaged superblock
            raise SourceError(open_failure(path, e)) from None
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
            self._add_file(opened.file, url, opened)
            opened.opened()
        except remote.RemoteInputError as e:
            raise SourceError(str(e)) from None
        except OSError as e:
            if _network_failure(e):
                raise SourceReadError(one_line(e)) from None
            raise
        self.versions[url] = {"size": opened.obj.size, "version": opened.obj.version}
        self._prefetch()

    def _add_file(self, f: h5py.File, path: Path | str, remote=None) -> None:
        """Check the named datasets of an open file and open their readers. ``remote``:
        the :class:`pipetrain.h5remote.RemoteH5` an object in a bucket was opened through
        (byte sources of its chunks, what earlier opens of this version verified, its
        size), or None for a file on disk."""
        self._files.append(f)
        readers: dict[str, ChunkReader | h5py.Dataset] = {}
        self._readers.append(readers)  # closed with the source, also when this file is refused
        self._zero_first.append(set())
        datasets: dict[str, h5py.Dataset] = {}
        self._datasets.append(datasets)
        self._linked.append(set())
        self._as_opened.append(_identity(path) if remote is None else None)
        rows: dict[str, int] = {}
        for name in self.names:
            try:
                dset = datasets[name] = self._dataset(f, path, name)
                rows[name] = dset.shape[0]
                readers[name] = self._reader(path, name, dset, remote)
            except InputError:
                raise
            except Exception as e:  # a damaged file: h5py raises IndexError, OverflowError, ...
                if _network_failure(e):
                    raise  # _open_remote says so
                raise SourceError(f"{path}: dataset '{name}' cannot be read (damaged file?): {one_line(e, with_type=True)}") from None
        first = self.names[0]
        for name, n in rows.items():
            if n != rows[first]:
                raise SourceError(
                    f"{path}: dataset '{name}' has {n} rows but '{first}' has {rows[first]}; "
                    "all datasets of a file need the same number of rows"
                )
        self.rows_per_file.append(rows[first])

    def _reader(self, path: Path | str, name: str, dset: h5py.Dataset, remote=None) -> ChunkReader | h5py.Dataset:
        """The fast reader of a dataset, or the dataset itself for h5py's read, after the
        checks that make a damaged or truncated file an error instead of a quiet answer
        (``remote``: as for :meth:`_add_file`)."""
        if remote is None:
            reader = open_chunk_reader(dset)  # DamagedChunk names the rows
        else:
            reader = open_chunk_reader(dset, remote.chunk_bytes(), remote.verified.setdefault(name, {}))
        if isinstance(reader, ChunkReader):
            return reader
        # (the file the dataset is in: another one where an external link leads)
        size = os.path.getsize(dset.file.filename) if remote is None else remote.obj.size
        _check_filters(path, name, dset)
        _check_filter_parameters(path, name, dset)
        check_index(dset, str(path), size)
        _check_contiguous(path, name, dset, size)
        dcpl = dset.id.get_create_plist()
        if (
            dset.is_virtual  # (its sources' fill settings are theirs, not in this plist)
            or dcpl.get_fill_time() == h5py.h5d.FILL_TIME_NEVER
            or dcpl.fill_value_defined() == h5py.h5d.FILL_VALUE_UNDEFINED
        ):
            # HDF5 leaves unwritten storage out of the buffer (h5py's own buffers are
            # zeros): a recycled buffer must be zeroed first or it keeps an older batch.
            self._zero_first[-1].add(name)
        return dset

    def _dataset(self, f: h5py.File, path: Path | str, name: str) -> h5py.Dataset:
        if name not in f:
            found = ", ".join(sorted(_dataset_names(f))[:10]) or "none"
            raise SourceError(f"{path}: no dataset '{name}' (datasets: {found})")
        self._check_links(f, path, name)
        try:
            dset = _open_dataset(f, name) if isinstance(path, Path) else f[name]
        except (KeyError, OSError) as e:
            if _network_failure(e):
                raise
            raise SourceError(f"{path}: dataset '{name}' cannot be opened: {one_line(e)}") from None
        if not isinstance(dset, h5py.Dataset):
            raise SourceError(f"{path}: '{name}' is a group, not a dataset")
        if isinstance(path, str):
            elsewhere = dset.file.filename != f.filename
        else:
            elsewhere = Path(dset.file.filename).resolve() != path.resolve()
        if elsewhere:  # reached through a link into another file
            self._refuse(path, name, "an external link to", dset.file.filename)
            self._linked[-1].add(dset.file.filename)
        if dset.shape is None:
            raise SourceError(f"{path}: dataset '{name}' has a null dataspace (no values at all); pipetrain needs one row per sample")
        if dset.dtype.kind == "O":
            what = "variable-length strings" if h5py.check_string_dtype(dset.dtype) else "variable-length or reference data"
            raise SourceError(f"{path}: dataset '{name}' holds {what}; pipetrain needs numbers")
        if dset.dtype.kind not in "biuf":
            raise SourceError(f"{path}: dataset '{name}' has dtype {dset.dtype}; pipetrain needs numbers")
        if dset.dtype.kind == "f" and dset.dtype.itemsize > 8:
            raise SourceError(
                f"{path}: dataset '{name}' has dtype {dset.dtype} (extended precision), which Keras "
                "cannot take; store it as float64 or float32"
            )
        if dset.ndim == 0:
            raise SourceError(f"{path}: dataset '{name}' is a scalar; pipetrain needs one row per sample")
        if dset.shape[0] == 0:
            raise SourceError(f"{path}: dataset '{name}' is empty (0 rows)")
        if 0 in dset.shape[1:]:
            raise SourceError(f"{path}: dataset '{name}' has rows of shape {dset.shape[1:]}, which hold no values")
        if name in _names(self.sample_weight, "sample_weight") and dset.shape[1:] not in ((), (1,)):
            raise SourceError(
                f"{path}: dataset '{name}' has rows of shape {dset.shape[1:]}; sample weights "
                "need one number per row"
            )
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
        target = Path(target).resolve()
        return not any(target.is_relative_to(root) for root in self._roots)

    def _refuse(self, path: Path | str, name: str, what: str, target: Path | str) -> None:
        if isinstance(path, str):
            # HDF5 opens the other file on this machine (relative to the working folder),
            # not beside the object in its bucket: never what the data meant.
            raise SourceError(
                f"{path}: dataset '{name}' is {what} {target}; HDF5 would look for that file on "
                "this machine, not beside the object, so pipetrain cannot read it (even with allow_external)"
            )
        if not self.allow_external and self._outside(target):
            raise SourceError(
                f"{path}: dataset '{name}' is {what} {target}, outside the data files' folders "
                "(allow it with allow_external=True or --allow-external)"
            )

    def _check_links(self, f: h5py.File, path: Path | str, name: str) -> None:
        """External links anywhere along the dataset's path may point anywhere on disk;
        soft links are followed to see where they lead (a soft link to an external link)."""
        todo = [p for p in name.split("/") if p not in ("", ".")]
        here, hops = "", 0
        while todo:
            step = f"{here}/{todo.pop(0)}"
            link = f.get(step, getlink=True)
            if isinstance(link, h5py.SoftLink):
                hops += 1
                if hops > 32:
                    raise SourceError(f"{path}: dataset '{name}' is a loop of soft links")
                target = link.path
                todo = [p for p in target.split("/") if p not in ("", ".")] + todo
                here = "" if target.startswith("/") else here
            elif isinstance(link, h5py.ExternalLink):
                self._refuse(path, name, "an external link to", _beside(path, link.filename))
                return  # the rest of the path lies in the other file
            elif link is None:
                return  # opening it says what is missing
            else:
                here = step

    def _check_storage(self, path: Path | str, name: str, dset: h5py.Dataset) -> None:
        for filename, _offset, _size in dset.external or ():
            filename = os.fsdecode(filename)
            if isinstance(path, str):
                target = _beside(path, filename)  # refused: see _refuse
            else:
                # HDF5 finds relative names under the access list's prefix: the data file's
                # folder (_open_dataset sets it), so the refusal checks what is read.
                prefix = os.fsdecode(dset.id.get_access_plist().get_efile_prefix() or b"")
                target = Path(prefix or os.getcwd()) / filename
            self._refuse(path, name, "stored in the external file", target)
            self._linked[-1].add(str(target))
        if dset.is_virtual:
            sources = dset.virtual_sources()
            for source in sources:
                if source.file_name != ".":
                    target = _beside(path, source.file_name)
                    self._refuse(path, name, "a virtual dataset reading", target)
                    self._linked[-1].add(str(target))
                    if not self.allow_external and not target.exists():
                        # HDF5 would look for it elsewhere (the working folder) instead
                        raise SourceError(
                            f"{path}: dataset '{name}' is a virtual dataset reading {target}, which "
                            "does not exist (allow it with allow_external=True or --allow-external)"
                        )
                    if not any(Path(p).exists() for p in _vds_places(target, source.file_name)):
                        # (HDF5 reads the rows of a source file it finds nowhere as fill values)
                        raise SourceError(
                            f"{path}: dataset '{name}' is a virtual dataset reading {target}, which does not "
                            "exist beside it, in the working folder or under $HDF5_VDS_PREFIX"
                        )
            _check_virtual_sources(path, name, dset, sources)

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
        for datasets in self._datasets:
            chunks = datasets[main].chunks
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
                    if name in self._zero_first[file]:
                        dest[...] = 0
                    reader.read_direct(dest, source_sel=np.s_[start:stop])
                    arrays[name], n = dest, dest.nbytes
                else:
                    arrays[name] = reader[start:stop]
                    n = arrays[name].nbytes
            except DamagedChunk as e:  # names the file, dataset and rows already
                raise CorruptDataError(str(e)) from e
            except OSError as e:
                where = f"{self.paths[file]}: dataset '{name}' rows {start}-{stop}"
                if isinstance(reader, ChunkReader) or _network_failure(e) or _io_error(e):
                    # the disk or the network failed (the chunk reader says a damaged
                    # chunk as DamagedChunk)
                    raise SourceReadError(located(where, e, str(self.paths[file]))) from e
                first, last = _failing_rows(reader, start, stop)
                where = f"{self.paths[file]}: dataset '{name}' rows {first}-{last}"
                # HDF5's own read failed on what the file holds (a checksum, a filter,
                # an address past the end): damaged data, not a failing disk.
                raise CorruptDataError(f"{where}: HDF5 cannot read them (damaged file?): {one_line(e)}") from e
            except Exception as e:
                raise CorruptDataError(located(f"{self.paths[file]}: dataset '{name}' rows {start}-{stop}", e,
                                               str(self.paths[file]))) from e
            fetched += n
            limit = self._label_limits.get(name)
            if limit is not None:
                self._check_labels(file, start, name, arrays[name], limit)
        self._check_unchanged(file)
        return arrays, fetched

    def _check_unchanged(self, file: int) -> None:
        """A local file written over in place (``cp new.h5 data.h5``) while it is read: its
        readers hold the same inode, so their rows were a mix of both versions, without a
        word. A file replaced by a rename is read whole from the version opened."""
        opened = self._as_opened[file]
        now = _identity(self.paths[file]) if opened is not None else None
        if now is not None and now[:2] == opened[:2] and now != opened:
            what = f"its {opened[2]:,} bytes became {now[2]:,}" if now[2] != opened[2] else "modified in place"
            raise CorruptDataError(f"{self.paths[file]}: the file changed while it was read ({what}); pipetrain "
                                   "does not mix two versions of a file")

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

    def limit_labels(self, limits: Mapping) -> None:
        """Check every read of these datasets (name -> :class:`pipetrain.labels.LabelLimit`)
        for class labels outside ``0..classes-1``: LabelRangeError names the file, dataset
        and row. ``train`` sets them from the model's sparse categorical outputs."""
        unknown = [name for name in limits if name not in self.fields]
        if unknown:
            raise SourceError(f"limit_labels: no dataset {unknown} in this source ({', '.join(self.fields)})")
        self._label_limits = dict(limits)

    def _check_labels(self, file: int, start: int, name: str, labels: np.ndarray, limit) -> None:
        flat = labels.reshape(len(labels), -1)
        if not flat.size:
            return
        low, high = flat.min(), flat.max()
        if low >= 0 and high < limit.classes:  # the whole check, nearly always (NaN fails it)
            return
        bad = ~((flat >= 0) & (flat < limit.classes))
        if limit.ignore is not None:
            bad &= flat != limit.ignore
        if not bad.any():
            return
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        value = flat[row][bad[row]][0]
        raise LabelRangeError(
            f"{self.paths[file]}: dataset '{name}' row {start + row} holds label {value}, but {limit.describe()}"
        )

    def arrange(self, arrays: Mapping[str, np.ndarray]):
        """(x, y, sample_weight) from arrays keyed by dataset name, in the given structure."""
        return _arrange(self.x, arrays), _arrange(self.y, arrays), _arrange(self.sample_weight, arrays)

    def read_path(self) -> dict[str, str]:
        """Per dataset: the read path of the first file (raw chunks or h5py, and why)."""
        from pipetrain.chunks import read_path

        def path(reader) -> str:
            if isinstance(reader, ChunkReader):
                return reader.codec
            # a URL's reason would cost a second open of its chunk reader (remote requests)
            return "h5py read" if isinstance(self.paths[0], str) else read_path(reader)

        return {name: path(self._readers[0][name]) for name in self.names}

    def fingerprint(self, file: int) -> dict:
        """What file number ``file`` is now, cheaply: a local file's size, a hash of its
        datasets' layout and chunk index, sampled bytes and modification time; an
        object's size, version (S3's ETag, GCS's generation) and layout hash, as opened.
        A resume compares it with what the run recorded (:mod:`pipetrain.fingerprint`)."""
        from pipetrain.fingerprint import of_hdf5, of_object

        path = self.paths[file]
        if isinstance(path, str):  # a URL
            opened = self.versions[path]
            return of_object(opened["size"], opened["version"], self._readers[file])
        # (the files that external links, external storage and virtual datasets read too)
        return of_hdf5(path, self._readers[file], sorted(self._linked[file]))

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
        self._readers, self._files, self._zero_first, self._datasets, self._remote = [], [], [], [], []
        self._linked, self._as_opened = [], []

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


def check_path(path: Path) -> None:
    """A data path that is an HDF5 file, or SourceError saying what it is instead."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SourceError(f"{path}: a loop of symbolic links") from None
        if os.path.islink(path):
            raise SourceError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist") from None
        if e.errno == errno.ENOENT:
            raise SourceError(f"{path}: no such file") from None
        raise SourceError(f"{path}: cannot be opened: {e.strerror}") from None
    if path.is_dir():
        raise SourceError(f"{path}: is a folder, not an HDF5 file")
    try:
        hdf5 = h5py.is_hdf5(path)
    except OSError as e:
        raise SourceError(f"{path}: cannot be read: {e.strerror or one_line(e)}") from None
    if not hdf5:
        raise SourceError(f"{path}: not an HDF5 file")


def open_failure(path: Path, exc: BaseException) -> str:
    """Why h5py could not open a file that holds the HDF5 signature, in one line."""
    if "unable to lock file" in str(exc):  # a writer holds it (a notebook, make-data still running)
        return (f"{path}: is open for writing in another process (HDF5 cannot lock it: {one_line(exc)}); "
                "close it there first")
    return f"{path}: cannot be opened as HDF5 (truncated or corrupted?): {one_line(exc)}"


def _open_dataset(f: h5py.File, name: str) -> h5py.Dataset | h5py.Group:
    """``f[name]``; a dataset stored in other files (external storage, virtual) is opened
    again so that HDF5 finds relative names of those files in the data file's folder, as
    the refusal checks them (HDF5 looks in the working folder unless told). Only those:
    HDF5 refuses to open one dataset twice with different prefixes, which would break
    anyone else opening it in this process."""
    obj = f[name]
    if not isinstance(obj, h5py.Dataset) or not (obj.is_virtual or obj.id.get_create_plist().get_external_count()):
        return obj
    obj.id.close()
    dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    dapl.set_efile_prefix(b"${ORIGIN}")
    dapl.set_virtual_prefix(b"${ORIGIN}")
    return h5py.Dataset(h5py.h5d.open(f.id, name.encode(), dapl=dapl))


def _check_virtual_sources(path: Path | str, name: str, dset: h5py.Dataset, sources) -> None:
    """Each source file of a virtual dataset (beside the data file, or the data file
    itself) holds the datasets it maps: HDF5 reads a missing one as fill values, without
    a word. Each file is opened once, however many mappings read it."""
    wanted: dict[str, set[str]] = {}
    for source in sources:
        if "%" not in source.file_name and "%" not in source.dset_name:  # (a printf-style pattern of
            wanted.setdefault(source.file_name, set()).add(source.dset_name)  # an unlimited mapping)
    for file_name, names in wanted.items():
        if file_name == ".":
            holder, where = dset.file, path
        else:
            target = _beside(path, file_name)
            if not isinstance(target, Path) or not target.is_file():
                continue  # (refused above, or found by HDF5 elsewhere: allow_external)
            try:
                holder, where = h5py.File(target, "r"), target
            except OSError as e:
                raise SourceError(f"{path}: dataset '{name}' is a virtual dataset reading {target}, which cannot "
                                  f"be opened as HDF5 ({one_line(e)}); HDF5 would read fill values there") from None
        try:
            missing = sorted(n for n in names if not isinstance(_get(holder, n), h5py.Dataset))
        finally:
            if holder is not dset.file:
                holder.close()
        if missing:
            raise SourceError(f"{path}: dataset '{name}' is a virtual dataset reading '{missing[0]}' of "
                              f"{where}, which holds no such dataset; HDF5 would read fill values there")


def _get(group: h5py.Group, name: str):
    """``group.get(name)``, None where it cannot be opened (a dangling link)."""
    try:
        return group.get(name)
    except (KeyError, OSError, ValueError):
        return None


def _check_filters(path: Path | str, name: str, dset: h5py.Dataset) -> None:
    """Filters h5py's read needs that this HDF5 lacks: load hdf5plugin's when it is
    installed, else name the package that provides them."""
    dcpl = dset.id.get_create_plist()
    codes = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
    missing = [c for c in codes if not h5py.h5z.filter_avail(c)]
    if not missing:
        return
    with contextlib.suppress(ImportError):
        import hdf5plugin  # noqa: F401  (registers its filters with HDF5)
    missing = [c for c in missing if not h5py.h5z.filter_avail(c)]
    if missing:
        names = ", ".join(FILTER_NAMES.get(c, f"filter {c}") for c in missing)
        raise SourceError(
            f"{path}: dataset '{name}' is stored with {names}, which this HDF5 cannot decode; "
            "install hdf5plugin (pip install hdf5plugin, or pip install 'pipetrain[filters]')"
        )


def _check_filter_parameters(path: Path | str, name: str, dset: h5py.Dataset) -> None:
    """The element count that HDF5 stores in the scale-offset and n-bit filters' parameters
    fits the chunk: a damaged count makes HDF5 decode part of each chunk and leave the rest
    of its buffer as it was (h5py's own reads then differ from one another)."""
    if dset.chunks is None:
        return
    dcpl = dset.id.get_create_plist()
    elements = int(np.prod(dset.chunks))
    for i in range(dcpl.get_nfilters()):
        code, _flags, values, _label = dcpl.get_filter(i)
        at = {6: 2, 5: 2}.get(code)  # scaleoffset: cd_values[2]; nbit: cd_values[2]
        if at is not None and len(values) > at and int(values[at]) != elements:
            raise SourceError(
                f"{path}: dataset '{name}' has {FILTER_NAMES[code]} parameters for chunks of "
                f"{int(values[at])} values, but its chunks hold {elements} (damaged file?)"
            )


def _check_contiguous(path: Path | str, name: str, dset: h5py.Dataset, size: int) -> None:
    """A contiguous dataset lies inside the file of ``size`` bytes (a truncated file cuts it short)."""
    dcpl = dset.id.get_create_plist()
    if dcpl.get_layout() != h5py.h5d.CONTIGUOUS or dcpl.get_external_count() or dset.is_virtual:
        return
    offset = dset.id.get_offset()
    if offset is None:
        return  # never written
    end = offset + dset.id.get_storage_size()
    if end > size:
        row_bytes = max(1, dset.id.get_storage_size() // max(1, dset.shape[0]))
        first = max(0, (size - offset) // row_bytes)
        raise SourceError(
            f"{path}: dataset '{name}' rows {first}-{dset.shape[0]} lie past the end of the file "
            f"({end} of {size} bytes: truncated?)"
        )


def _failing_rows(dset: h5py.Dataset, start: int, stop: int) -> tuple[int, int]:
    """The first chunk's worth of rows in [start, stop) that h5py cannot read (the whole
    range when none alone fails), to name them."""
    step = dset.chunks[0] if dset.chunks else max(1, (stop - start) // 64)
    first = start - start % step
    for lo in range(first, stop, step):
        a, b = max(lo, start), min(lo + step, stop)
        try:
            dset[a:b]
        except OSError:
            return a, b
    return start, stop


def _identity(path: Path) -> tuple | None:
    """(device, inode, size, modification time) of a file, or None where it cannot be had."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def _io_error(e: OSError) -> bool:
    """An operating-system read error (a failing disk), as against HDF5 refusing what the
    file holds; h5py puts the system's errno into the message of the first kind."""
    if e.errno:
        return True
    text = str(e)
    return "errno = " in text and "errno = 0," not in text


def _url_has_magic(url: str) -> bool:
    """A URL glob: ``*``, ``?`` or ``[`` in its path (a web URL's query, as in a signed
    URL, is not part of the pattern)."""
    from urllib.parse import urlsplit

    path = urlsplit(url).path if url.lower().startswith(("http://", "https://")) else url.split("://", 1)[1]
    return glob.has_magic(path)


def _vds_places(beside: Path, filename: str) -> list[Path]:
    """Where HDF5 looks for a virtual dataset's source file: beside the data file, under
    $HDF5_VDS_PREFIX, as named (an absolute name, or from the working folder). A
    printf-style name (an unlimited mapping's ``%b``) counts as found."""
    if "%" in filename:
        return [Path(".")]
    prefix = os.environ.get("HDF5_VDS_PREFIX")
    return [beside, Path(filename), *([Path(prefix) / filename] if prefix else [])]


def _beside(path: Path | str, filename: str) -> Path | str:
    """Where a file named inside ``path`` (an external link's or a virtual dataset's
    target) would be: beside it."""
    if isinstance(path, str):
        return path.rsplit("/", 1)[0] + "/" + filename
    return path.parent / filename


def _network_failure(e: BaseException) -> bool:
    """A ranged read of an object in a bucket that failed for good (also when h5py or the
    chunk reader passed it on): the network, not the file."""
    return isinstance(e, RemoteReadError) or isinstance(e.__cause__, RemoteReadError)


def _dataset_names(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names
