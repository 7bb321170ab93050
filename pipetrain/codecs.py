"""HDF5 filters and the libraries that undo them, in the calling thread.

Each filter of a dataset's pipeline becomes a :class:`Stage` whose ``decode`` turns the
stored bytes back into that filter's input, with a codec that releases the GIL:
deflate/gzip through libdeflate (imagecodecs or the ``deflate`` package), ISA-L or zlib;
lzf, blosc, lz4, zstd and bitshuffle through imagecodecs, numcodecs or lz4 when
installed; the byte shuffle with numpy. :func:`stages` builds the pipeline of a
dataset, or says in one line why it cannot (an unsupported filter, a missing package),
so that :mod:`pipetrain.chunks` falls back to h5py's own read. Which installed library
decodes fastest depends on the data, so :func:`fastest` times them on one stored chunk.
"""

from __future__ import annotations

import importlib
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FILTER_NAMES", "SHUFFLE", "Stage", "fastest", "stages", "unshuffle_planes"]

# HDF5 filter ids (H5Zpublic.h and the registered-filter list).
_GZIP, SHUFFLE, _FLETCHER32, _SZIP, _NBIT, _SCALEOFFSET = 1, 2, 3, 4, 5, 6
_LZF, _BLOSC, _LZ4, _BITSHUFFLE, _ZSTD, _BLOSC2 = 32000, 32001, 32004, 32008, 32015, 32026

FILTER_NAMES = {
    _GZIP: "gzip",
    SHUFFLE: "shuffle",
    _FLETCHER32: "fletcher32",
    _SZIP: "szip",
    _NBIT: "nbit",
    _SCALEOFFSET: "scaleoffset",
    _LZF: "lzf",
    _BLOSC: "blosc",
    _LZ4: "lz4",
    _BITSHUFFLE: "bitshuffle",
    _ZSTD: "zstd",
    _BLOSC2: "blosc2",
}

# Decoder back ends per filter, in the order tried when no chunk is at hand to time them
# (fastest(), below). gzip, measured with benchmarks/bench_decode.py (256 x 784 float32
# chunks, gzip level 1, one thread, whole batches), image-like rows: libdeflate through
# imagecodecs ~2.4 GB/s (it inflates straight into the output array), through the
# `deflate` package ~2.3 GB/s, ISA-L ~1.35 GB/s, zlib ~0.5 GB/s (h5py's own read ~0.5
# GB/s); the noise-like rows of `make-data` (--data make-data), which gzip shrinks 2.7x:
# ISA-L 417 MB/s, libdeflate 353-357, zlib 210. All of them release the GIL.
_BACKENDS: dict[str, tuple[str, ...]] = {
    "gzip": ("imagecodecs", "libdeflate", "isal", "zlib"),
    "lzf": ("imagecodecs",),
    "blosc": ("imagecodecs", "numcodecs"),
    "lz4": ("imagecodecs", "lz4"),
    "zstd": ("imagecodecs", "numcodecs"),
    "bitshuffle": ("imagecodecs",),
}
_PIP_HINT = {
    "lzf": "imagecodecs",
    "blosc": "imagecodecs",
    "lz4": "lz4",
    "zstd": "imagecodecs",
    "bitshuffle": "imagecodecs",
}

# A decoder turns one stage's stored bytes back into its input. It writes into `dest`
# (a uint8 array of exactly the decoded size) when it can, else returns a new buffer.
_Decoder = Callable[[Any, "np.ndarray | None"], Any]


def _module(name: str):
    """The module `name`, or None when it is not installed (codec packages are optional)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


@dataclass(frozen=True)
class Stage:
    """One filter of the dataset's pipeline and how to undo it."""

    name: str  # "gzip", "shuffle", ...
    via: str  # the library that decodes it, for humans
    decode: _Decoder
    shuffle_itemsize: int = 0  # > 0 for the byte-shuffle filter: unshuffled while placing
    backend: str = ""  # the key in _BACKENDS of the library that decodes it


# ----------------------------------------------------------------------------- decoders


def _imagecodecs(function: str, nbytes: int, label: str = "imagecodecs", **options):
    """An imagecodecs decoder that writes into `dest` (or a new buffer of `nbytes`)."""
    ic = _module("imagecodecs")
    decode = getattr(ic, function, None) if ic is not None else None
    if decode is None:
        return None
    return (lambda src, dest: decode(src, out=nbytes if dest is None else dest, **options)), label


