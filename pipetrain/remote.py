"""Objects in buckets and on web servers: URLs, their stores, versions and errors.

A URL (``s3://bucket/key``, ``gs://bucket/key``, ``https://host/path``) names an object
that pipetrain reads with ranged GETs. This module is the one place that knows the
object stores: it finds the fsspec filesystem for a URL (``s3fs``, ``gcsfs``, fsspec's
HTTP), lists globs, reads an object's size and version (S3's ETag, GCS's generation, a
web server's ETag), and makes ONE ranged GET of it, saying what a failure means:

- ``missing`` (no such bucket or key), ``denied`` (credentials refused): bad input;
- ``changed``: the object is not the version opened (S3 ``If-Match``, a GCS request
  pinned to the generation, a web server's ETag or size): never mix two versions;
- ``transient``: throttling (503 SlowDown, 429), server errors, dropped connections,
  time-outs: worth another try (the retries are :mod:`pipetrain.ranges`' job);
- ``other``: anything else, not retried.

Credentials and endpoints are fsspec's: ``storage_options`` in Python; on the command
line the usual environment (``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``,
``GOOGLE_APPLICATION_CREDENTIALS``, ``STORAGE_EMULATOR_HOST``, ...). fsspec and the
store packages are imported only when a URL is used: ``import pipetrain`` stays free of
them, and a missing package is one line naming the extra to install.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import threading
import time
import weakref
from dataclasses import dataclass, replace

from pipetrain.errors import InputError

__all__ = ["ObjectInfo", "RemoteInputError", "is_url", "store_for", "stat", "expand", "classify"]

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

# scheme -> (the package that serves it, the extra that installs it)
SCHEMES = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "http": ("aiohttp", "http"),
    "https": ("aiohttp", "http"),
}


class RemoteInputError(InputError):
    """A URL that cannot be used: unknown scheme, missing package, bucket or key, access denied."""


class ObjectChangedError(RemoteInputError):
    """The object was replaced while it was read: its version no longer matches."""


class RemoteReadError(OSError):
    """A ranged read failed for good (after the retries a transient failure gets)."""


def is_url(text) -> bool:
    """Whether a path given by the user is a URL (``scheme://...``) rather than a local path."""
    return isinstance(text, str) and _URL.match(text) is not None


def scheme(url: str) -> str:
    return _URL.match(url).group(1).lower()


@dataclass(frozen=True)
class ObjectInfo:
    """One object as opened: what must stay the same while it is read."""

    url: str
    size: int
    version: str | None  # S3/HTTP ETag, GCS generation; None when the server gives none
    validator: str = "ETag"  # the response header that says the version (a web server's Last-Modified)

    def key(self) -> str:
        """Identifies this version of the object (for caches)."""
        return f"{self.url}\n{self.version}\n{self.size}"

    @property
    def versioned(self) -> bool:
        """Whether its version tells its bytes apart: a strong ETag or a generation, not a
        weak ETag (W/"...": the same meaning, maybe other bytes), a Last-Modified (a second
        apart at best) or nothing."""
        return self.version is not None and self.validator != "Last-Modified" and not self.version.startswith("W/")


# ----------------------------------------------------------------------------- stores


class Store:
    """The filesystem of one scheme (with its storage options): stat, list, one ranged GET."""

    def __init__(self, fs, protocol: str):
        self.fs, self.protocol = fs, protocol

    @property
    def loop(self):
        return self.fs.loop

    def path(self, url: str) -> str:
        return url

    def url(self, path: str) -> str:
        return path if is_url(path) else f"{self.protocol}://{path}"

    def info(self, url: str, settings=None) -> ObjectInfo:
        """Size and version of the object at ``url`` (raises what :func:`classify` knows);
        ``settings``: the reads' :class:`pipetrain.ranges.FetchSettings`, where the store
        uses them."""
        info = self.fs.info(self.path(url))
        if info.get("type") == "directory":  # (it said "not an HDF5 file (0 bytes)")
            raise RemoteInputError(f"{url}: a bucket or a folder of objects, not an object; name a file, "
                                   f"or its files with a glob ({url.rstrip('/')}/*.h5)")
        if url.endswith("/"):  # s3fs (gcsfs) found the key without its slash; every GET would ask with it
            raise RemoteInputError(f"{url}: a key ending in '/' names a folder, not an object "
                                   f"(the object is {url.rstrip('/')})")
        return self.object(url, info)

    def object(self, url: str, info: dict) -> ObjectInfo:
        size = info.get("size")
        if size is None:
            raise RemoteInputError(f"{url}: the server does not say the object's size; pipetrain needs it for ranged reads")
        return ObjectInfo(url, int(size), self.version(info))

    def version(self, info: dict) -> str | None:
        return info.get("ETag") or info.get("etag") or None

    def glob(self, pattern: str) -> list[ObjectInfo]:
        found = self.fs.glob(self.path(pattern), detail=True)
        # (a key ending in '/' is a folder too: the empty marker a console's "create folder" makes)
        return [self.object(self.url(name), info) for name, info in sorted(found.items())
                if info.get("type", "file") != "directory" and not name.endswith("/")]

    async def get(self, obj: ObjectInfo, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of this version of the object, in one request."""
        raise NotImplementedError


class S3Store(Store):
    """S3 through s3fs. Ranged GETs go to a presigned URL of the object with a plain
    HTTP client: the signing, hooks and response parsing of botocore cost about 2 ms of
    CPU per request (measured: 2.5 ms against 0.7 ms for the same GET by aiohttp), CPU
    taken from the training beside it. The URL is signed by the filesystem's own client
    (its credentials, region, endpoint and addressing) and signed again every few
    minutes, and again when the server refuses it. A filesystem with options that must
    go into every request (requester pays, SSE-C keys, proxies in its config, a custom
    certificate check) makes its GETs through botocore, as before."""

    SIGN_S = 3600  # a presigned URL is valid this long
    RESIGN_S = 300  # and used this long (temporary credentials are renewed well before they expire)

    def __init__(self, fs, protocol: str):
        super().__init__(fs, protocol)
        self._signed: dict[tuple[str, str], tuple[str, float]] = {}
        self._session = None
        self.presigned = not (getattr(fs, "req_kw", None) or getattr(fs, "s3_additional_kwargs", None)
                              or (getattr(fs, "config_kwargs", None) or {}).get("proxies")
                              or (getattr(fs, "client_kwargs", None) or {}).get("verify") not in (None, True))

    def path(self, url: str) -> str:
        return url.split("://", 1)[1]

    async def get(self, obj: ObjectInfo, start: int, stop: int) -> bytes:
        # (the version a URL names, ?versionId=..., not the key's newest: the one the open read)
        bucket, key, version_id = self.fs.split_path(self.path(obj.url))
        if not self.presigned:
            return await self._get_botocore(obj, bucket, key, version_id, start, stop)
        headers = {"If-Match": obj.version} if obj.version else {}
        session = await self._http()
        for fresh in (False, True):
            url = await self._url(bucket, key, version_id, fresh)
            try:
                return await _ranged(session, url, headers, obj, start, stop)
            except _HTTPStatus as e:
                if e.status != 403 or fresh:
                    raise
        raise AssertionError("unreachable")

    async def _url(self, bucket: str, key: str, version_id: str | None, fresh: bool):
        import yarl

        signed = self._signed.get((bucket, key, version_id))
        if fresh or signed is None or time.monotonic() - signed[1] > self.RESIGN_S:
            client = await self.fs.get_s3(bucket)
            params = {"Bucket": bucket, "Key": key, **({"VersionId": version_id} if version_id else {})}
            url = await client.generate_presigned_url("get_object", Params=params, ExpiresIn=self.SIGN_S)
            signed = self._signed[bucket, key, version_id] = (yarl.URL(url, encoded=True), time.monotonic())
        return signed[0]

    async def _http(self):
        if self._session is None:
            import aiohttp
            from fsspec.implementations.http import HTTPFileSystem

            bundle = os.environ.get("AWS_CA_BUNDLE")
            connector = aiohttp.TCPConnector(limit=0, ssl=ssl.create_default_context(cafile=bundle) if bundle else True)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=True)
            weakref.finalize(self, HTTPFileSystem.close_session, self.loop, self._session)
        return self._session

    async def _get_botocore(self, obj: ObjectInfo, bucket: str, key: str, version_id: str | None, start: int,
                            stop: int) -> bytes:
        client = await self.fs.get_s3(bucket)
        extra = {**self.fs.s3_additional_kwargs, **self.fs.req_kw}
        filter_kwargs = getattr(self.fs, "_filter_kwargs", None)  # s3fs drops what GetObject does not take
        extra = filter_kwargs(client.get_object, extra) if filter_kwargs else {}
        if obj.version:
            extra["IfMatch"] = obj.version
        if version_id:
            extra["VersionId"] = version_id
        response = await client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{stop - 1}", **extra)
        try:
            if obj.version and response.get("ETag") not in (None, obj.version):
                raise _Changed(f"ETag {obj.version} became {response.get('ETag')}")
            return await response["Body"].read()
        finally:
            response["Body"].close()


class _HTTPStatus(OSError):
    """A response with an error status (for :func:`classify`)."""

    def __init__(self, status: int, text: str):
        code = re.search(r"<Code>([^<]+)</Code>", text)
        self.code = code.group(1) if code else None
        message = re.search(r"<Message>([^<]+)</Message>", text)
        if self.code:  # an S3 error document: its code and message, not the XML
            text = self.code + (f": {message.group(1)}" if message else "")
        super().__init__(f"HTTP {status}{': ' + text if text else ''}")
        self.status = status


class _Changed(OSError):
    pass


async def _ranged(session, url: str, headers: dict, obj: ObjectInfo, start: int, stop: int,
                  etag_header: str = "ETag", **kwargs) -> bytes:
    """One GET of bytes [start, stop) with an aiohttp session, checked: a 206 whose range,
    total size and version are the object's as opened."""
    headers = {**headers, "Range": f"bytes={start}-{stop - 1}", "Accept-Encoding": "identity"}
    async with session.get(url, headers=headers, **kwargs) as r:
        spans, total = _content_range(r.headers.get("Content-Range", ""))
        if r.status == 416 and total is not None and total != obj.size:  # (a range inside the size opened)
            raise _Changed(f"size {obj.size} became {total}")
        if r.status >= 400:
            text = (await r.read())[:200].decode("utf-8", "replace")
            raise _HTTPStatus(r.status, " ".join(text.split()))
        encoding = r.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise RemoteInputError(f"{obj.url}: the object is stored {encoding}-encoded (Content-Encoding: "
                                   f"{encoding}); pipetrain reads ranges of a plain HDF5 file")
        if r.status != 206 and not (start == 0 and stop == obj.size):
            raise RemoteInputError(f"{obj.url}: the server does not honour Range requests (HTTP {r.status}); "
                                   "pipetrain reads objects in ranges")
        if total is not None and total != obj.size:
            raise _Changed(f"size {obj.size} became {total}")
        if r.status == 206 and spans is not None and spans != (start, stop - 1):
            raise RemoteInputError(f"{obj.url}: asked for bytes {start}-{stop - 1}, the server sent bytes "
                                   f"{spans[0]}-{spans[1]}; pipetrain reads objects in ranges")
        version = r.headers.get(etag_header)
        if obj.version and version and version != obj.version:
            raise _Changed(f"{etag_header} {obj.version} became {version}")
        return await r.read()


def _content_range(value: str) -> tuple[tuple[int, int] | None, int | None]:
    """``bytes FIRST-LAST/TOTAL`` (or ``bytes */TOTAL``): ((first, last) or None, total or None)."""
    unit, _, rest = value.strip().partition(" ")
    span, _, total = rest.partition("/")
    first, dash, last = span.partition("-")
    spans = (int(first), int(last)) if unit == "bytes" and dash and first.isdigit() and last.isdigit() else None
    return spans, int(total) if total.isdigit() else None


class HTTPStore(Store):
    """A web server. An object's size and version come from a HEAD of pipetrain's own,
    under the reads' time-out and retries (fsspec's waits minutes for a server that does
    not answer, and reads every failure as a missing file). The version is the ETag, or
    Last-Modified from a server that sends no ETag; every ranged GET checks it."""

    def version(self, info: dict) -> str | None:
        return info.get("ETag") or info.get("Last-Modified") or None

    def object(self, url: str, info: dict) -> ObjectInfo:
        obj = super().object(url, info)
        return obj if info.get("ETag") or not obj.version else replace(obj, validator="Last-Modified")

    def info(self, url: str, settings=None) -> ObjectInfo:
        from pipetrain.ranges import FetchSettings

        return asyncio.run_coroutine_threadsafe(self._info(url, settings or FetchSettings.from_env()),
                                                self.loop).result()

    async def _info(self, url: str, settings) -> ObjectInfo:
        attempt = 0
        while True:
            try:
                return self.object(url, await within(self._head(url), settings.timeout_s))
            except Exception as exc:
                if classify(exc) != "transient" or attempt >= settings.retries:
                    raise
                await asyncio.sleep(settings.backoff(attempt))
                attempt += 1

    async def _head(self, url: str) -> dict:
        """The headers that say an object's size and version: a HEAD's, or where the
        server does not answer HEAD (or gives no size there) a one-byte ranged GET's."""
        session = await self.fs.set_session()
        kwargs = dict(self.fs.kwargs)
        headers = {**(kwargs.pop("headers", None) or {}), "Accept-Encoding": "identity"}
        target = self.fs.encode_url(url)
        async with session.head(target, headers=headers, **{"allow_redirects": True, **kwargs}) as r:
            size = r.headers.get("Content-Length", "")
            # 405, 501: HEAD not served; 403 where the URL is signed for GET (a presigned
            # URL: the GET below says whether access is denied)
            if r.status >= 400 and r.status not in (405, 501) and not (r.status == 403 and "?" in url):
                raise _HTTPStatus(r.status, "")
            if r.status < 400 and size.isdigit():
                return {"size": int(size), "ETag": r.headers.get("ETag"), "Last-Modified": r.headers.get("Last-Modified")}
        async with session.get(target, headers={**headers, "Range": "bytes=0-0"}, **kwargs) as r:
            if r.status >= 400:
                raise _HTTPStatus(r.status, (await r.read())[:200].decode("utf-8", "replace"))
            total = r.headers.get("Content-Range", "").rpartition("/")[2]
            size = total if total.isdigit() else r.headers.get("Content-Length") if r.status == 200 else None
            return {"size": int(size) if size else None, "ETag": r.headers.get("ETag"),
                    "Last-Modified": r.headers.get("Last-Modified")}

    def glob(self, pattern: str) -> list[ObjectInfo]:
        # fsspec lists a web server's links; their size and version come from a HEAD each. A link
        # ending in '/' is a folder (its listing page was taken for a file: "not an HDF5 file").
        return [self.info(url) for url in sorted(self.fs.glob(pattern)) if not url.endswith("/")]

    async def get(self, obj: ObjectInfo, start: int, stop: int) -> bytes:
        session = await self.fs.set_session()
        kwargs = dict(self.fs.kwargs)
        headers = dict(kwargs.pop("headers", None) or {})
        # The server refuses (412) a version other than the one opened, where it knows it; a
        # weak ETag (W/"...") never matches If-Match (RFC 9110): the answers' ETags are compared.
        if obj.validator == "ETag" and obj.version and not obj.version.startswith("W/"):
            headers["If-Match"] = obj.version
        elif obj.validator == "Last-Modified" and obj.version:
            headers["If-Unmodified-Since"] = obj.version
        return await _ranged(session, self.fs.encode_url(obj.url), headers, obj, start, stop,
                             etag_header=obj.validator, **kwargs)


class GCSStore(Store):
    def path(self, url: str) -> str:
        return url.split("://", 1)[1]

    def version(self, info: dict) -> str | None:
        return str(info["generation"]) if info.get("generation") else None

    async def get(self, obj: ObjectInfo, start: int, stop: int) -> bytes:
        # Pinned to the generation opened: a replaced object answers 404, never new bytes.
        await self.fs._set_session()
        url = self.fs.url(self.path(obj.url), generation=obj.version)
        return await _ranged(self.fs.session, url, self.fs._get_headers({}), obj, start, stop,
                             etag_header="x-goog-generation", timeout=self.fs.requests_timeout)


_STORES = {"s3": S3Store, "s3a": S3Store, "gs": GCSStore, "gcs": GCSStore, "http": HTTPStore, "https": HTTPStore}
_cache: dict[tuple, Store] = {}
_cache_lock = threading.Lock()


def store_for(url: str, storage_options: dict | None = None) -> Store:
    """The store serving ``url`` (one per scheme and storage options, kept for the process)."""
    name = scheme(url)
    if name not in SCHEMES:
        known = ", ".join(f"{s}://" for s in ("s3", "gs", "https", "http"))
        raise RemoteInputError(f"{url}: pipetrain reads {known} URLs, not {name}://")
    options = dict(storage_options or {})
    key = (name, repr(sorted(options.items())))
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        package, extra = SCHEMES[name]
        try:
            import fsspec

            __import__(package)
            fs = fsspec.filesystem(name, **_defaults(name, options))
        except ImportError as e:
            raise RemoteInputError(
                f"{url}: reading {name}:// URLs needs {package} ({e.name or package} is missing): "
                f"pip install 'pipetrain[{extra}]'"
            ) from None
        store = _cache[key] = _STORES[name](fs, name)
        return store


def _defaults(name: str, options: dict) -> dict:
    """Storage options with pipetrain's defaults where the user set none: one retry policy
    (pipetrain's, :mod:`pipetrain.ranges`) instead of botocore's retries inside it."""
    if name in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
        config.setdefault("max_pool_connections", 64)
        return {**options, "config_kwargs": config}
    return options


def stat(url: str, storage_options: dict | None = None, settings=None) -> ObjectInfo:
    """Size and version of one object; bad input (one line) when it is missing or
    denied, a :class:`RemoteReadError` when the network failed (``settings``: the
    reads' time-out and retries, where the store uses them)."""
    store = store_for(url, storage_options)
    try:
        info = store.info(url, settings)
    except RemoteInputError:
        raise
    except Exception as e:
        raise _input_error(url, e) from None
    return info


def expand(pattern: str, storage_options: dict | None = None) -> list[ObjectInfo]:
    """The objects a URL glob matches, sorted (sizes and versions from the listing); an
    object whose key is the pattern itself (``train[1].h5``) is that object, as a local
    path that exists is that file (the glob read train1.h5 instead, or added ab.h5 to a?.h5)."""
    store = store_for(pattern, storage_options)
    # (not for a pattern with * alone, the usual glob: its key is no real object's, and the
    # look would cost a request or two each time)
    literal = _literal(store, pattern) if any(c in pattern.split("://", 1)[1] for c in "[?") else None
    if literal is not None:
        return [literal]
    try:
        found = store.glob(pattern)
    except RemoteInputError:
        raise
    except Exception as e:
        raise _input_error(pattern, e) from None
    if not found:
        raise RemoteInputError(f"{pattern}: no object matches")
    return found


def _literal(store: Store, url: str) -> ObjectInfo | None:
    """The object at ``url`` taken literally, or None where there is none (or a prefix:
    nothing in it)."""
    try:
        obj = store.info(url)
    except Exception:  # no such object (the usual case for a glob), or it cannot say: the glob decides
        return None
    return obj if obj.size else None


def _input_error(url: str, exc: BaseException) -> RemoteInputError | RemoteReadError:
    kind = classify(exc)
    detail = describe(exc)
    if kind == "transient":  # after the retries: the network or the server, not the URL
        return RemoteReadError(f"{url}: cannot be read: {detail}")
    if kind == "missing":
        return RemoteInputError(f"{url}: no such object or bucket ({detail})")
    if kind == "denied":
        return RemoteInputError(f"{url}: access denied ({detail}); check the credentials "
                                "(storage_options in Python; AWS_PROFILE, AWS_ACCESS_KEY_ID, ... on the command line)")
    return RemoteInputError(f"{url}: cannot be read: {detail}")


# ----------------------------------------------------------------------------- awaiting

class Failed:
    """An awaited call's error, returned as its result by :func:`settled`."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


async def settled(call):
    """``await call``, with its error returned as a :class:`Failed`, not raised: a task
    whose result nobody takes (its future cancelled by a closing reader, or timed out
    as it failed) then leaves no error unread, which asyncio prints with a traceback."""
    try:
        return await call
    except Exception as e:
        return Failed(e)


async def within(call, seconds: float):
    """``await call`` for at most ``seconds`` (then ``asyncio.TimeoutError``), without
    the error that asyncio.wait_for leaves unread when the call fails as it is cancelled."""
    result = await asyncio.wait_for(settled(call), seconds)
    if isinstance(result, Failed):
        raise result.error
    return result


# ----------------------------------------------------------------------------- errors

_MISSING = {"NoSuchKey", "NoSuchBucket", "NotFound", "404", "NoSuchVersion"}
_DENIED = {"AccessDenied", "403", "401", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
           "InvalidToken", "AllAccessDisabled", "AccountProblem", "Forbidden"}
_CHANGED = {"PreconditionFailed", "412"}
_THROTTLED = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
              "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "503", "500", "502", "504"}


def _status_and_code(exc: BaseException) -> tuple[int | None, str | None]:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        error = response.get("Error") or {}
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return status, error.get("Code")
    if isinstance(exc, _HTTPStatus):
        return exc.status, exc.code
    status = getattr(exc, "status", None)
    if status is None:  # (aiohttp's errors have status; their code is its deprecated name: not read)
        status = getattr(exc, "code", None)
    return (status, None) if isinstance(status, int) else (None, None)


def classify(exc: BaseException) -> str:
    """``missing``, ``denied``, ``changed``, ``transient`` or ``other``."""
    if isinstance(exc, _Changed):
        return "changed"
    status, code = _status_and_code(exc)
    if status == 412 or code in _CHANGED:
        return "changed"
    if status == 404 or code in _MISSING or isinstance(exc, FileNotFoundError):
        return "missing"
    if status in (401, 403) or code in _DENIED or isinstance(exc, PermissionError):
        return "denied"
    if (status is not None and (status in (408, 429) or status >= 500)) or code in _THROTTLED:
        return "transient"
    if status is not None or code is not None:
        return "other"
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError, EOFError)):
        return "transient"
    module = type(exc).__module__.split(".")[0]
    if module in ("aiohttp", "botocore", "aiobotocore", "urllib3", "http", "requests"):
        return "transient"  # connection-level failures: reset, refused, closed, payload cut short
    if isinstance(exc, OSError) and "Forbidden" in str(exc):  # gcsfs' 403
        return "denied"
    if isinstance(exc, OSError) and not isinstance(exc, RemoteReadError):
        return "transient"
    return "other"


def describe(exc: BaseException) -> str:
    """One line for a store's exception: its code and message."""
    if type(exc).__name__ == "TooManyRedirects":  # (aiohttp's says "0, message='', url=...")
        last = getattr(getattr(exc, "request_info", None), "real_url", None)
        return "too many redirects (a redirect loop?)" + (f", the last to {last}" if last else "")
    status, code = _status_and_code(exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    if code and code not in text:
        text = f"{code}: {text}"
    elif status and str(status) not in text:
        text = f"HTTP {status}: {text}"
    return text if text != type(exc).__name__ else f"{type(exc).__name__}"
