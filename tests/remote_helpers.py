"""Servers on 127.0.0.1 for the bucket tests and benchmarks/bench_remote.py.

- :func:`start_moto`: a real S3 API (moto in server mode) on a free port.
- :class:`FileServer`: a read-only web server over a folder that honours ``Range``,
  ``If-Match`` and ``HEAD`` and lists folders as links; path-style S3 clients can read
  it too (``/bucket/key``), which the benchmark uses (with a latency per request and a
  bandwidth per connection): moto reads a whole object for each ranged GET (277 ms per
  300 KB range of a 117 MB object, measured), a real bucket not.
- :class:`FaultProxy`: an HTTP proxy in front of either, adding a latency per request,
  counting requests, and injecting faults: error statuses (503 SlowDown), connections
  dropped before the response or cut in the middle of its body.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.client
import logging
import os
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


def free_port() -> int:
    """A free port on 127.0.0.1 below the kernel's ephemeral range, so no outgoing
    connection of another test can take it between this call and the server's bind
    (a coordinator binds it seconds later, after its imports)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    ports = list(range(max(1024, low - 12000), low))
    # Not the global random: keras.utils.set_random_seed(0) seeds it alike in every xdist
    # worker, which then picked the same ports (two tests' coordinators on one port).
    random.SystemRandom().shuffle(ports)
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def start_moto():
    """A moto S3 server on 127.0.0.1 (started in this process); returns (server, endpoint)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment a process needs to reach the local S3 endpoint."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class FileServer:
    """Files of ``folder`` over HTTP with ranges, ETags (size and mtime) and folder listings.

    For the benchmark, a cloud region's network: ``latency`` seconds before each answer,
    and at most ``bandwidth`` bytes per second on each connection (None: as fast as
    the machine sends; bodies go out with ``sendfile``, paced in slices when limited).
    ``faults`` (a dict, changed at will) makes it misbehave: ``wrong_start`` (a range's
    bytes from 0 instead, and says so in Content-Range), ``encoding`` (a Content-Encoding
    header), ``head403`` (refuses a HEAD of a URL with a query, as S3 does for a URL
    presigned for GET), ``loop`` (redirects every request to itself), ``weak`` (weak
    ETags, which If-Match never matches)."""

    SLICE = 256 << 10  # bytes sent between two looks at the pace

    def __init__(self, folder: str | os.PathLike, latency: float = 0.0, bandwidth: float | None = None,
                 etag: bool = True):
        self.folder = Path(folder)
        self.faults: dict = {}
        self.latency, self.bandwidth, self.etag = latency, bandwidth, etag  # etag False: Last-Modified alone
        self.requests = 0
        self.bytes = 0  # of the bodies sent
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                if server.faults.get("head403") and "?" in self.path:
                    return self._reply(403, {}, b"")
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                with server._lock:
                    server.requests += 1
                if server.faults.get("loop"):  # every request redirected to itself
                    return self._reply(302, {"Location": self.path}, b"")
                if server.latency:
                    time.sleep(server.latency)
                path = server.folder / self.path.split("?")[0].lstrip("/")
                if path.is_dir():
                    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
                    page = "".join(f'<a href="{n}">{n}</a>\n' for n in names).encode()
                    return self._reply(200, {"Content-Type": "text/html"}, page if body else b"", len(page))
                if not path.is_file():
                    return self._reply(404, {"Content-Type": "application/xml"},
                                       b"<Error><Code>NoSuchKey</Code></Error>" if body else b"")
                stat = path.stat()
                etag = '"' + hashlib.md5(f"{stat.st_size}-{stat.st_mtime_ns}".encode()).hexdigest() + '"'
                headers = {"ETag": etag, "Accept-Ranges": "bytes",
                           "Last-Modified": email.utils.formatdate(stat.st_mtime, usegmt=True),
                           "Content-Type": "application/octet-stream"}
                if server.faults.get("weak"):
                    etag = headers["ETag"] = "W/" + etag
                if not server.etag:
                    del headers["ETag"]
                wanted = self.headers.get("If-Match")
                if wanted and (wanted.strip() != etag or etag.startswith("W/")):  # (strong comparison: RFC 9110)
                    return self._reply(412, {"Content-Type": "application/xml"},
                                       b"<Error><Code>PreconditionFailed</Code></Error>" if body else b"")
                size, status = stat.st_size, 200
                start, stop = 0, size
                spec = self.headers.get("Range", "")
                if spec.startswith("bytes="):
                    a, _, b = spec[6:].partition("-")
                    start, stop = int(a), min(size, int(b) + 1 if b else size)
                    if start >= size:
                        return self._reply(416, {"Content-Range": f"bytes */{size}"}, b"")
                    if server.faults.get("wrong_start"):
                        start, stop = 0, stop - start
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
                if server.faults.get("encoding"):
                    headers["Content-Encoding"] = server.faults["encoding"]
                self._reply(status, headers, b"", stop - start)
                if body:
                    self._send_file(path, start, stop)

            def _send_file(self, path, start, stop):
                self.wfile.flush()
                t0, sent = time.monotonic(), 0
                with open(path, "rb") as f:
                    while start + sent < stop:
                        n = os.sendfile(self.connection.fileno(), f.fileno(), start + sent,
                                        min(server.SLICE, stop - start - sent))
                        if n == 0:
                            break
                        sent += n
                        if server.bandwidth:
                            ahead = sent / server.bandwidth - (time.monotonic() - t0)
                            if ahead > 0:
                                time.sleep(ahead)
                with server._lock:
                    server.bytes += sent

            def _reply(self, status, headers, data, length=None):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data) if length is None else length))
                self.end_headers()
                if data:
                    self.wfile.write(data)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class FaultProxy:
    """An HTTP proxy to ``upstream`` (``http://host:port``) that adds ``latency`` seconds
    to each request and asks ``fault(method, path, headers, n)`` (n: the request's
    number) what to do: None (forward), an int status (answered with an S3-style error
    body, e.g. 503 SlowDown), ``"drop"`` (close the connection, no response) or
    ``("cut", nbytes)`` (forward, but close after nbytes of the body)."""

    def __init__(self, upstream: str, latency: float = 0.0, fault=None):
        self.upstream = upstream.split("://", 1)[1]
        self.latency, self.fault = latency, fault
        self.count = 0
        self.bytes = 0  # of the bodies sent back
        self.log: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        proxy = self
        local = threading.local()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy._lock:
                    proxy.count += 1
                    n = proxy.count
                    proxy.log.append((self.command, self.path, self.headers.get("Range")))
                if proxy.latency:
                    time.sleep(proxy.latency)
                action = proxy.fault(self.command, self.path, self.headers, n) if proxy.fault else None
                if action == "drop":
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if isinstance(action, int):
                    text = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(action)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(text)))
                    self.end_headers()
                    if self.command != "HEAD":  # (a HEAD's answer has no body)
                        self.wfile.write(text)
                    return
                conn = getattr(local, "conn", None)
                if conn is None:
                    conn = local.conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                except (OSError, http.client.HTTPException):
                    local.conn = None
                    conn.close()
                    self.close_connection = True
                    return
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                upstream_length = response.getheader("Content-Length")
                self.send_header("Content-Length", upstream_length if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if isinstance(action, tuple) and action[0] == "cut" and self.command != "HEAD":
                    self.wfile.write(data[: action[1]])
                    self.wfile.flush()
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)
                    with proxy._lock:
                        proxy.bytes += len(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def ranged_gets(self) -> int:
        return sum(1 for method, _, rng in self.log if method == "GET" and rng)

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(folder: str, latency: float, bandwidth: float | None = None) -> None:
    """Serve ``folder`` with ``latency`` seconds per request and ``bandwidth`` bytes/s
    per connection until stdin closes; prints the URL, then its request and byte counts
    as JSON each time it reads ``stats``."""
    import json
    import sys

    server = FileServer(folder, latency=latency, bandwidth=bandwidth)
    print(server.url, flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            print(json.dumps({"requests": server.requests, "bytes": server.bytes}), flush=True)
    server.stop()


if __name__ == "__main__":
    import sys

    serve(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 and float(sys.argv[3]) else None)
