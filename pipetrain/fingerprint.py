"""What a data file was when a run read it: a fingerprint, cheap at terabytes, that a
resume compares so that it never continues "exactly" on other data.

A local HDF5 file's fingerprint has four parts; each catches what the others miss:

- ``size`` in bytes: rows appended or removed, another compression;
- ``layout``: a hash of each dataset's shape, dtype, chunk shape and filters and of its
  chunk index (where each chunk lies and how many bytes it takes). The raw-chunk reader
  holds the index in memory already, so this reads nothing; a compressed file written
  again from a new seed has other chunk sizes;
- ``sample``: a hash of :data:`SAMPLES` × :data:`SAMPLE_BYTES` bytes at fixed places
  through the file, its first and last bytes included: new values in an uncompressed
  file of the same layout;
- ``mtime_ns``: an edit in place that the samples missed (a few labels fixed).

:func:`changes` compares the parts both fingerprints have, in that order, and says in
words what differs. A file whose size, layout and samples match but whose modification
time does not (a copy that did not keep it, or an edit in place) counts as changed, and
the message says so: a resume is exact only on the same data, and
``allow_changed_data`` is how a user says the data is what they mean.

An object in a bucket or on a web server has no modification time to trust and every
byte sampled would be a request: its fingerprint is its ``size``, its ``version`` (S3's
and HTTP's ETag, GCS's generation: a new one whenever the object is written) and the
``layout`` hash (:func:`of_object`). Parts of any other name that a source supplies are
compared as they are.

Example::

    fp = of_hdf5("train.h5", {"x": h5py.File("train.h5")["x"]})
    changes(fp, of_hdf5("train.h5", ...))  # None, or "its bytes differ at sampled places"
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from collections.abc import Mapping

import numpy as np

SAMPLES = 8  # places sampled per file
SAMPLE_BYTES = 4096  # bytes read at each


def of_hdf5(path: str | os.PathLike, datasets: Mapping[str, object], linked=()) -> dict:
    """The fingerprint of a local HDF5 file whose ``datasets`` (name -> the raw-chunk
    reader or the h5py dataset that reads it) a run trains on; ``linked``: the other
    files those datasets are read from (an external link's, external storage, a virtual
    dataset's sources), each fingerprinted by its size and sampled bytes (``linked``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        info = os.fstat(fd)
        sample = _sample(fd, info.st_size)
    finally:
        os.close(fd)
    out = {"size": info.st_size, "layout": layout(datasets), "sample": sample, "mtime_ns": info.st_mtime_ns}
    # A file regenerated behind an external link has this file's size, layout, samples
    # and time: without its own part, a resume went on "exactly" over the new data.
    # (named from this file's folder: a data folder moved, or mounted elsewhere by another
    # process of a distributed run, keeps its fingerprints)
    folder = os.path.dirname(os.path.abspath(path))
    others = {os.path.relpath(os.path.abspath(p), folder): _contents(p) for p in linked
              if os.path.abspath(p) != os.path.abspath(path)}
    if others:
        out["linked"] = others
    return out


def _contents(path: str | os.PathLike) -> str:
    """A file's size and sampled bytes in a few characters ("missing" when there is none;
    no modification time, which a copy on another host need not share)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return "missing"
    try:
        size = os.fstat(fd).st_size
        return f"{size}:{_sample(fd, size)}"
    finally:
        os.close(fd)


def of_object(size: int, version: str | None, datasets: Mapping[str, object]) -> dict:
    """The fingerprint of an object read through ranged requests, from what opening it
    learnt: its size and version, and its datasets' layout (no request made)."""
    return {"size": size, "layout": layout(datasets), **({"version": version} if version else {})}


def _sample(fd: int, size: int) -> str:
    digest = hashlib.blake2b(digest_size=16)
    if size <= SAMPLES * SAMPLE_BYTES:
        places = [0]
        length = size
    else:
        last = size - SAMPLE_BYTES
        places = [round(i * last / (SAMPLES - 1)) for i in range(SAMPLES)]
        length = SAMPLE_BYTES
    for offset in places:
        digest.update(os.pread(fd, length, offset))
    return digest.hexdigest()


def layout(datasets: Mapping[str, object]) -> str:
    """A hash of each dataset's shape, dtype, chunking, filters and where its data lies."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(datasets):
        dataset = datasets[name]
        digest.update(name.encode() + b"\0")
        if hasattr(dataset, "index_digest"):  # the raw-chunk reader: its index is in memory
            digest.update(dataset.index_digest())
        elif not hasattr(dataset, "id"):  # another reader (a test's stand-in): its kind alone
            digest.update(type(dataset).__qualname__.encode())
        else:  # an h5py dataset read through h5py
            dcpl = dataset.id.get_create_plist()
            filters = [dcpl.get_filter(i)[:3] for i in range(dcpl.get_nfilters())]
            digest.update(repr((dataset.shape, dataset.dtype.str, dataset.chunks, filters,
                                dataset.id.get_offset(), dataset.id.get_storage_size())).encode())
    return digest.hexdigest()


def index_digest(shape, dtype: np.dtype, chunks, filters, *arrays: np.ndarray) -> bytes:
    """What :func:`layout` hashes for a chunked dataset read from raw chunks."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((tuple(shape), np.dtype(dtype).str, tuple(chunks), tuple(filters))).encode())
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.digest()


ORDER = ("size", "layout", "sample", "linked", "version")  # compared first; mtime_ns last


def changes(then: Mapping, now: Mapping) -> str | None:
    """What differs between two fingerprints of a file, in words, or None."""
    keys = [k for k in ORDER if k in then and k in now]
    keys += [k for k in then if k in now and k not in ORDER and k != "mtime_ns"]
    for key in keys:
        if then[key] != now[key]:
            if key == "size":
                return f"its size went from {then[key]:,} to {now[key]:,} bytes"
            if key == "layout":
                return "its datasets' shape, chunks or chunk index differ"
            if key == "sample":
                return "its bytes differ at sampled places"
            if key == "linked":
                other = sorted(f for f in {*then[key], *now[key]} if then[key].get(f) != now[key].get(f))[0]
                return f"{other}, which its datasets are read from, changed (its size or sampled bytes differ)"
            return f"its {key} went from {then[key]!r} to {now[key]!r}"
    if "mtime_ns" in then and "mtime_ns" in now and then["mtime_ns"] != now["mtime_ns"]:
        names = [{"sample": "sampled bytes", "linked": "linked files"}.get(k, k) for k in keys]
        same = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        return (f"it was modified at {_time(now['mtime_ns'])} (it was {_time(then['mtime_ns'])} "
                f"when the run read it)" + (f", though its {same} are the same" if same else ""))
    return None


def _time(ns) -> str:
    try:
        return _dt.datetime.fromtimestamp(ns / 1e9).astimezone().isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return repr(ns)


def changed_files(then: list[dict] | None, now: list[dict] | None) -> list[str]:
    """The files (by role and position) whose fingerprint changed, each as "FILE changed
    since the run read it (what)"; nothing when either side has no fingerprints (a
    checkpoint from before they were recorded)."""
    if not then or not now:
        return []
    before = {(f.get("role"), i): f for role in {f.get("role") for f in then}
              for i, f in enumerate(f for f in then if f.get("role") == role)}
    out = []
    for role in dict.fromkeys(f.get("role") for f in now):
        for i, current in enumerate(f for f in now if f.get("role") == role):
            recorded = before.get((role, i))
            what = changes(recorded["fingerprint"], current["fingerprint"]) if recorded is not None else None
            if what:
                out.append(f"{current.get('file')} changed since the run read it ({what})")
    return out
