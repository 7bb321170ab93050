"""The raw-chunk reader returns exactly the bytes h5py's own read returns, or says why not."""

from __future__ import annotations

import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import pytest

from pipetrain import chunks, codecs
from pipetrain.chunks import ChunkReader, open_chunk_reader, read_path

ROWS = 203  # not a multiple of any chunk row count used here
# Ranges that start and end mid-chunk, span several chunks, touch the edges, or are empty.
RANGES = [(0, ROWS), (5, 17), (13, 150), (31, 33), (32, 64), (ROWS - 1, ROWS), (100, 100), (0, 1)]


def sample(shape, dtype, seed=0) -> np.ndarray:
    """Compressible rows first, then incompressible bytes (so optional filters get skipped)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.3
    data = rng.integers(0, 7, shape).astype(dtype)
    noisy = slice(shape[0] * 2 // 3, None)
    data[noisy] = np.frombuffer(rng.bytes(data[noisy].nbytes), dtype).reshape(data[noisy].shape)
    return data


def write(path, data, chunks=(32, 12), name="x", **options) -> str:
    with h5py.File(path, "w") as f:
        f.create_dataset(name, data=data, chunks=chunks, **options)
    return str(path)


def assert_reads_like_h5py(reader: ChunkReader, dset: h5py.Dataset, ranges=RANGES) -> None:
    for start, stop in ranges:
        ours, _ = reader.read(start, stop)
        theirs = dset[start:stop]
        assert ours.dtype == theirs.dtype, (start, stop)
        np.testing.assert_array_equal(ours, theirs)
        assert ours.tobytes() == theirs.tobytes(), (start, stop)


def opened(dset, **prefer) -> ChunkReader:
    reader = chunks._open_chunk_reader(dset, prefer or None)
    assert isinstance(reader, ChunkReader), reader
    return reader


GZIP_BACKENDS = {
    "imagecodecs": "imagecodecs",
    "libdeflate": "deflate",
    "isal": "isal",
    "zlib": "zlib",
}


def gzip_backend(backend: str) -> str:
    """`backend`, after skipping the test when its package is not installed."""
    pytest.importorskip(GZIP_BACKENDS[backend])
    return backend


def plugin(name: str, **kwargs) -> dict:
    hdf5plugin = pytest.importorskip("hdf5plugin")
    return dict(getattr(hdf5plugin, name)(**kwargs))


FILTERS = {
    "none": lambda: {},
    "gzip-1": lambda: {"compression": "gzip", "compression_opts": 1},
    "gzip-4": lambda: {"compression": "gzip", "compression_opts": 4},
    "gzip-9": lambda: {"compression": "gzip", "compression_opts": 9},
    "shuffle": lambda: {"shuffle": True},
    "shuffle+gzip": lambda: {"compression": "gzip", "shuffle": True},
    "lzf": lambda: {"compression": "lzf"},
    "shuffle+lzf": lambda: {"compression": "lzf", "shuffle": True},
    "blosc-lz4": lambda: plugin("Blosc", cname="lz4"),
    "blosc-zstd-bitshuffle": lambda: plugin("Blosc", cname="zstd", shuffle=2),
    "lz4": lambda: plugin("LZ4"),
    "lz4-small-blocks": lambda: plugin("LZ4", nbytes=96),
    "zstd": lambda: plugin("Zstd"),
    "shuffle+zstd": lambda: {"shuffle": True, **plugin("Zstd")},
    "bitshuffle": lambda: plugin("Bitshuffle", cname="none"),
    "bitshuffle-lz4": lambda: plugin("Bitshuffle"),
    "bitshuffle-zstd": lambda: plugin("Bitshuffle", cname="zstd"),
}
DTYPES = ["uint8", "int16", "int64", "float32", "float64", ">i4", ">f8"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FILTERS)
def test_every_filter_and_dtype_reads_like_h5py(tmp_path, name, dtype):
    options = FILTERS[name]()
    # 7 columns: chunks of 11 rows hold 77 elements, not a multiple of 8 (bitshuffle's tail).
    path = write(tmp_path / "f.h5", sample((ROWS, 7), dtype), chunks=(11, 7), **options)
    with h5py.File(path, "r") as f, opened(f["x"]) as reader:
        assert reader.shape == f["x"].shape and reader.chunks == f["x"].chunks
        assert reader.dtype == f["x"].dtype
        assert_reads_like_h5py(reader, f["x"])


@pytest.mark.parametrize("dtype", ["bool", "float16", "complex64", "<u4"])
def test_other_numeric_dtypes(tmp_path, dtype):
    path = write(tmp_path / "f.h5", sample((ROWS, 12), dtype), compression="gzip", shuffle=True)
    with h5py.File(path, "r") as f, opened(f["x"]) as reader:
        assert_reads_like_h5py(reader, f["x"])


@pytest.mark.parametrize("backend", GZIP_BACKENDS)
def test_each_gzip_backend(tmp_path, backend):
    gzip_backend(backend)
    path = write(tmp_path / "f.h5", sample((ROWS, 12), "float32"), compression="gzip", shuffle=True)
    with h5py.File(path, "r") as f, opened(f["x"], gzip=backend) as reader:
        assert backend in reader.codec
        assert_reads_like_h5py(reader, f["x"])


@pytest.mark.parametrize(
    ("name", "backend", "module"),
    [
        ("lz4", "imagecodecs", "imagecodecs"),
        ("lz4", "lz4", "lz4.block"),
        ("zstd", "imagecodecs", "imagecodecs"),
        ("zstd", "numcodecs", "numcodecs.zstd"),
        ("blosc", "imagecodecs", "imagecodecs"),
        ("blosc", "numcodecs", "numcodecs.blosc"),
    ],
)
def test_each_backend_of_the_plugin_filters(tmp_path, name, backend, module):
    pytest.importorskip(module)
    options = {
        "lz4": lambda: plugin("LZ4", nbytes=200),
        "zstd": lambda: plugin("Zstd"),
        "blosc": lambda: plugin("Blosc"),
    }[name]()
    path = write(tmp_path / "f.h5", sample((ROWS, 12), "int16"), **options)
    with h5py.File(path, "r") as f, opened(f["x"], **{name: backend}) as reader:
        assert_reads_like_h5py(reader, f["x"])


@pytest.mark.parametrize(
    ("shape", "chunk_shape"),
    [
        ((ROWS, 28), (16, 11)),  # rows split into three chunks, the last one partial
        ((ROWS, 784), (64, 392)),  # W1 rows split in halves
        ((ROWS, 8, 8), (64, 4, 4)),
        ((ROWS, 8, 8), (7, 3, 5)),  # edge chunks in every dimension
        ((ROWS, 5, 6), (10, 5, 6)),
    ],
)
@pytest.mark.parametrize("options", [{}, {"compression": "gzip", "shuffle": True}])
def test_chunks_that_split_rows(tmp_path, shape, chunk_shape, options):
    path = write(tmp_path / "f.h5", sample(shape, "float32"), chunks=chunk_shape, **options)
    with h5py.File(path, "r") as f, opened(f["x"]) as reader:
        assert_reads_like_h5py(reader, f["x"])


def test_shuffle_applied_after_compression(tmp_path):
    """A pipeline in unusual order, [gzip, shuffle]: shuffle then runs on compressed bytes."""
    data = sample((ROWS, 12), "float64")
    with h5py.File(tmp_path / "f.h5", "w") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((32, 12))
        dcpl.set_deflate(1)
        dcpl.set_shuffle()
        space = h5py.h5s.create_simple(data.shape)
        dsid = h5py.h5d.create(f.id, b"x", h5py.h5t.IEEE_F64LE, space, dcpl=dcpl)
        h5py.Dataset(dsid)[...] = data
    with h5py.File(tmp_path / "f.h5", "r") as f, opened(f["x"]) as reader:
        assert reader.filters == ("gzip", "shuffle")
        assert any(size % 8 for size in reader._sizes.ravel())  # some stored sizes leave a tail
        assert_reads_like_h5py(reader, f["x"])


def test_one_dimensional_labels(tmp_path):
    labels = np.arange(ROWS, dtype=np.int64) % 10
    path = write(tmp_path / "f.h5", labels, chunks=(32,), compression="gzip")
    with h5py.File(path, "r") as f, opened(f["x"]) as reader:
        assert_reads_like_h5py(reader, f["x"])


def test_bytes_fetched_are_the_stored_chunk_sizes(tmp_path):
    path = write(tmp_path / "f.h5", sample((ROWS, 12), "float32"), compression="gzip")
    with h5py.File(path, "r") as f, opened(f["x"]) as reader:
        _, fetched = reader.read(0, ROWS)
        assert fetched == f["x"].id.get_storage_size()
        stored = f["x"].id.get_chunk_info_by_coord((32, 0)).size
        assert reader.read(40, 50)[1] == stored


def test_unwritten_chunks_read_as_the_fill_value(tmp_path):
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        d = f.create_dataset(
            "x",
            shape=(ROWS, 8, 6),
            dtype=">i2",
            chunks=(10, 4, 3),
            fillvalue=-7,
            compression="gzip",
        )
        d[20:30] = 1  # one whole row-chunk
        d[55:62, :4, 3:] = 2  # parts of two row-chunks, one chunk column
    with h5py.File(path, "r") as f, opened(f["x"]) as reader:
        assert f["x"].id.get_num_chunks() == 4 + 2
        assert_reads_like_h5py(reader, f["x"], RANGES + [(0, 10), (60, 70)])
        rows, fetched = reader.read(100, 120)
        assert fetched == 0 and (rows == -7).all()


def test_unwritten_chunks_when_hdf5_never_fills(tmp_path):
    """Fill time "never": HDF5 leaves the buffer alone and h5py's read gives zeros."""
    with h5py.File(tmp_path / "f.h5", "w") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((10, 4))
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        dcpl.set_fill_value(np.array(-7, "i4"))
        space = h5py.h5s.create_simple((ROWS, 4))
        h5py.h5d.create(f.id, b"x", h5py.h5t.STD_I32LE, space, dcpl=dcpl)
        f["x"][30:40] = 5
    with h5py.File(tmp_path / "f.h5", "r") as f, opened(f["x"]) as reader:
        assert_reads_like_h5py(reader, f["x"])


