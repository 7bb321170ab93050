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

from pipetrain.codecs import FILTER_NAMES
from pipetrain.errors import InputError, one_line


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
    """One row per dataset of the file or URL (nested groups included). The read path
    column says how training reads it, or why training refuses it (from the same checks)."""
    from pipetrain.remote import is_url

    rows: list[dict] = []

    def visit(f: h5py.File) -> None:
        # Every link, soft and external ones too (visititems passes them by): a dataset
        # reached through one is listed, a link that leads nowhere too (its read path
        # says why training refuses it).
        names: list[str] = []
        (f.visit_links if hasattr(f, "visit_links") else f.visit)(names.append)  # (h5py < 3.11: hard links)
        for name in names:
            link = f.get(name, getlink=True)
            try:
                obj = f[name]
            except (KeyError, OSError, ValueError, RuntimeError):  # a dangling link, a file that cannot be
                # opened, a loop of soft links (RuntimeError: too many links)
                if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
                    rows.append({"dataset": name, "shape": "?", "dtype": "?", "chunks": "?", "filters": "?",
                                 "stored": "-", "ratio": "-", "read path": ""})
                continue
            if isinstance(obj, h5py.Dataset):
                rows.append(_dataset_row(name, obj))

    if is_url(str(path)):
        from pipetrain.h5remote import RemoteH5

        opened = RemoteH5(str(path), storage_options)
        try:
            visit(opened.file)
        finally:
            opened.close()
    else:
        with h5py.File(path, "r") as f:
            visit(f)
    for row in rows:  # with the file closed: H5Source opens some datasets its own way
        row["read path"] = _read_path(path, row["dataset"], storage_options)
    return rows


def _dataset_row(name: str, obj: h5py.Dataset) -> dict:
    def attempt(fn, default="?"):
        try:
            return fn()
        except Exception:  # a damaged header: show what can be shown
            return default

    stored = attempt(obj.id.get_storage_size, 0)
    logical = attempt(lambda: (obj.size or 0) * obj.dtype.itemsize, 0)

    def layout() -> str:
        if obj.is_virtual:
            return "virtual"
        return str(obj.chunks) if obj.chunks is not None else "contiguous"

    def dtype() -> str:
        if obj.dtype.kind == "O":
            return "vlen str" if h5py.check_string_dtype(obj.dtype) else "vlen/reference"
        return str(obj.dtype)

    return {
        "dataset": name,
        "shape": attempt(lambda: "null" if obj.shape is None else str(obj.shape)),
        "dtype": attempt(dtype),
        "chunks": attempt(layout),
        "filters": attempt(lambda: _filters(obj)),
        "stored": _mb(stored),
        "ratio": f"{logical / stored:.2f}" if stored else "-",
        "read path": "",
    }


def _read_path(path: str | Path, name: str, storage_options: dict | None = None) -> str:
    """How training reads the dataset (opened as training opens it), or why it refuses it."""
    from pipetrain.source import H5Source, SourceReadError

    try:
        with H5Source(path, x=name, storage_options=storage_options) as source:
            return source.read_path()[name]
    except InputError as e:
        text = one_line(e)
        for prefix in (f"{path}: ", f"dataset '{name}' "):
            text = text.removeprefix(prefix)
        return f"refused: {text}"
    except SourceReadError:
        raise  # the disk or the network failed: not a property of the dataset
    except Exception as e:  # a damaged file can make h5py raise anything
        return f"refused: {one_line(e, with_type=True)}"


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
    from pipetrain.source import SourceError, SourceReadError, check_path, open_failure

    if is_url(args.file):
        try:
            size = stat(args.file).size
            rows = describe(args.file)
        except RemoteInputError as e:
            raise BadInput(str(e)) from None
        except (RemoteReadError, SourceReadError) as e:  # the network failed: not bad input
            raise OSError(str(e)) from None
        print(render(args.file, rows, size))
        return 0
    path = Path(args.file)
    try:
        check_path(path)
    except SourceError as e:
        raise BadInput(str(e)) from None
    try:
        rows = describe(path)
    except SourceReadError:
        raise  # the disk failed: not bad input
    except Exception as e:  # OSError, or others from a damaged file
        raise BadInput(open_failure(path, e)) from None
    print(render(path, rows))
    return 0