def _gzip_decoder(backend: str, nbytes: int) -> tuple[_Decoder, str] | None:
    if backend == "imagecodecs":
        return _imagecodecs("deflate_decode", nbytes, "libdeflate (imagecodecs)")
    if backend == "libdeflate":
        lib = _module("deflate")
        if lib is None:
            return None
        return (lambda src, dest: lib.zlib_decompress(src, nbytes)), "libdeflate"
    if backend == "isal":
        isal_zlib = _module("isal.isal_zlib")
        if isal_zlib is None:
            return None
        return (lambda src, dest: isal_zlib.decompress(src, 15, nbytes)), "isal"
    if backend == "zlib":
        return (lambda src, dest: zlib.decompress(src, 15, nbytes)), "zlib"
    return None


def _lzf_decoder(backend: str, nbytes: int) -> tuple[_Decoder, str] | None:
    # h5py's lzf filter stores a bare LZF stream, no header.
    return _imagecodecs("lzf_decode", nbytes, header=False) if backend == "imagecodecs" else None


def _blosc_decoder(backend: str, nbytes: int) -> tuple[_Decoder, str] | None:
    if backend == "imagecodecs":  # one blosc thread: our callers are the threads
        return _imagecodecs("blosc_decode", nbytes, numthreads=1)
    if backend == "numcodecs":
        blosc = _module("numcodecs.blosc")
        if blosc is None:
            return None

        def decode(src, dest):
            target = np.empty(nbytes, np.uint8) if dest is None else dest
            blosc.decompress(src, target)
            return target

        return decode, "numcodecs"
    return None


def _lz4_hdf5_frames(src, dest: np.ndarray | None, nbytes: int, decompress_block) -> np.ndarray:
    """Undo HDF5's lz4 filter framing (filter 32004) with `decompress_block(data, size)`.

    The frame: 8-byte big-endian total size, 4-byte big-endian block size, then per
    block a 4-byte big-endian stored size and the data; a block whose stored size equals
    its raw size was kept uncompressed.
    """
    view = memoryview(src).cast("B")
    total = int.from_bytes(view[0:8], "big")
    block = int.from_bytes(view[8:12], "big")
    if total != nbytes or block <= 0:
        raise ValueError(f"lz4 header says {total} bytes in blocks of {block}, expected {nbytes}")
    out = np.empty(nbytes, np.uint8) if dest is None else dest
    pos, done = 12, 0
    while done < total:
        raw = min(block, total - done)
        stored = int.from_bytes(view[pos : pos + 4], "big")
        pos += 4
        if pos + stored > len(view):
            raise ValueError(f"lz4 block at byte {pos} runs past the end of the chunk")
        data = view[pos : pos + stored]
        out[done : done + raw] = np.frombuffer(
            data if stored == raw else decompress_block(data, raw), np.uint8
        )
        pos += stored
        done += raw
    return out


def _lz4_decoder(backend: str, nbytes: int) -> tuple[_Decoder, str] | None:
    if backend == "imagecodecs":
        return _imagecodecs("lz4h5_decode", nbytes)
    if backend == "lz4":
        lz4_block = _module("lz4.block")
        if lz4_block is None:
            return None

        def block(data, size):
            return lz4_block.decompress(data, uncompressed_size=size)

        return (lambda src, dest: _lz4_hdf5_frames(src, dest, nbytes, block)), "lz4"
    return None


def _zstd_decoder(backend: str, nbytes: int) -> tuple[_Decoder, str] | None:
    found = None
    if backend == "imagecodecs":
        found = _imagecodecs("zstd_decode", nbytes)
    elif backend == "numcodecs":
        zstd = _module("numcodecs.zstd")
        if zstd is not None:
            codec = zstd.Zstd()
            found = (lambda src, dest: codec.decode(src, out=dest)), "numcodecs"
    if found is None:
        return None
    decode, label = found

    def one_frame(src, dest):
        size = _zstd_content_size(memoryview(src).cast("B"))
        if size is not None and size != nbytes:  # HDF5's filter decodes the first frame alone: refused, not guessed
            raise ValueError(f"its zstd frame holds {size} bytes, the chunk {nbytes} (several frames?)")
        return decode(src, dest)

    return one_frame, label


def _zstd_content_size(view: memoryview) -> int | None:
    """The content size a zstd frame's header declares (None: not declared, or not a
    frame: the decoder says what is wrong)."""
    if len(view) < 6 or int.from_bytes(view[:4], "little") != 0xFD2FB528:
        return None
    descriptor = view[4]
    single = descriptor >> 5 & 1
    fcs_bytes = (1 if single else 0, 2, 4, 8)[descriptor >> 6]
    at = 5 + (0 if single else 1) + (0, 1, 2, 4)[descriptor & 3]  # after the window byte and the dictionary id
    if not fcs_bytes or len(view) < at + fcs_bytes:
        return None
    size = int.from_bytes(view[at : at + fcs_bytes], "little")
    return size + 256 if fcs_bytes == 2 else size