def test_userblock(tmp_path):
    path = tmp_path / "f.h5"
    with h5py.File(path, "w", userblock_size=4096) as f:
        f.create_dataset(
            "x",
            data=sample((ROWS, 12), "float32"),
            chunks=(32, 12),
            compression="gzip",
            shuffle=True,
        )
        f.create_dataset("raw", data=sample((ROWS, 12), "int16"), chunks=(32, 12))
    with open(path, "r+b") as raw:
        raw.write(b"user block text, HDF5 ignores it")
    with h5py.File(path, "r") as f:
        assert f.userblock_size == 4096
        for name in ("x", "raw"):
            with opened(f[name]) as reader:
                assert_reads_like_h5py(reader, f[name])


@pytest.mark.skipif(
    h5py.version.hdf5_version_tuple < (1, 14, 4),
    reason="older HDF5 reported chunk addresses without the userblock",
)
def test_chunk_addresses_already_include_the_userblock(tmp_path):
    """A fact the reader relies on (and checks at open): HDFGroup/hdf5#3003, fixed in 1.14.4."""
    path = write(tmp_path / "plain.h5", sample((ROWS, 12), "float32"), compression="gzip")
    with h5py.File(tmp_path / "ub.h5", "w", userblock_size=512) as f:
        f.create_dataset(
            "x", data=sample((ROWS, 12), "float32"), chunks=(32, 12), compression="gzip"
        )
    for name in (path, tmp_path / "ub.h5"):
        with h5py.File(name, "r") as f, open(name, "rb") as raw:
            info = f["x"].id.get_chunk_info(0)
            raw.seek(info.byte_offset)
            assert raw.read(info.size) == f["x"].id.read_direct_chunk(info.chunk_offset)[1]


