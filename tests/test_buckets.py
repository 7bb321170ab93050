"""Data in a bucket: s3:// against a real S3 API on 127.0.0.1 (moto in server mode, s3fs
as the client), https:// against a server that honours Range, gs:// against a GCS
emulator. Reads equal h5py's local read byte for byte; a run from a bucket equals the run
from the local file; every fault is one clear line, and nothing of two versions mixes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipetrain import chunks
from pipetrain.h5remote import RemoteH5
from pipetrain.pipeline import Prefetcher
from pipetrain.plan import Plan
from pipetrain.ranges import Fetcher, FetchSettings
from pipetrain.source import H5Source, SourceError, SourceReadError
from tests.remote_helpers import FaultProxy, FileServer, s3_env, start_moto
from tests.test_chunks import FILTERS, RANGES, ROWS, sample

ROOT = Path(__file__).resolve().parent.parent
FAST = FetchSettings(retries=3, backoff_s=0.01, max_backoff_s=0.05, timeout_s=20)


class Bucket:
    """A fresh bucket on the moto server, with an s3fs client to put objects in it."""

    def __init__(self, endpoint: str):
        import s3fs

        self.endpoint = endpoint
        self.name = f"b-{uuid.uuid4().hex[:10]}"
        self.fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint})
        self.fs.mkdir(self.name)

    def put(self, local, key: str | None = None) -> str:
        key = key or Path(local).name
        self.fs.put(str(local), f"{self.name}/{key}")
        self.fs.invalidate_cache()
        return f"s3://{self.name}/{key}"

    def options(self, endpoint: str | None = None) -> dict:
        return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint or self.endpoint}}


@pytest.fixture(scope="module")
def moto():
    server, endpoint = start_moto()
    saved = {k: os.environ.get(k) for k in s3_env(endpoint)}
    os.environ.update({k: v for k, v in s3_env(endpoint).items() if k != "AWS_ENDPOINT_URL"})
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def bucket(moto):
    return Bucket(moto)


@pytest.fixture
def proxy(moto):
    proxies = []

    def make(**kwargs):
        proxies.append(FaultProxy(moto, **kwargs))
        return proxies[-1]

    yield make
    for p in proxies:
        p.stop()


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Each test its own metadata cache."""
    monkeypatch.setenv("PIPETRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def labelled(path, rows=300, features=6, chunk=32, seed=0, **options) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype("float32")
    y = (np.argmax(x[:, :3], axis=1)).astype("int64")
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(chunk, features), compression="gzip", **options)
        f.create_dataset("y", data=y, chunks=(chunk * 2,))
    return Path(path)


def assert_same_reads(source: H5Source, path: Path, file: int = 0) -> None:
    with h5py.File(path) as f:
        rows = f["x"].shape[0]
        for start, stop in [(0, rows), (5, 17), (31, 97), (rows - 1, rows)]:
            arrays, _ = source.read(file, start, stop)
            for name in arrays:
                theirs = f[name][start:stop]
                assert arrays[name].dtype == theirs.dtype
                assert arrays[name].tobytes() == theirs.tobytes(), (name, start, stop)


# -------------------------------------------------------------------------- the bytes


def test_every_codec_reads_from_s3_as_h5py_reads_the_local_file(tmp_path, bucket):
    """One file with a dataset per filter and a few dtypes: each read through ranged GETs
    equals h5py's read of the local copy, byte for byte."""
    path = tmp_path / "codecs.h5"
    names = []
    with h5py.File(path, "w") as f:
        for name, options in FILTERS.items():
            for dtype in ("float32", ">f8") if name in ("none", "gzip-1", "shuffle+gzip") else ("int16",):
                try:
                    opts = options()
                except pytest.skip.Exception:
                    continue
                f.create_dataset(f"{name}/{dtype}", data=sample((ROWS, 7), dtype), chunks=(11, 7), **opts)
                names.append(f"{name}/{dtype}")
        f.create_dataset("split-rows", data=sample((ROWS, 28), "float32"), chunks=(16, 11), compression="gzip")
        names.append("split-rows")
    url = bucket.put(path)
    opened = RemoteH5(url, bucket.options(), metadata_cache=None, fetcher=Fetcher(FAST))
    try:
        with h5py.File(path) as local:
            for name in names:
                reader = chunks.open_chunk_reader(opened.file[name], opened.chunk_bytes())
                assert isinstance(reader, chunks.ChunkReader), (name, reader)
                assert "ranged GETs" in reader.codec
                with reader:
                    for start, stop in RANGES if name.startswith("gzip-1") else [(0, ROWS), (13, 150)]:
                        ours, _ = reader.read(start, stop)
                        assert ours.tobytes() == local[name][start:stop].tobytes(), (name, start, stop)
    finally:
        opened.close()
        opened.fetcher.close()