def _bitshuffle_decoder(backend: str, nbytes: int, cd_values: tuple[int, ...]):
    """Bitshuffle (filter 32008), optionally with lz4 (cd_values[4] == 2) or zstd (3).

    Compressed, a chunk is: 8-byte big-endian decoded size, 4-byte big-endian block
    size in bytes, then each block of `block` elements (the last one cut to a multiple
    of 8 elements) as a 4-byte big-endian stored size and the compressed bit-shuffled
    bytes, then the last `count % 8` elements as they are. Undone here by decompressing
    the blocks back to back and bit-unshuffling the whole buffer with the same block size.
    """
    ic = _module("imagecodecs") if backend == "imagecodecs" else None
    if ic is None or not hasattr(ic, "bitshuffle_decode") or len(cd_values) < 3:
        return None
    itemsize = cd_values[2]
    block_elems = cd_values[3] if len(cd_values) > 3 else 0
    compression = cd_values[4] if len(cd_values) > 4 else 0
    if itemsize <= 0 or nbytes % itemsize:
        return None
    if compression == 0:

        def plain(src, dest):
            return ic.bitshuffle_decode(
                memoryview(src),
                itemsize=itemsize,
                blocksize=block_elems,
                out=np.empty(nbytes, np.uint8) if dest is None else dest,
            )

        return plain, "imagecodecs"
    if compression == 2:
        block_codec, label = (lambda data, out: ic.lz4_decode(data, header=False, out=out)), "lz4"
    elif compression == 3:
        block_codec, label = (lambda data, out: ic.zstd_decode(data, out=out)), "zstd"
    else:
        return None

    def compressed(src, dest):
        view = memoryview(src).cast("B")
        total = int.from_bytes(view[0:8], "big")
        block = int.from_bytes(view[8:12], "big") // itemsize
        if total != nbytes or block <= 0 or block % 8:
            raise ValueError(f"bitshuffle header says {total} bytes, blocks of {block} elements")
        count = total // itemsize
        shuffled = np.empty(total, np.uint8)
        pos, done = 12, 0
        while count - done >= 8:
            size = min(block, count - done)
            size -= size % 8
            stored = int.from_bytes(view[pos : pos + 4], "big")
            pos += 4
            if pos + stored > len(view):  # (a slice would cut it short where the filter fails)
                raise ValueError(f"a bitshuffle block of {stored} bytes at byte {pos} runs past the chunk's {len(view)}")
            target = shuffled[done * itemsize : (done + size) * itemsize]
            got = block_codec(view[pos : pos + stored], target)
            if got is not target:
                target[:] = np.frombuffer(got, np.uint8)
            pos += stored
            done += size
        tail = (count - done) * itemsize
        if pos + tail > len(view):
            raise ValueError(f"the bitshuffle chunk ends at byte {len(view)}, before its last {tail} bytes")
        shuffled[done * itemsize :] = np.frombuffer(view[pos : pos + tail], np.uint8)
        return ic.bitshuffle_decode(
            memoryview(shuffled),
            itemsize=itemsize,
            blocksize=block,
            out=np.empty(nbytes, np.uint8) if dest is None else dest,
        )

    return compressed, f"imagecodecs ({label} blocks)"


def unshuffle_planes(planes: np.ndarray, dest: np.ndarray) -> None:
    """Undo HDF5's byte shuffle: `planes` (itemsize, *shape) holds byte k of every element
    in plane k; write the elements into `dest` (shape, any dtype of that itemsize, any strides).

    For 2-, 4- and 8-byte items the planes are combined as little-endian integers with
    whole-array shifts and ORs (about 5x faster than numpy's byte-wise transposing copy);
    other sizes take the transposing copy.
    """
    itemsize = planes.shape[0]
    if itemsize in (2, 4, 8):
        words = dest.view(f"<u{itemsize}")
        np.copyto(words, planes[itemsize - 1], casting="safe")
        for k in range(itemsize - 2, -1, -1):
            words <<= 8
            words |= planes[k]
    else:
        as_bytes = dest.view(np.uint8).reshape(dest.shape + (itemsize,))
        np.copyto(as_bytes, np.moveaxis(planes, 0, -1))


def _unshuffle_decoder(itemsize: int) -> _Decoder:
    """Byte-unshuffle a whole buffer; used only when shuffle is not the outermost filter,
    so its input can be any length: HDF5 leaves the last `len % itemsize` bytes as they are."""

    def decode(src, dest):
        data = np.frombuffer(src, np.uint8)
        out = dest if dest is not None and dest.size == data.size else np.empty_like(data)
        body = data.size - data.size % itemsize
        unshuffle_planes(data[:body].reshape(itemsize, -1), out[:body].view(f"V{itemsize}"))
        out[body:] = data[body:]
        return out

    return decode


_COMPRESSORS = {
    "gzip": _gzip_decoder,
    "lzf": _lzf_decoder,
    "blosc": _blosc_decoder,
    "lz4": _lz4_decoder,
    "zstd": _zstd_decoder,
}