def test_userblock_offset_is_detected_either_way(tmp_path):
    """HDF5 before 1.14.4 reported chunk addresses relative to the userblock; we detect which."""
    with h5py.File(tmp_path / "f.h5", "w", userblock_size=512) as f:
        f.create_dataset(
            "x", data=sample((ROWS, 12), "float32"), chunks=(32, 12), compression="gzip"
        )
    data = chunks.FileBytes(str(tmp_path / "f.h5"))
    try:
        with h5py.File(tmp_path / "f.h5", "r") as f:
            info = f["x"].id.get_chunk_info(0)
            origin, size = info.chunk_offset, info.size
            assert chunks._address_base(f["x"], data, origin, info.byte_offset, size) == 0
            assert chunks._address_base(f["x"], data, origin, info.byte_offset - 512, size) == 512
            assert chunks._address_base(f["x"], data, origin, info.byte_offset + 3, size) is None
    finally:
        data.close()


def test_chunks_that_skipped_filters(tmp_path):
    """A set bit i of a chunk's filter mask means filter i was not applied to it."""
    data = sample((40, 12), "int32")
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        d = f.create_dataset(
            "x",
            shape=data.shape,
            dtype=data.dtype,
            chunks=(10, 12),
            shuffle=True,
            compression="gzip",
        )
        for mask, row in zip((0b00, 0b01, 0b10, 0b11), range(0, 40, 10), strict=True):
            block = data[row : row + 10]
            stored = block.tobytes()
            if not mask & 0b01:  # shuffle applied: byte planes
                stored = block.view(np.uint8).reshape(-1, 4).T.tobytes()
            if not mask & 0b10:  # gzip applied
                stored = zlib.compress(stored)
            d.id.write_direct_chunk((row, 0), stored, filter_mask=mask)
    with h5py.File(path, "r") as f, opened(f["x"]) as reader:
        np.testing.assert_array_equal(f["x"][:], data)  # h5py agrees with how we wrote them
        assert_reads_like_h5py(reader, f["x"], [(0, 40), (5, 35), (10, 20), (30, 40)])