def test_import_pipetrain_loads_no_object_store_package():
    code = ("import sys, pipetrain; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('fsspec', 's3fs', 'gcsfs', 'aiohttp', 'botocore', 'aiobotocore')]; print(bad)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_a_dataset_the_chunk_reader_cannot_serve_is_read_by_h5py_through_ranged_pages(tmp_path, bucket):
    path = tmp_path / "contiguous.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=sample((500, 9), "float32"))  # contiguous: h5py's own read
        f.create_dataset("y", data=np.arange(500), chunks=(64,), compression="gzip")
    url = bucket.put(path)
    with H5Source(url, x="x", y="y", storage_options=bucket.options(), fetch=FAST) as source:
        assert source.read_path()["x"] == "h5py read"
        assert_same_reads(source, path)


def test_a_glob_of_objects_reads_like_the_local_files_and_opens_from_the_cache(tmp_path, bucket, proxy, cache_dir):
    paths = [labelled(tmp_path / f"part-{i}.h5", rows=200 + 50 * i, seed=i) for i in range(3)]
    for p in paths:
        bucket.put(p, f"train/{p.name}")
    bucket.put(paths[0], "other/part-9.h5")
    counting = proxy()
    options = bucket.options(counting.url)
    with H5Source(f"s3://{bucket.name}/train/part-*.h5", x="x", y="y", storage_options=options, fetch=FAST) as source:
        assert source.paths == [f"s3://{bucket.name}/train/part-{i}.h5" for i in range(3)]
        assert source.rows_per_file == [200, 250, 300]
        for i, p in enumerate(paths):
            assert_same_reads(source, p, i)
        assert set(source.describe()["versions"]) == set(source.paths)
    assert len(list(cache_dir.rglob("*.pages"))) == 3
    first_open = counting.count
    counting.log.clear()
    with H5Source(f"s3://{bucket.name}/train/part-*.h5", x="x", y="y", storage_options=options, fetch=FAST) as source:
        # The listing gave each object's ETag; metadata and checks came from the cache.
        assert [m for m, _, _ in counting.log] == ["GET"] and counting.ranged_gets() == 0, counting.log
        assert_same_reads(source, paths[1], 1)
    assert first_open > 3


def test_a_new_version_of_an_object_does_not_use_the_old_cached_metadata(tmp_path, bucket, cache_dir):
    a = labelled(tmp_path / "a.h5", rows=200, seed=1)
    b = labelled(tmp_path / "b.h5", rows=333, chunk=16, seed=2)
    url = bucket.put(a, "data.h5")
    with H5Source(url, x="x", y="y", storage_options=bucket.options(), fetch=FAST) as source:
        assert source.rows == 200
    bucket.put(b, "data.h5")
    with H5Source(url, x="x", y="y", storage_options=bucket.options(), fetch=FAST) as source:
        assert source.rows == 333
        assert_same_reads(source, b)
    assert len(list(cache_dir.rglob("*.pages"))) == 2  # one per version


def test_an_unreadable_cache_entry_is_ignored(tmp_path, bucket, cache_dir):
    path = labelled(tmp_path / "a.h5")
    url = bucket.put(path)
    H5Source(url, x="x", storage_options=bucket.options(), fetch=FAST).close()
    (entry,) = cache_dir.rglob("*.pages")
    whole = entry.read_bytes()
    entry.write_bytes(whole[:300])  # cut short
    with H5Source(url, x="x", y="y", storage_options=bucket.options(), fetch=FAST) as source:
        assert_same_reads(source, path)
    flipped = bytearray(entry.read_bytes())
    flipped[flipped.index(b"\n") + 1 + 30] ^= 0xFF  # a byte of the superblock changed on disk
    entry.write_bytes(bytes(flipped))
    with H5Source(url, x="x", y="y", storage_options=bucket.options(), fetch=FAST) as source:
        assert_same_reads(source, path)


def test_read_ahead_fetches_the_next_blocks_in_coalesced_requests_within_its_budget(tmp_path, bucket, proxy):
    """In file order, the pipeline names the coming blocks to the source: their chunks
    arrive in few, larger requests (adjacent chunks joined), and the bytes held ahead
    never pass the budget."""
    path = labelled(tmp_path / "a.h5", rows=3000, features=40, chunk=50)
    url = bucket.put(path)
    slow = proxy(latency=0.005)
    settings = FetchSettings(readahead_bytes=200_000, coalesce_bytes=40_000, retries=2, backoff_s=0.01)
    with h5py.File(path) as f:
        expected = f["x"][:]
        chunks_x = f["x"].id.get_num_chunks() + f["y"].id.get_num_chunks()
    with H5Source(url, x="x", y="y", storage_options=bucket.options(slow.url), fetch=settings,
                  metadata_cache=None) as source:
        fetcher = source._fetcher
        opened_requests = slow.ranged_gets()
        plan = Plan(source.rows_per_file, 64, block_rows=50)
        held = []
        got = []
        with Prefetcher(source, plan.batches(0), plan.blocks, 64, workers=2, max_queue=2) as batches:
            for batch in batches:
                held.append(fetcher._held)
                got.append(batch.arrays["x"].copy())
        assert np.concatenate(got).tobytes() == expected.tobytes()
        requests = slow.ranged_gets() - opened_requests
        assert fetcher.stats.hinted_hits > 0
        assert requests < chunks_x / 2, (requests, chunks_x)  # joined: fewer requests than chunks
        assert max(held) <= settings.readahead_bytes + 20_000  # the budget, plus one plan's hint
        assert fetcher._held == 0  # dropped when the stream closed


def test_adjacent_ranges_are_joined_up_to_the_limit():
    from pipetrain.ranges import MAX_GAP, _coalesce

    ranges = [(0, 100), (100, 50), (150, 400), (5000 + MAX_GAP, 10), (10_000_000, 9_000_000)]
    groups = _coalesce(ranges, limit=500)
    assert groups == [[(0, 100), (100, 50)], [(150, 400)], [(5000 + MAX_GAP, 10)], [(10_000_000, 9_000_000)]]
    assert _coalesce([(0, 10), (10 + MAX_GAP, 10)], limit=10**6) == [[(0, 10), (10 + MAX_GAP, 10)]]
    assert _coalesce([(0, 10), (11 + MAX_GAP, 10)], limit=10**6) == [[(0, 10)], [(11 + MAX_GAP, 10)]]


def test_fetch_settings_from_the_environment():
    assert FetchSettings.from_env("retries=2 backoff_s=0.5, max_requests=64") == FetchSettings(
        retries=2, backoff_s=0.5, max_requests=64)
    for text in ("retries", "nope=1", "max_requests=0", "retries=-1", "backoff_s=fast"):
        with pytest.raises(Exception, match="PIPETRAIN_FETCH: .* is not NAME=NUMBER"):
            FetchSettings.from_env(text)


def test_a_retrys_jitter_leaves_the_global_random_state_alone():
    """The global random state is the user's (a checkpoint holds it for an exact resume);
    a retry's jitter drew from it, and processes seeded alike retried in step."""
    import random

    from pipetrain.ranges import FetchSettings

    random.seed(0)
    state = random.getstate()
    waits = [FetchSettings().backoff(2) for _ in range(5)]
    assert random.getstate() == state
    assert all(0.4 <= w <= 0.8 for w in waits) and len(set(waits)) > 1


def test_fetch_settings_that_cannot_work_are_refused_in_one_line():
    """max_requests=0 left every request waiting for a slot that never came (the open
    hung), and a time-out of 0 or NaN failed every read after the retries as a network
    failure (exit 1), not as a setting."""
    from pipetrain.errors import InputError

    for bad_setting in ({"max_requests": 0}, {"retries": -1}, {"timeout_s": 0}, {"timeout_s": float("nan")},
                        {"backoff_s": float("nan")}, {"max_backoff_s": -1.0}, {"coalesce_bytes": 1.5}):
        name = next(iter(bad_setting))
        with pytest.raises(InputError, match=rf"^fetch: {name}=.*: expected ") as info:
            FetchSettings(**bad_setting)
        assert "\n" not in str(info.value)
    for text in ("timeout_s=0", "timeout_s=nan", "backoff_s=nan", "max_backoff_s=nan"):
        with pytest.raises(InputError, match="PIPETRAIN_FETCH: .* is not NAME=NUMBER"):
            FetchSettings.from_env(text)
    assert FetchSettings(max_requests=np.int64(4), timeout_s=float("inf")).max_requests == 4


# ------------------------------------------------------------------- faults and bad input


def bad(match, *args, **kwargs):
    with pytest.raises(SourceError, match=match) as info:
        H5Source(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_bucket_key_and_glob(bucket):
    bad(r"s3://no-such-bucket-x/a\.h5: no such object or bucket", "s3://no-such-bucket-x/a.h5", x="x",
        storage_options=bucket.options())
    bad(rf"s3://{bucket.name}/missing\.h5: no such object", f"s3://{bucket.name}/missing.h5", x="x",
        storage_options=bucket.options())
    bad(rf"s3://{bucket.name}/train-\*\.h5: no object matches", f"s3://{bucket.name}/train-*.h5", x="x",
        storage_options=bucket.options())


def test_an_object_that_is_not_hdf5(tmp_path, bucket):
    (tmp_path / "notes.h5").write_text("hello, I am not HDF5\n" * 3000)
    url = bucket.put(tmp_path / "notes.h5")
    bad(rf"{url}: not an HDF5 file", url, x="x", storage_options=bucket.options(), fetch=FAST)
    whole = labelled(tmp_path / "whole.h5", rows=2000).read_bytes()
    (tmp_path / "cut.h5").write_bytes(whole[: len(whole) // 3])
    url = bucket.put(tmp_path / "cut.h5")
    bad(rf"{url}: cannot be opened as HDF5 \(truncated or corrupted\?\)", url, x="x",
        storage_options=bucket.options(), fetch=FAST)


def test_denied_credentials(tmp_path, bucket, moto):
    """moto checks credentials once told to: unknown keys are refused (403)."""
    import urllib.request

    url = bucket.put(labelled(tmp_path / "a.h5"))

    def auth(count: str) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{moto}/moto-api/reset-auth", data=count.encode(),
                                                      headers={"Content-Type": "text/plain"}, method="POST")).read()
    auth("0")
    try:
        message = bad(rf"{url}: access denied", url, x="x", storage_options=bucket.options(), fetch=FAST)
    finally:
        auth("inf")
    assert "credentials" in message


def test_unknown_scheme_and_missing_package(monkeypatch):
    bad(r"ftp://host/a\.h5: pipetrain reads s3://, gs://, https://, http:// URLs, not ftp://", "ftp://host/a.h5", x="x")
    from pipetrain import remote

    monkeypatch.setattr(remote, "_cache", {})
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed
    bad(r"gs://b/a\.h5: reading gs:// URLs needs gcsfs .*pip install 'pipetrain\[gcs\]'", "gs://b/a.h5", x="x")


def test_throttling_and_cut_connections_are_retried(tmp_path, bucket, proxy):
    """503 SlowDown on every other ranged GET and bodies cut short: the reads succeed
    after retries, and every byte is the file's."""
    path = labelled(tmp_path / "a.h5", rows=300)
    url = bucket.put(path)

    def storm(method, path, headers, n):
        if method == "GET" and headers.get("Range"):
            return 503 if n % 3 == 0 else ("cut", 100) if n % 3 == 1 else None
        return None

    flaky = proxy(fault=storm)
    with H5Source(url, x="x", y="y", storage_options=bucket.options(flaky.url), metadata_cache=None,
                  fetch=FetchSettings(retries=8, backoff_s=0.01, max_backoff_s=0.02)) as source:
        assert_same_reads(source, path)
        assert source._fetcher.stats.retries > 3


def test_s3_ranged_gets_go_to_a_presigned_url_signed_again_when_refused(tmp_path, bucket, proxy):
    """The chunks' GETs carry no per-request signature (a presigned URL of the object,
    the Range and If-Match headers as before): one refused GET (an expired URL) is
    signed again and succeeds; a refusal that stays is one line saying access denied."""
    path = labelled(tmp_path / "a.h5", rows=600)
    url = bucket.put(path, "dir/a b+ü%.h5")  # a key the URL must encode
    seen, refuse = [], {"once": True, "always": False}

    def gate(method, p, headers, n):
        if method == "GET" and headers.get("Range"):
            seen.append((p, headers.get("Authorization"), headers.get("If-Match")))
            if refuse["always"] or (refuse["once"] and len(seen) > 1):
                refuse["once"] = False
                return 403
        return None

    guarded = proxy(fault=gate)
    with H5Source(url, x="x", y="y", storage_options=bucket.options(guarded.url), metadata_cache=None,
                  fetch=FAST) as source:
        first = len(seen)
        assert_same_reads(source, path)
        chunk_gets = seen[first:]
        assert chunk_gets and all(auth is None and "Signature=" in p and match for p, auth, match in chunk_gets)
        refuse["always"] = True
        with pytest.raises(SourceError, match=rf"^{re.escape(url)}: dataset 'x' rows 100-200: .*access denied") as info:
            source.read(0, 100, 200)
        assert "\n" not in str(info.value)


def test_s3_options_that_every_request_must_carry_go_through_botocore(tmp_path, bucket, proxy):
    """Requester pays (like SSE-C keys) must be in each signed request: those GETs are
    botocore's, with the option, and read the same bytes."""
    path = labelled(tmp_path / "a.h5", rows=300)
    url = bucket.put(path)
    seen = []
    watched = proxy(fault=lambda method, p, headers, n: seen.append(dict(headers)) if headers.get("Range") else None)
    options = {**bucket.options(watched.url), "requester_pays": True}
    with H5Source(url, x="x", y="y", storage_options=options, metadata_cache=None, fetch=FAST) as source:
        assert_same_reads(source, path)
    assert seen and all(h.get("x-amz-request-payer") == "requester" and h.get("Authorization") for h in seen)


def test_a_network_that_stays_down_fails_in_one_line_naming_the_url_and_rows(tmp_path, bucket, proxy):
    path = labelled(tmp_path / "a.h5", rows=600)
    url = bucket.put(path)
    down = threading.Event()
    flaky = proxy(fault=lambda method, p, headers, n: "drop" if down.is_set() else None)
    with H5Source(url, x="x", y="y", storage_options=bucket.options(flaky.url), metadata_cache=None,
                  fetch=FAST) as source:
        down.set()
        with pytest.raises(SourceReadError) as info:
            source.read(0, 100, 200)
    message = str(info.value)
    # The rows of the chunk that failed (of the 100-200 asked), the request's bytes: the URL once.
    assert message.startswith(f"{url}: dataset 'x' rows 100-128: bytes ") and "after 4 attempts" in message
    assert message.count(url) == 1, message
    assert "\n" not in message


def test_an_object_replaced_while_it_is_read_is_refused(tmp_path, bucket):
    a = labelled(tmp_path / "a.h5", rows=600, seed=1)
    b = labelled(tmp_path / "b.h5", rows=600, seed=2)
    url = bucket.put(a, "data.h5")
    with H5Source(url, x="x", y="y", storage_options=bucket.options(), fetch=FAST) as source:
        source.read(0, 0, 100)
        bucket.put(b, "data.h5")
        with pytest.raises(SourceError, match=r"the object changed while it was read .*does not mix two versions"):
            source.read(0, 100, 300)


def test_a_pipeline_reading_ahead_refuses_a_replaced_object_and_never_mixes_versions(tmp_path, bucket):
    """Every batch delivered before the failure holds the first version's rows."""
    a = labelled(tmp_path / "a.h5", rows=2000, seed=1)
    b = labelled(tmp_path / "b.h5", rows=2000, seed=2)
    url = bucket.put(a, "data.h5")
    with h5py.File(a) as f:
        first = f["x"][:]
    small = FetchSettings(readahead_bytes=8000, coalesce_bytes=4000, retries=1, backoff_s=0.01)
    with H5Source(url, x="x", y="y", storage_options=bucket.options(), fetch=small,
                  metadata_cache=None) as source:
        plan = Plan(source.rows_per_file, 50, block_rows=32)
        seen = 0
        with pytest.raises(Exception, match="does not mix two versions"), \
                Prefetcher(source, plan.batches(0), plan.blocks, 50, workers=2, max_queue=2) as batches:
            for batch in batches:
                assert batch.arrays["x"].tobytes() == first[seen : seen + batch.size].tobytes()
                seen += batch.size
                if batch.index == 3:
                    bucket.put(b, "data.h5")
        assert seen < 2000


# ------------------------------------------------------------------ damaged objects


def test_a_damaged_object_is_one_line_naming_the_url_dataset_and_rows(tmp_path, bucket):
    """The checks of a file on disk hold for an object in a bucket: the chunk index against
    the object's size when it opens, the edge chunks against h5py's read when it opens (an
    error, not a fallback), a chunk that does not decode when it is read."""
    from pipetrain.errors import InputError
    from pipetrain.source import CorruptDataError
    from tests.test_chunks import corrupt_chunk, four_chunks, patch

    def refused(path, match):
        url = bucket.put(path, f"{uuid.uuid4().hex[:6]}-{Path(path).name}")
        with pytest.raises(InputError, match=match.format(url=url)) as info:
            H5Source(url, x="x", storage_options=bucket.options(), fetch=FAST)
        assert "\n" not in str(info.value)

    cut, _ = four_chunks(tmp_path)
    with h5py.File(cut) as f:
        info = f["x"].id.get_chunk_info(2)  # rows 32-48
    os.truncate(cut, info.byte_offset + info.size // 2)
    patch(cut, 40, info.byte_offset + info.size // 2, 8)  # superblock v0: end-of-file address
    refused(cut, r"{url}: dataset 'x' rows 32-48: its chunk of .* lies outside the file")

    edge = labelled(tmp_path / "edge.h5", rows=300)
    corrupt_chunk(edge, 299)
    refused(edge, r"{url}: dataset 'x' rows 288-300: ")

    middle = labelled(tmp_path / "middle.h5", rows=300)
    corrupt_chunk(middle, 100)
    url = bucket.put(middle)
    with H5Source(url, x="x", storage_options=bucket.options(), fetch=FAST) as source:
        source.read(0, 0, 64)  # the chunks around it still read
        with pytest.raises(CorruptDataError, match=rf"{url}: dataset 'x' rows 96-110: gzip") as caught:
            source.read(0, 90, 110)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("allow_external", [False, True])
def test_an_object_with_external_storage_is_refused_whatever_allow_external_says(tmp_path, bucket, allow_external):
    """HDF5 would open the external file on this machine, not beside the object."""
    with h5py.File(tmp_path / "ext.h5", "w") as f:
        f.create_dataset("x", shape=(10, 2), dtype="float32", external=[("ext.bin", 0, 80)])
    (tmp_path / "ext.bin").write_bytes(bytes(80))
    url = bucket.put(tmp_path / "ext.h5")
    bad(rf"{url}: dataset 'x' is stored in the external file .*ext\.bin; HDF5 would look for that file on this machine",
        url, x="x", storage_options=bucket.options(), fetch=FAST, allow_external=allow_external)


def test_an_object_s_chunks_are_fetched_once_per_read(tmp_path, bucket):
    """No HDF5 lookup of each chunk on its first read (for a file on disk, the check of a
    damaged index): through h5py it would fetch every chunk again, page by page."""
    from pipetrain.ranges import MAX_GAP

    path = labelled(tmp_path / "a.h5", rows=3000, features=40, chunk=50)
    url = bucket.put(path)
    with H5Source(url, x="x", storage_options=bucket.options(), fetch=FAST) as source:
        stats = source._fetcher.stats
        bytes_before, requests_before = stats.bytes, stats.requests
        _, fetched = source.read(0, 0, 3000)
        got, requests = stats.bytes - bytes_before, stats.requests - requests_before
        assert fetched <= got <= fetched + MAX_GAP * requests, (fetched, got, requests)
        assert_same_reads(source, path)


# -------------------------------------------------------------------- https:// and gs://


def test_https_objects_read_with_ranges_and_globs_from_a_listing(tmp_path):
    folder = tmp_path / "www"
    folder.mkdir()
    paths = [labelled(folder / f"part-{i}.h5", rows=150 + i, seed=i) for i in range(2)]
    (folder / "notes.txt").write_text("not data")
    server = FileServer(folder)
    try:
        with H5Source(f"{server.url}/part-*.h5", x="x", y="y", fetch=FAST) as source:
            assert source.paths == [f"{server.url}/part-0.h5", f"{server.url}/part-1.h5"]
            for i, p in enumerate(paths):
                assert_same_reads(source, p, i)
            assert "ranged GETs" in source.read_path()["x"]
            labelled(folder / "part-0.h5", rows=150, seed=7)  # rewritten: a new ETag
            with pytest.raises(SourceError, match="the object changed"):
                source.read(0, 100, 150)
        bad(rf"{server.url}/none\.h5: no such object", f"{server.url}/none.h5", x="x", fetch=FAST)
    finally:
        server.stop()


def test_a_web_servers_glob_leaves_out_folder_links(tmp_path):
    """A listing's link to a folder (sub/) matched https://host/*, and the run failed on
    the folder's own listing page: "not an HDF5 file (24 bytes, no HDF5 signature)"."""
    folder = tmp_path / "www"
    (folder / "sub").mkdir(parents=True)
    path = labelled(folder / "d.h5")
    labelled(folder / "sub" / "e.h5")
    server = FileServer(folder)
    try:
        with H5Source(f"{server.url}/*", x="x", y="y", fetch=FAST, metadata_cache=None) as source:
            assert source.paths == [f"{server.url}/d.h5"]
            assert_same_reads(source, path)
    finally:
        server.stop()


def test_a_web_server_without_etags_has_its_objects_checked_by_last_modified(tmp_path):
    """A server that says an object's version by Last-Modified alone: an object replaced
    while it is read (same size, other bytes) is refused, never read as a mix of two."""
    folder = tmp_path / "www"
    folder.mkdir()
    path = labelled(folder / "d.h5", rows=300, seed=1)
    server = FileServer(folder, etag=False)
    try:
        with H5Source(f"{server.url}/d.h5", x="x", y="y", fetch=FAST, metadata_cache=None) as source:
            assert_same_reads(source, path)
            before, data = path.stat(), bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF  # other bytes, the same size
            path.write_bytes(data)
            os.utime(path, (before.st_mtime + 100, before.st_mtime + 100))
            with pytest.raises(SourceError, match="the object changed while it was read .*Last-Modified"):
                source.read(0, 100, 300)
    finally:
        server.stop()


def test_a_web_server_that_misbehaves_is_told_never_read_wrong(tmp_path):
    """Found by a hostile review, each read before as wrong bytes or as another failure:
    a 206 of other bytes than asked (read as the rows: wrong data), an object truncated
    while it is read (HTTP 416, a read failure), an object stored gzip-encoded (retried,
    then 'expected 250 bytes, got 4448'), a presigned URL whose HEAD is refused (access
    denied, though its GET works), and a server without ETags whose object was replaced
    by one of the same size (read through the metadata cached for the first)."""
    folder = tmp_path / "www"
    folder.mkdir()
    path = labelled(folder / "d.h5", rows=3000, seed=1)
    server = FileServer(folder)
    url = f"{server.url}/d.h5"
    try:
        with H5Source(url, x="x", y="y", fetch=FAST, metadata_cache=None) as source:
            server.faults["wrong_start"] = True
            with pytest.raises(SourceError, match=r"asked for bytes \d+-\d+, the server sent bytes 0-"):
                source.read(0, 1000, 1100)
            server.faults.clear()
            os.truncate(path, path.stat().st_size // 2)  # (this server's ETag changes: its If-Match fails)
            with pytest.raises(SourceError, match="the object changed while it was read .*HTTP 412"):
                source.read(0, 2900, 3000)
        labelled(folder / "d.h5", rows=3000, seed=1)
        server.faults["encoding"] = "gzip"
        bad(r"d.h5: the object is stored gzip-encoded \(Content-Encoding: gzip\)", url, x="x", fetch=FAST,
            metadata_cache=None)
        server.faults.clear()
        server.faults["loop"] = True  # it said "cannot be read: 0, message='', url='...'"
        bad(r"d.h5: cannot be read: too many redirects \(a redirect loop\?\), the last to http", url, x="x",
            fetch=FAST, metadata_cache=None)
        server.faults.clear()
        server.faults["weak"] = True  # W/"...": read, not refused by If-Match
        with H5Source(url, x="x", y="y", fetch=FAST, metadata_cache=None) as source:
            assert_same_reads(source, path)
        server.faults.clear()
        server.faults["head403"] = True
        with H5Source(url + "?X-Amz-Signature=abc", x="x", y="y", fetch=FAST, metadata_cache=None) as source:
            assert_same_reads(source, path)
    finally:
        server.stop()
    plain = FileServer(folder, etag=False)  # Last-Modified alone: a second apart at best
    cache = tmp_path / "cache"
    try:
        def write(order, seed):
            x = np.random.default_rng(seed).normal(size=(3000, 40)).astype("f4")
            with h5py.File(folder / "e.h5", "w") as f:
                for name in order:
                    f.create_dataset(name, data=x if name == "x" else np.arange(3000) % 3,
                                     chunks=(64, 40) if name == "x" else (128,))
        write("xy", 1)
        with H5Source(f"{plain.url}/e.h5", x="x", y="y", fetch=FAST, metadata_cache=cache) as source:
            source.read(0, 0, 3000)
        size = (folder / "e.h5").stat().st_size
        write("yx", 2)  # the same size, other places, within the same second (or not: the same either way)
        assert (folder / "e.h5").stat().st_size == size
        with H5Source(f"{plain.url}/e.h5", x="x", y="y", fetch=FAST, metadata_cache=cache) as source:
            with h5py.File(folder / "e.h5") as f:
                np.testing.assert_array_equal(source.read(0, 0, 3000)[0]["x"], f["x"][:])
            os.truncate(folder / "e.h5", size // 2)  # no ETag: the server answers the range past the end 416
            with pytest.raises(SourceError, match=f"the object changed while it was read .*size {size} became"):
                source.read(0, 2900, 3000)
    finally:
        plain.stop()


def test_a_bucket_key_that_looks_like_a_glob_is_that_object_when_it_exists(bucket, tmp_path):
    """s3://b/train[1].h5 read train1.h5 instead, and s3://b/a?.h5 added ab.h5 to it;
    a path that exists is that file, as for local paths."""
    for key, rows in (("train[1].h5", 100), ("train1.h5", 70), ("a?.h5", 100), ("ab.h5", 70)):
        bucket.put(labelled(tmp_path / f"{rows}.h5", rows=rows, chunk=4), key)
    for key in ("train[1].h5", "a?.h5"):
        url = f"s3://{bucket.name}/{key}"
        with H5Source(url, x="x", y="y", fetch=FAST, storage_options=bucket.options()) as source:
            assert source.paths == [url] and source.rows == 100
    with H5Source(f"s3://{bucket.name}/train*.h5", x="x", y="y", fetch=FAST, storage_options=bucket.options()) as source:
        assert sorted(source.paths) == [f"s3://{bucket.name}/train1.h5", f"s3://{bucket.name}/train[1].h5"]


def test_a_bucket_or_a_folder_given_as_a_file_is_told_so(bucket, tmp_path):
    """It said 'not an HDF5 file (0 bytes, no HDF5 signature)'."""
    bucket.put(labelled(tmp_path / "a.h5"), "dir/a.h5")
    for url in (f"s3://{bucket.name}", f"s3://{bucket.name}/", f"s3://{bucket.name}/dir"):
        bad(rf"{re.escape(url)}: a bucket or a folder of objects, not an object; name a file, or its files with a "
            rf"glob \({re.escape(url.rstrip('/'))}/\*\.h5\)", url, x="x", storage_options=bucket.options(), fetch=FAST)


def test_a_glob_leaves_out_the_empty_markers_of_folders(bucket, moto, tmp_path):
    """A console's "create folder" stores an empty object whose key ends in '/': a glob
    such as s3://b/data/** took it as a file, and the run failed on it ("not an HDF5 file
    (0 bytes, no HDF5 signature)")."""
    import boto3

    client = boto3.client("s3", endpoint_url=moto, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    for key in ("data/", "data/sub/"):
        client.put_object(Bucket=bucket.name, Key=key, Body=b"")
    urls = [bucket.put(labelled(tmp_path / "a.h5"), "data/a.h5"), bucket.put(labelled(tmp_path / "b.h5"), "data/sub/b.h5")]
    with H5Source(f"s3://{bucket.name}/data/**", x="x", y="y", storage_options=bucket.options(), fetch=FAST,
                  metadata_cache=None) as source:
        assert source.paths == urls


def test_an_object_url_with_a_trailing_slash_is_told_it_names_a_folder(bucket, tmp_path):
    """s3fs finds s3://b/a.h5/ as the object a.h5, but every GET asks for the key 'a.h5/'
    (404): the run said "the object changed while it was read"."""
    url = bucket.put(labelled(tmp_path / "a.h5"), "a.h5")
    bad(rf"{re.escape(url)}/: a key ending in '/' names a folder, not an object \(the object is {re.escape(url)}\)$",
        url + "/", x="x", storage_options=bucket.options(), fetch=FAST, metadata_cache=None)


def test_a_web_servers_answer_to_opening_an_object_is_told_as_it_is(tmp_path):
    """Opening an https:// object: a server that does not answer fails after the reads'
    time-out and retries (not minutes later, not as "no such object"); 403 is access
    denied, 500 is retried and then a read failure, 404 is a missing object."""
    import time

    folder = tmp_path / "www"
    folder.mkdir()
    labelled(folder / "d.h5", rows=300)
    server = FileServer(folder)
    answers = {}

    def fault(method, path, headers, n):
        answer = answers.get(method)
        if answer == "hang":
            time.sleep(30)
            return "drop"
        return answer

    proxy = FaultProxy(server.url, fault=fault)
    quick = FetchSettings(retries=1, backoff_s=0.01, max_backoff_s=0.05, timeout_s=0.5)
    try:
        for head, get, error, match in [
            ("hang", "hang", SourceReadError, "d.h5: cannot be read: TimeoutError"),
            (403, None, SourceError, "d.h5: access denied"),
            (500, 500, SourceReadError, "d.h5: cannot be read: HTTP 500"),
            (404, None, SourceError, "d.h5: no such object or bucket"),
            (405, None, None, None),  # no HEAD: a one-byte ranged GET says the size and version
        ]:
            answers.update(HEAD=head, GET=get)
            t0 = time.monotonic()
            if error is None:
                with H5Source(f"{proxy.url}/d.h5", x="x", y="y", fetch=quick, metadata_cache=None) as source:
                    assert_same_reads(source, folder / "d.h5")
                continue
            with pytest.raises(error, match=match):
                H5Source(f"{proxy.url}/d.h5", x="x", y="y", fetch=quick, metadata_cache=None)
            assert time.monotonic() - t0 < 10, head  # a hang guard: the server would take 30 s a request
    finally:
        proxy.stop()
        server.stop()


def test_requests_that_fail_after_the_reader_closed_leave_no_error_unread(caplog):
    """A request cancelled by close() that fails anyway (the object changed) must not
    leave asyncio printing "Task exception was never retrieved" on stderr."""
    import asyncio
    import gc
    import time

    from pipetrain.remote import ObjectChangedError, ObjectInfo

    class Store:
        loop = asyncio.new_event_loop()

        async def get(self, obj, start, stop):
            try:
                await asyncio.sleep(0.2)
            finally:  # refuses to be cancelled, as a request finishing its error does
                raise ObjectChangedError(f"{obj.url}: the object changed")

    store = Store()
    thread = threading.Thread(target=store.loop.run_forever, daemon=True)
    thread.start()
    try:
        fetcher = Fetcher(FAST)
        obj = ObjectInfo("http://host/a.h5", 1000, '"v1"')
        fetcher.will_need(obj, store, [(0, 100), (500, 100)])
        time.sleep(0.05)
        fetcher.close()
        time.sleep(0.4)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), store.loop).result()
        gc.collect()
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    finally:
        store.loop.call_soon_threadsafe(store.loop.stop)
        thread.join(5)


@pytest.fixture(scope="module")
def gcs_emulator():
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # the emulator has no gRPC layout API
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    from tests.remote_helpers import free_port

    port = free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="gcs-bucket")
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_gs_objects_read_like_the_local_file_and_a_new_generation_is_refused(tmp_path, gcs_emulator):
    import gcsfs

    options = {"endpoint_url": gcs_emulator, "token": "anon", "project": "test"}
    fs = gcsfs.GCSFileSystem(**options)
    a = labelled(tmp_path / "a.h5", rows=400, seed=1)
    fs.put(str(a), "gcs-bucket/dir/a.h5")
    with H5Source("gs://gcs-bucket/dir/*.h5", x="x", y="y", storage_options=options, fetch=FAST) as source:
        assert source.paths == ["gs://gcs-bucket/dir/a.h5"]
        assert_same_reads(source, a)
        fs.put(str(labelled(tmp_path / "b.h5", rows=400, seed=2)), "gcs-bucket/dir/a.h5")
        with pytest.raises(SourceError, match="the object changed"):
            source.read(0, 100, 300)


# ---------------------------------------------------------------------- training and CLI


@pytest.mark.model
def test_a_run_from_s3_equals_the_run_from_the_local_file(tmp_path, bucket):
    import keras

    import pipetrain

    path = labelled(tmp_path / "a.h5", rows=700)
    url = bucket.put(path)

    def run(data, history):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dense(3, activation="softmax")])
        model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        source = H5Source(data, x="x", y="y", storage_options=bucket.options(), fetch=FAST)
        with source:
            hist = pipetrain.train(model, source, epochs=2, batch_size=32, shuffle="block", seed=3,
                                   history=history, verbose=0, monitor_interval=None, shuffle_window=100)
        return model.get_weights(), hist.history

    local_w, local_h = run(str(path), tmp_path / "local" / "history.jsonl")
    remote_w, remote_h = run(url, tmp_path / "remote" / "history.jsonl")
    assert local_h == remote_h
    for a, b in zip(local_w, remote_w, strict=True):
        assert a.tobytes() == b.tobytes()
    record = pipetrain.read_history(tmp_path / "remote" / "history.jsonl").runs[0]
    assert record["data"]["files"] == [url]


def tiny_model(source):
    import keras

    model = keras.Sequential([keras.Input(source.fields["x"].row_shape), keras.layers.Dense(4, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    return model


def cli(monkeypatch, capsys, env: dict, *args) -> tuple[int, str, str]:
    """`pipetrain ARGS` in this process, with ``env`` set (an endpoint read afresh)."""
    import s3fs

    from pipetrain import remote
    from pipetrain.cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(remote, "_cache", {})
    s3fs.S3FileSystem.clear_instance_cache()
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_a_url(tmp_path, bucket, monkeypatch, capsys):
    """`pipetrain inspect s3://...`, the endpoint from AWS_ENDPOINT_URL."""
    from pipetrain import remote
    from pipetrain.cli import main

    url = bucket.put(labelled(tmp_path / "a.h5"))
    monkeypatch.setattr(remote, "_cache", {})
    for key, value in s3_env(bucket.endpoint).items():
        monkeypatch.setenv(key, value)
    assert main(["inspect", url]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{url}  (")
    assert "raw chunks: gzip via" in out and "parallel ranged GETs" in out
    assert main(["inspect", f"s3://{bucket.name}/none.h5"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and f"s3://{bucket.name}/none.h5: no such object" in err


@pytest.mark.model
def test_cli_run_fails_when_the_network_drops_and_resumes_elsewhere_to_the_same_weights(
        tmp_path, bucket, proxy, monkeypatch, capsys):
    """`pipetrain train --data s3://...` with AWS_ENDPOINT_URL: the network goes down
    mid-epoch; after the retries the run fails in one line naming the URL and rows,
    status failed, the checkpoint kept. `--resume` from a copy of the run folder (another
    machine: another folder, an empty metadata cache) finishes the run with the weights of
    a run that never failed."""
    import keras

    import pipetrain

    # Rows of 4096 floats: blocks of 64 rows (2 chunks), 10 blocks an epoch.
    path = labelled(tmp_path / "a.h5", rows=640, features=4096)
    url = bucket.put(path)
    args = ["train", "--data", url, "--x", "x", "--y", "y", "--epochs", "2", "--batch-size", "32",
            "--model", "tests.test_buckets:tiny_model", "--checkpoint-every", "3", "--shuffle-window", "128",
            "--quiet", "--monitor-interval", "60", "--partitions", "1"]  # read-ahead: one 128-row window
    env = {**s3_env(bucket.endpoint), "PIPETRAIN_FETCH": "retries=2 backoff_s=0.01"}
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(monkeypatch, capsys, env, *args, "--history", str(tmp_path / "whole" / "history.jsonl"))
    assert code == 0, err

    run = tmp_path / "here" / "run"

    def batches_trained() -> int:
        try:
            return (run / "history.jsonl").read_text().count('"type":"batch"')
        except OSError:
            return 0

    # Once 4 batches are trained, every ranged GET is dropped: decided as each request
    # comes (the producers run a batch or two ahead), so however slowly the run goes.
    flaky = proxy(fault=lambda method, p, headers, n: "drop" if headers.get("Range") and batches_trained() >= 4 else None)
    env_flaky = {**env, "AWS_ENDPOINT_URL": flaky.url, "PIPETRAIN_CACHE": str(tmp_path / "cache-a"),
                 "PIPETRAIN_FETCH": "retries=2 backoff_s=0.01 readahead_bytes=1"}
    code, _, err = cli(monkeypatch, capsys, env_flaky, *args, "--workers", "1", "--max-queue", "1",
                       "--history", str(run / "history.jsonl"))
    line = err.strip()
    assert code == 1, err
    assert "\n" not in line and url in line and "rows" in line and "after 3 attempts" in line, line
    history = pipetrain.read_history(run / "history.jsonl")
    assert history.end["status"] == "failed" and url in history.end["error"]
    assert history.runs[0]["data"]["files"] == [url]
    # After a checkpoint, before the end (a history written in bursts may show the 4th
    # batch late, but the producers run at most a few batches ahead of the file).
    assert 4 <= history.end["steps"] < 40, history.end
    assert list((run / "checkpoint").glob("ckpt-*"))

    elsewhere = tmp_path / "there" / "run"
    shutil.copytree(run, elsewhere)
    shutil.rmtree(run)
    env_there = {**env, "PIPETRAIN_CACHE": str(tmp_path / "cache-b")}
    code, _, err = cli(monkeypatch, capsys, env_there, "train", "--resume", str(elsewhere), "--quiet")
    assert code == 0, err
    resumed = pipetrain.read_history(elsewhere / "history.jsonl")
    assert resumed.end["status"] == "completed" and resumed.runs[-1]["resume"] is not None
    assert resumed.runs[-1]["data"]["files"] == [url]
    whole = keras.saving.load_model(tmp_path / "whole" / "model.keras").get_weights()
    again = keras.saving.load_model(elsewhere / "model.keras").get_weights()
    for a, b in zip(whole, again, strict=True):
        assert a.tobytes() == b.tobytes()


# -------------------------------------------------------------------------- the guide


@pytest.mark.model
@pytest.mark.one_backend  # its subject is the guide's commands; a run from s3:// on each backend is tested above
def test_the_guide_examples_run_as_written(tmp_path, bucket, monkeypatch, capsys):
    """docs/buckets.md: its commands (in this process) and its Python example, against the
    local S3 endpoint (AWS_ENDPOINT_URL), on a bucket named as in the guide."""
    import re
    import shlex

    import s3fs

    text = (ROOT / "docs" / "buckets.md").read_text()
    shell = [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]
    python = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert shell and python
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": bucket.endpoint})
    if not fs.exists("my-bucket"):
        fs.mkdir("my-bucket")
    for i in range(2):
        labelled(tmp_path / f"train-{i}.h5", rows=300, seed=i)
        fs.put(str(tmp_path / f"train-{i}.h5"), f"my-bucket/digits/train-{i}.h5")
    labelled(tmp_path / "val.h5", rows=200, seed=9)
    fs.put(str(tmp_path / "val.h5"), "my-bucket/digits/val.h5")
    # The guide's profile, as ~/.aws would hold it: keys and the endpoint.
    (tmp_path / "aws-config").write_text(f"[profile research]\nregion = us-east-1\nendpoint_url = {bucket.endpoint}\n")
    (tmp_path / "aws-credentials").write_text("[research]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    env = {"AWS_CONFIG_FILE": str(tmp_path / "aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials"),
           "PIPETRAIN_CACHE": str(tmp_path / "c")}
    monkeypatch.chdir(tmp_path)
    commands = 0
    for block in shell:
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("pip install"):
                continue
            if line.startswith("export "):
                key, _, value = line[len("export "):].partition("=")
                env[key] = value
                continue
            argv = shlex.split(line, comments=True)
            assert argv[0] == "pipetrain", line
            code, out, err = cli(monkeypatch, capsys, env, *argv[1:])
            assert code == 0, (line, err)
            commands += 1
    assert commands == 3
    assert pipetrain_history(tmp_path / "runs" / "from-bucket").end["status"] == "completed"
    (tmp_path / "example.py").write_text("\n".join(python).replace(
        '"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}',
        f'"client_kwargs": {{"endpoint_url": "{bucket.endpoint}"}}'))
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert env["AWS_PROFILE"] == "research"  # the credentials came from the profile
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["rows"] == 600


def pipetrain_history(folder: Path):
    import pipetrain

    return pipetrain.read_history(folder / "history.jsonl")


@pytest.mark.parametrize("through", ["presigned", "botocore"])
def test_an_object_version_named_in_the_url_is_the_one_read(bucket, moto, tmp_path, through):
    """s3://b/d.h5?versionId=V on a versioned bucket: the ranged reads asked for the key's
    newest version, not V (and failed: 'the object changed while it was read')."""
    import boto3

    client = boto3.client("s3", endpoint_url=moto, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    client.put_bucket_versioning(Bucket=bucket.name, VersioningConfiguration={"Status": "Enabled"})
    old, new = labelled(tmp_path / "old.h5", seed=0), labelled(tmp_path / "new.h5", seed=1)
    first = client.put_object(Bucket=bucket.name, Key="d.h5", Body=old.read_bytes())["VersionId"]
    client.put_object(Bucket=bucket.name, Key="d.h5", Body=new.read_bytes())
    url = f"s3://{bucket.name}/d.h5?versionId={first}"
    options = {**bucket.options(), "version_aware": True, **({"requester_pays": True} if through == "botocore" else {})}
    with H5Source(url, x="x", y="y", storage_options=options, fetch=FAST, metadata_cache=None) as source:
        assert source._remote[0].store.presigned == (through == "presigned")
        assert_same_reads(source, old)