def stages(
    dcpl, dtype: np.dtype, chunk_nbytes: int, prefer: dict[str, str]
) -> list[Stage | None] | str:
    """The pipeline's stages in file order (None for a no-op stage), or why we cannot undo it."""
    stages: list[Stage | None] = []
    compressors = []
    for index in range(dcpl.get_nfilters()):
        code, _flags, cd_values, _label = dcpl.get_filter(index)
        name = FILTER_NAMES.get(code, f"id {code}")
        cd_values = tuple(int(v) for v in cd_values)
        if code == SHUFFLE:
            itemsize = cd_values[0] if cd_values else dtype.itemsize
            if itemsize != dtype.itemsize:
                return f"shuffle element size {itemsize} differs from the dtype's {dtype.itemsize}"
            # HDF5 skips shuffling for one-byte elements.
            stages.append(
                None
                if itemsize <= 1
                else Stage("shuffle", "numpy", _unshuffle_decoder(itemsize), itemsize)
            )
            continue
        if name not in _BACKENDS:
            return f"filter {name} is not supported"
        candidates = (prefer[name],) if name in prefer else _BACKENDS[name]
        found = None
        for backend in candidates:
            if name == "bitshuffle":
                found = _bitshuffle_decoder(backend, chunk_nbytes, cd_values)
            else:
                found = _COMPRESSORS[name](backend, chunk_nbytes)
            if found is not None:
                found = (*found, backend)
                break
        if found is None:
            if name in prefer:
                return f"{name} decoder {prefer[name]!r} is not available"
            if name == "bitshuffle" and _module("imagecodecs") is not None:
                return f"bitshuffle with options {cd_values} is not supported"
            packages = " or ".join(candidates)
            return f"{name} needs {packages} (pip install {_PIP_HINT[name]})"
        stages.append(Stage(name, found[1], found[0], backend=found[2]))
        if name != "bitshuffle" or (len(cd_values) > 4 and cd_values[4]):
            compressors.append(name)
    if len(compressors) > 1:
        return f"more than one compression filter ({'+'.join(compressors)})"
    return stages


# The choice of fastest(), per kind of chunk: the files of one data set are alike, and
# timing costs a few milliseconds a dataset.
_FASTEST: dict[tuple, str] = {}
_FASTEST_LOCK = threading.Lock()


def fastest(pipeline: list[Stage | None], stored: Callable[[], bytes | None], chunk_nbytes: int, kind: tuple,
            repeat: int = 2) -> list[Stage | None]:
    """``pipeline`` with the decoder of its last filter (the first undone) swapped for the
    installed one that decodes ``stored()`` (one chunk as the file holds it, or None)
    fastest, best of ``repeat`` interleaved runs. ``kind`` names the sort of chunk (the
    dataset, its dtype and chunk shape): the first chunk timed decides for all of its kind."""
    last = pipeline[-1] if pipeline else None
    if last is None or last.name not in _COMPRESSORS or len(_BACKENDS[last.name]) < 2:
        return pipeline
    key = (last.name, chunk_nbytes, *kind)
    with _FASTEST_LOCK:
        chosen = _FASTEST.get(key)
    if chosen is None:
        sample = stored()
        chosen = _time(last.name, sample, chunk_nbytes, repeat) if sample is not None else None
        if chosen is None:  # (not kept: a later chunk of this kind may be timed)
            return pipeline
        with _FASTEST_LOCK:
            _FASTEST[key] = chosen
    if chosen == last.backend:
        return pipeline
    decode, via = _COMPRESSORS[last.name](chosen, chunk_nbytes)
    return [*pipeline[:-1], Stage(last.name, via, decode, backend=chosen)]


def _time(name: str, stored: bytes, chunk_nbytes: int, repeat: int) -> str | None:
    """The back end of filter ``name`` that decodes ``stored`` fastest, or None when fewer
    than two decode it, or two decode it differently (the order of _BACKENDS then stands)."""
    decoders = {}
    for backend in _BACKENDS[name]:
        found = _COMPRESSORS[name](backend, chunk_nbytes)
        if found is not None:
            decoders[backend] = found[0]
    if len(decoders) < 2:
        return None
    best = dict.fromkeys(decoders, float("inf"))
    dest = np.empty(chunk_nbytes, np.uint8)
    expected = None
    for round_ in range(repeat):
        for backend, decode in decoders.items():
            start = time.perf_counter()
            try:
                got = decode(stored, dest)
            except Exception:  # noqa: BLE001 - a damaged chunk is the reader's to say, in its words
                return None
            best[backend] = min(best[backend], time.perf_counter() - start)
            if round_ == 0:
                data = bytes(memoryview(got).cast("B"))
                if expected is not None and data != expected:
                    return None
                expected = data
    return min(best, key=best.get)