def test_lzf_skips_incompressible_chunks_and_we_follow(tmp_path):
    path = write(tmp_path / "f.h5", sample((ROWS, 12), "float64"), compression="lzf")
    with h5py.File(path, "r") as f, opened(f["x"]) as reader:
        masks = [f["x"].id.get_chunk_info(i).filter_mask for i in range(f["x"].id.get_num_chunks())]
        assert 0 in masks and 1 in masks
        assert_reads_like_h5py(reader, f["x"])


def test_out_is_written_in_place(tmp_path):
    path = write(tmp_path / "f.h5", sample((ROWS, 12), "float32"), compression="gzip", shuffle=True)
    with h5py.File(path, "r") as f, opened(f["x"]) as reader:
        out = np.full((64, 12), np.nan, np.float32)
        result, fetched = reader.read(32, 96, out=out)
        assert result is out and fetched > 0
        assert out.tobytes() == f["x"][32:96].tobytes()
        out = np.zeros((40, 12), np.float32)
        reader.read(10, 50, out=out)  # partial chunks go through the scratch buffer
        assert out.tobytes() == f["x"][10:50].tobytes()
        for bad in (
            np.zeros((63, 12), np.float32),
            np.zeros((64, 12), np.float64),
            np.zeros((12, 64), np.float32).T,
        ):
            with pytest.raises(ValueError, match="out"):
                reader.read(32, 96, out=bad)


def test_bad_ranges_and_closed_reader(tmp_path):
    path = write(tmp_path / "f.h5", sample((ROWS, 12), "float32"), compression="gzip")
    with h5py.File(path, "r") as f:
        reader = opened(f["x"])
        for start, stop in [(-1, 5), (5, 4), (0, ROWS + 1)]:
            with pytest.raises(IndexError, match="rows"):
                reader.read(start, stop)
        reader.close()
        reader.close()  # idempotent
        with pytest.raises(ValueError, match="closed"):
            reader.read(0, 5)


def test_many_threads_at_once(tmp_path):
    path = write(
        tmp_path / "f.h5",
        sample((ROWS, 8, 6), "float32"),
        chunks=(16, 4, 6),
        compression="gzip",
        shuffle=True,
    )
    rng = np.random.default_rng(1)
    starts = rng.integers(0, ROWS, 400)
    ranges = [
        (int(a), int(min(ROWS, a + n)))
        for a, n in zip(starts, rng.integers(1, 70, 400), strict=True)
    ]
    with h5py.File(path, "r") as f, opened(f["x"]) as reader:
        everything = f["x"][:]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda r: reader.read(*r)[0], ranges))
    for (start, stop), rows in zip(ranges, results, strict=True):
        assert rows.tobytes() == everything[start:stop].tobytes()


