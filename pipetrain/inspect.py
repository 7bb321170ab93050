"""``pipetrain inspect FILE.h5|URL``: what is in an HDF5 file, and how pipetrain will read it.

For every dataset: shape, dtype, chunk shape, filters, compression ratio, and the read
path: raw chunks decoded in the producer threads (parallel, past h5py's lock) or h5py's
own read (and why).

    $ pipetrain inspect w1.h5
    w1.h5  (117.2 MB, HDF5)
    dataset  shape          dtype    chunks      filters   stored     ratio  read path
    x        (100000, 784)  float32  (256, 784)  gzip(1)   117.2 MB   2.55   raw chunks: gzip via ...
"""

from __future__ import annotations

from pathlib import Path

import h5py

from pipetrain.chunks import read_path
from pipetrain.codecs import FILTER_NAMES


def _filters(dset: h5py.Dataset) -> str:
    names = []
    if dset.shuffle:
        names.append("shuffle")
    if dset.compression:
        opts = dset.compression_opts
        names.append(f"{dset.compression}({opts})" if opts is not None and not isinstance(opts, tuple) else str(dset.compression))
    if dset.fletcher32:
        names.append("fletcher32")
    if dset.scaleoffset is not None:
        names.append(f"scaleoffset({dset.scaleoffset})")
    plist = dset.id.get_create_plist()
    built_in = {1, 2, 3, 6, 32000}  # named by h5py's properties above
    for i in range(plist.get_nfilters()):
        code = plist.get_filter(i)[0]
        if code not in built_in:
            names.append(FILTER_NAMES.get(code, f"filter {code}"))
    return "+".join(names) or "-"


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def describe(path: str | Path, storage_options: dict | None = None) -> list[dict]:
    """One row per dataset of the file or URL (nested groups included)."""
    from pipetrain.remote import is_url

    if is_url(str(path)):
        from pipetrain.h5remote import RemoteH5

        opened = RemoteH5(str(path), storage_options)
        try:
            return _describe(opened.file, opened.chunk_bytes)
        finally:
            opened.close()
    with h5py.File(path, "r") as f:
        return _describe(f)


def _describe(f: h5py.File, chunk_bytes=None) -> list[dict]:
    rows: list[dict] = []

    def visit(name: str, obj) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        stored = obj.id.get_storage_size()
        logical = obj.size * obj.dtype.itemsize
        if obj.is_virtual:
            layout = "virtual"
        elif obj.chunks is not None:
            layout = str(obj.chunks)
        else:
            layout = "contiguous"
        rows.append({
            "dataset": name,
            "shape": str(obj.shape),
            "dtype": str(obj.dtype),
            "chunks": layout,
            "filters": _filters(obj),
            "stored": _mb(stored),
            "ratio": f"{logical / stored:.2f}" if stored else "-",
            "read path": read_path(obj, chunk_bytes() if chunk_bytes else None),
        })

    f.visititems(visit)
    return rows


def render(path: str | Path, rows: list[dict], size: int | None = None) -> str:
    head = f"{path}  ({_mb(Path(path).stat().st_size if size is None else size)}, HDF5)"
    if not rows:
        return head + "\n(no datasets)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = [head, "  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    """The ``pipetrain inspect`` command."""
    from pipetrain.cli import BadInput
    from pipetrain.remote import RemoteInputError, RemoteReadError, is_url, stat

    if is_url(args.file):
        try:
            size = stat(args.file).size
            rows = describe(args.file)
        except RemoteInputError as e:
            raise BadInput(str(e)) from None
        except RemoteReadError as e:
            raise OSError(str(e)) from None
        print(render(args.file, rows, size))
        return 0
    path = Path(args.file)
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise BadInput(f"{path}: not an HDF5 file")
    try:
        rows = describe(path)
    except OSError as e:
        raise BadInput(f"{path}: cannot be opened as HDF5 (truncated or corrupted?): {e}") from None
    print(render(path, rows))
    return 0