def test_index_is_numpy_arrays_by_grid_coordinate(tmp_path):
    path = write(
        tmp_path / "f.h5", sample((ROWS, 28), "float32"), chunks=(16, 11), compression="gzip"
    )
    with h5py.File(path, "r") as f, opened(f["x"]) as reader:
        grid = (13, 3)
        for array in (reader._offsets, reader._sizes, reader._masks):
            assert isinstance(array, np.ndarray) and array.shape == grid
        info = f["x"].id.get_chunk_info_by_coord((32, 22))
        assert reader._offsets[2, 2] == info.byte_offset and reader._sizes[2, 2] == info.size


# -------------------------------------------------------------------------- fallbacks


def fallback_reason(dset) -> str:
    reason = open_chunk_reader(dset)
    assert isinstance(reason, str), reason
    assert "\n" not in reason and reason
    return reason


def test_fallback_contiguous_fletcher32_scaleoffset_compact(tmp_path):
    data = sample((ROWS, 12), "int32")
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("contiguous", data=data)
        f.create_dataset("fletcher32", data=data, chunks=(32, 12), fletcher32=True)
        f.create_dataset("scaleoffset", data=data, chunks=(32, 12), scaleoffset=0)
        space = h5py.h5s.create_simple((4, 3))
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.COMPACT)
        h5py.h5d.create(f.id, b"compact", h5py.h5t.NATIVE_INT32, space, dcpl=dcpl)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert fallback_reason(f["contiguous"]) == "contiguous layout"
        assert fallback_reason(f["fletcher32"]) == "filter fletcher32 is not supported"
        assert "scaleoffset" in fallback_reason(f["scaleoffset"])
        assert fallback_reason(f["compact"]) == "compact layout"
        assert read_path(f["contiguous"]).startswith("h5py read")
        assert "contiguous layout" in read_path(f["contiguous"])


def test_fallback_external_and_virtual(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset(
            "external",
            shape=(10, 4),
            dtype="f4",
            external=[(str(tmp_path / "ext.bin"), 0, h5py.h5f.UNLIMITED)],
        )
        f.create_dataset("source", data=sample((ROWS, 12), "float32"), chunks=(32, 12))
        layout = h5py.VirtualLayout(shape=(ROWS, 12), dtype="f4")
        layout[:] = h5py.VirtualSource(f["source"])
        f.create_virtual_dataset("virtual", layout)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert fallback_reason(f["external"]) == "external storage"
        assert fallback_reason(f["virtual"]) == "virtual dataset"


def test_fallback_core_driver_and_writable_file(tmp_path):
    path = write(tmp_path / "f.h5", sample((ROWS, 12), "float32"), compression="gzip")
    with h5py.File(path, "r", driver="core") as f:
        assert fallback_reason(f["x"]) == "file driver 'core'"
    with h5py.File(path, "r+") as f:
        assert "writing" in fallback_reason(f["x"])


def test_fallback_dtypes(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("strings", data=np.array([b"ab", b"cd"] * 8), chunks=(4,))
        f.create_dataset("compound", data=np.zeros(16, "i4,f8"), chunks=(4,))
        f.create_dataset("vlen", shape=(16,), dtype=h5py.vlen_dtype("f4"), chunks=(4,))
        f.create_dataset("subarray", shape=(16,), dtype=np.dtype(("f4", (3,))), chunks=(4,))
    with h5py.File(tmp_path / "f.h5", "r") as f:
        for name in ("strings", "compound", "vlen", "subarray"):
            assert "dtype" in fallback_reason(f[name])


def test_fallback_names_the_missing_codec_package(tmp_path, monkeypatch):
    path = write(tmp_path / "f.h5", sample((ROWS, 12), "float32"), compression="lzf")
    real = codecs._module
    monkeypatch.setattr(
        codecs, "_module", lambda name: None if name == "imagecodecs" else real(name)
    )
    with h5py.File(path, "r") as f:
        assert fallback_reason(f["x"]) == "lzf needs imagecodecs (pip install imagecodecs)"


def test_read_path_names_the_fast_path(tmp_path):
    path = write(tmp_path / "f.h5", sample((ROWS, 12), "float32"), compression="gzip", shuffle=True)
    with h5py.File(path, "r") as f:
        line = read_path(f["x"])
    assert line.startswith("raw chunks: shuffle+gzip via ") and "\n" not in line


# ---------------------------------------------------------------------------- errors


def corrupt_chunk(path, row: int, name="x") -> tuple[int, int]:
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info_by_coord((row,) + (0,) * (f[name].ndim - 1))
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset + 2)
        raw.write(bytes(b ^ 0x5A for b in raw.read(40)))
    return info.byte_offset, info.size


@pytest.mark.parametrize("backend", GZIP_BACKENDS)
def test_corrupt_chunk_names_file_dataset_chunk_and_rows(tmp_path, backend):
    gzip_backend(backend)
    path = write(
        tmp_path / "f.h5",
        sample((ROWS, 12), "float32"),
        name="images",
        compression="gzip",
        shuffle=True,
    )
    corrupt_chunk(path, 64, name="images")
    with h5py.File(path, "r") as f:
        reader = opened(f["images"], gzip=backend)
        with pytest.raises(ValueError) as caught:
            reader.read(50, 100)
        message = str(caught.value)
        assert message.startswith(
            f"{path}: dataset 'images' rows 64-96: gzip"
        )
        reader.read(0, 64)  # the other chunks still read
        reader.close()


@pytest.mark.parametrize("cname", ["lz4", "zstd"])
def test_a_bitshuffle_block_size_beyond_its_chunk_is_an_error_as_in_h5py(tmp_path, cname):
    """A damaged stored size (the first block's, bytes 12-15) that claims more than the
    chunk holds: h5py's filter fails, so does the read, naming the rows (the block was
    cut short by a slice and decoded anyway)."""
    from pipetrain.source import CorruptDataError, H5Source

    x = (np.random.default_rng(2).normal(size=(ROWS, 8)) * 10).round(1).astype("<f4")
    path = write(tmp_path / "bs.h5", x, chunks=(16, 8), **plugin("Bitshuffle", cname=cname))
    with h5py.File(path, "r") as f:
        offset = f["x"].id.get_chunk_info_by_coord((80, 0)).byte_offset
    with open(path, "r+b") as raw:
        raw.seek(offset + 12)
        first = raw.read(1)
        raw.seek(offset + 12)
        raw.write(bytes([first[0] ^ 1]))
    with h5py.File(path, "r") as f, pytest.raises(OSError):
        f["x"][80:96]
    with H5Source(path, x="x") as source, pytest.raises(CorruptDataError, match="rows 80-96"):
        source.read(0, 80, 96)


def test_a_zstd_chunk_of_two_frames_is_refused_as_damaged(tmp_path):
    """HDF5's zstd filter decodes a chunk's first frame alone (h5py then returns bytes it
    never wrote): such a chunk is damaged, not read whole."""
    from pipetrain.source import CorruptDataError, H5Source

    imagecodecs = pytest.importorskip("imagecodecs")
    x = np.arange(ROWS * 8, dtype="<f4").reshape(ROWS, 8)
    path = write(tmp_path / "zstd.h5", x, chunks=(16, 8), **plugin("Zstd"))
    raw = x[80:96].tobytes()
    with h5py.File(path, "r+") as f:
        f["x"].id.write_direct_chunk((80, 0), imagecodecs.zstd_encode(raw[:256]) + imagecodecs.zstd_encode(raw[256:]))
    with H5Source(path, x="x") as source:
        np.testing.assert_array_equal(source.read(0, 0, 80)[0]["x"], x[:80])  # the other chunks read
        with pytest.raises(CorruptDataError, match="rows 80-96: .*zstd frame holds 256 bytes, the chunk 512"):
            source.read(0, 80, 96)


@pytest.mark.parametrize("row", [0, ROWS - 1])
def test_a_corrupt_first_or_last_chunk_is_an_error_naming_its_rows_not_a_fallback(tmp_path, row):
    path = write(tmp_path / "f.h5", sample((ROWS, 12), "float32"), compression="gzip")
    corrupt_chunk(path, row)
    first = row // 32 * 32
    with h5py.File(path, "r") as f, pytest.raises(chunks.DamagedChunk, match=f"{path}: dataset 'x' rows {first}-{min(first + 32, ROWS)}: "):
        open_chunk_reader(f["x"])


def test_short_read_is_a_damaged_chunk_naming_the_rows(tmp_path):
    path = write(tmp_path / "f.h5", sample((ROWS, 12), "float32"), compression="gzip")
    with h5py.File(path, "r") as f:
        reader = opened(f["x"])
        offset = int(reader._offsets[3, 0])
        os.truncate(path, offset + 5)  # the reader's own descriptor sees the shorter file
        with pytest.raises(
            chunks.DamagedChunk, match=r"dataset 'x' rows 96-100: short read"
        ):
            reader.read(90, 100)
        reader.close()


def chunk_btree_keys(path, rank: int) -> list[int]:
    """File offsets of the keys of a dataset's chunk index (a version-1 B-tree leaf,
    h5py's default format): each key is the chunk's stored size (4 bytes), filter mask
    (4), then rank + 1 eight-byte coordinates, the last one always 0."""
    data = open(path, "rb").read()
    pos = data.find(b"TREE")
    while data[pos + 4] != 1 or data[pos + 5] != 0:  # raw-data chunk node, leaf
        pos = data.find(b"TREE", pos + 1)
    entries = int.from_bytes(data[pos + 6 : pos + 8], "little")
    stride = 8 + 8 * (rank + 1) + 8  # key, then the child's address
    return [pos + 24 + stride * i for i in range(entries + 1)]


def patch(path, at: int, value: int, size: int) -> None:
    with open(path, "r+b") as raw:
        raw.seek(at)
        raw.write(value.to_bytes(size, "little"))


def four_chunks(tmp_path) -> tuple[str, np.ndarray]:
    x = np.arange(256, dtype="float32").reshape(64, 4) + 1
    return write(tmp_path / "f.h5", x, chunks=(16, 4), compression="gzip"), x


def test_a_chunk_the_index_search_cannot_find_is_an_error_not_the_chunk_or_fill_values(tmp_path):
    """A flipped byte in a chunk's key: HDF5's own search no longer finds rows 16-31 (h5py
    returns fill values there, quietly), while a walk of the index still lists the chunk."""
    path, x = four_chunks(tmp_path)
    key = chunk_btree_keys(path, rank=2)[1]
    patch(path, key + 8 + 8 * 2, 4, 8)  # the key's last coordinate, always 0
    with h5py.File(path, "r") as f:
        assert (f["x"][16:32] == 0).all()  # what h5py's read gives
        reader = opened(f["x"])
        ours, _ = reader.read(0, 16)  # the chunks HDF5 finds still read
        assert ours.tobytes() == x[:16].tobytes()
        with pytest.raises(chunks.DamagedChunk, match=rf"{path}: dataset 'x' rows 16-20: the chunk index is damaged"):
            reader.read(10, 20)
        reader.close()


def test_a_file_cut_inside_a_chunk_is_an_error_at_open_naming_the_rows(tmp_path):
    """Truncated in the middle of a chunk, with the end-of-file address in the superblock
    patched to match (HDF5 then opens it and would fail only when the rows are read)."""
    path, _ = four_chunks(tmp_path)
    with h5py.File(path, "r") as f:
        info = f["x"].id.get_chunk_info(2)  # rows 32-48
    os.truncate(path, info.byte_offset + info.size // 2)
    patch(path, 40, info.byte_offset + info.size // 2, 8)  # superblock v0: end-of-file address
    with h5py.File(path, "r") as f, pytest.raises(chunks.DamagedChunk, match=rf"{path}: dataset 'x' rows 32-48: its chunk of .* lies outside the file"):
        open_chunk_reader(f["x"])


@pytest.mark.parametrize("what", ["size grown", "size shrunk"])
def test_a_chunk_size_that_disagrees_with_the_file_is_an_error(tmp_path, what):
    x = np.arange(256, dtype="float32").reshape(64, 4)
    path = write(tmp_path / "f.h5", x, chunks=(16, 4))  # unfiltered: every chunk is 256 bytes
    key = chunk_btree_keys(path, rank=2)[1]
    patch(path, key, 300 if what == "size grown" else 200, 4)
    message = "overlaps the chunk of rows 32-48" if what == "size grown" else "stored as 200 bytes, not 256"
    with h5py.File(path, "r") as f, pytest.raises(chunks.DamagedChunk, match=rf"dataset 'x' rows 16-32: .*{message}"):
        open_chunk_reader(f["x"])


def test_check_index_covers_chunks_that_h5py_reads(tmp_path):
    """Datasets with a filter the fast path leaves to h5py (fletcher32) get the same index checks."""
    x = np.arange(256, dtype="float32").reshape(64, 4)
    path = write(tmp_path / "f.h5", x, chunks=(16, 4), fletcher32=True)
    with h5py.File(path, "r") as f:
        assert isinstance(open_chunk_reader(f["x"]), str)
        info = f["x"].id.get_chunk_info(3)
    os.truncate(path, info.byte_offset + 10)
    patch(path, 40, info.byte_offset + 10, 8)
    with h5py.File(path, "r") as f, pytest.raises(chunks.DamagedChunk, match="rows 48-64: its chunk"):
        chunks.check_index(f["x"])


# ------------------------------------------------------------- the fastest installed decoder


def test_the_decoder_is_the_one_that_decodes_a_stored_chunk_fastest(monkeypatch):
    stored = zlib.compress(sample((64, 12), "float32").tobytes(), 1)
    nbytes = 64 * 12 * 4
    calls = []

    def slow(src, dest):
        calls.append("slow")
        time.sleep(0.004)
        return zlib.decompress(src)

    def quick(src, dest):
        calls.append("quick")
        return zlib.decompress(src)

    decoders = {"slow": slow, "quick": quick, "absent": None}
    monkeypatch.setitem(codecs._BACKENDS, "gzip", ("slow", "absent", "quick"))
    monkeypatch.setitem(codecs._COMPRESSORS, "gzip", lambda backend, n: (decoders[backend], backend)
                        if decoders[backend] else None)
    monkeypatch.setattr(codecs, "_FASTEST", {})
    first = codecs.Stage("gzip", "slow", slow, backend="slow")
    shuffle = codecs.Stage("shuffle", "numpy", None, 4)
    pipeline = codecs.fastest([shuffle, first], lambda: stored, nbytes, ("x", "<f4", (64, 12)))
    assert pipeline[0] is shuffle and pipeline[1].backend == "quick" and pipeline[1].via == "quick"
    assert calls.count("slow") == calls.count("quick") == 2  # best of two, each
    # The kind of chunk keeps its choice: no second timing, not even a read of a chunk.
    calls.clear()
    again = codecs.fastest([shuffle, first], lambda: pytest.fail("read again"), nbytes, ("x", "<f4", (64, 12)))
    assert again[1].backend == "quick" and not calls


@pytest.mark.parametrize("trouble", ["differs", "raises", "no chunk"])
def test_decoders_that_disagree_or_fail_leave_the_default_order(monkeypatch, trouble):
    stored = zlib.compress(b"abc" * 100, 1)

    def wrong(src, dest):
        if trouble == "raises":
            raise ValueError("bad stream")
        return b"xyz" * 100

    decoders = {"first": lambda src, dest: zlib.decompress(src), "second": wrong}
    monkeypatch.setitem(codecs._BACKENDS, "gzip", ("first", "second"))
    monkeypatch.setitem(codecs._COMPRESSORS, "gzip", lambda backend, n: (decoders[backend], backend))
    monkeypatch.setattr(codecs, "_FASTEST", {})
    pipeline = [codecs.Stage("gzip", "first", decoders["first"], backend="first")]
    got = codecs.fastest(pipeline, lambda: None if trouble == "no chunk" else stored, 300, ("x",))
    assert got == pipeline and codecs._FASTEST == {}  # and nothing kept: another chunk may be timed


def test_a_reader_opened_without_preference_reads_like_h5py_with_the_decoder_it_timed(tmp_path, monkeypatch):
    monkeypatch.setattr(codecs, "_FASTEST", {})
    path = write(tmp_path / "f.h5", sample((ROWS, 12), "float32"), compression="gzip", compression_opts=1)
    with h5py.File(path, "r") as f, opened(f["x"]) as reader:
        (key, chosen), = codecs._FASTEST.items()
        assert key[0] == "gzip" and key[2:] == ("x", "<f4", f["x"].chunks)
        assert reader.stages[-1].backend == chosen
        assert_reads_like_h5py(reader, f["x"])
