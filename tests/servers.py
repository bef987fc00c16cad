"""Real servers on 127.0.0.1 for tests that read scenes over the network.

Two plain context managers, no pytest fixtures:

* ``serve_files(root)`` serves the files under ``root`` over HTTP/1.1 with byte ranges, the
  way a static file host or an object store does, and misbehaves on demand (drops
  connections, fails reads past a byte offset).
* ``s3_server()`` runs moto's S3 in server mode, for GDAL's ``/vsis3/`` and for boto3.

Both bind port 0 (the OS picks a free port) and stop when the ``with`` block ends.

Why the file server runs in a child process: rasterio calls some GDAL functions without
releasing the GIL (e.g. the metadata calls right after ``open``, which make GDAL look for
``.aux.xml`` side-car files unless GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR). When GDAL does
network I/O inside such a call, a server thread in the same process cannot run a line of
Python, and GDAL waits for an answer that never comes (forever, or GDAL_HTTP_TIMEOUT). A
server in its own process answers regardless. The child runs this very file as a script; the
test talks to it over HTTP on ``/_control/...`` paths, which are neither logged nor dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

HOST = "127.0.0.1"
_CONTROL = "/_control/"

# "bytes=a-b", "bytes=a-" or "bytes=-n". Anything else (several ranges, other units) is
# ignored and the whole file sent with 200, which RFC 9110 allows.
_SINGLE_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")

_HEADER_BYTES = 32 * 1024  # what GDAL reads first when opening (GDAL_INGESTED_BYTES_AT_OPEN)

Request = tuple[str, str, "str | None"]  # (method, path as sent, Range header or None)


# --------------------------------------------------------------------------------------------
# The test's side: serve_files() and the handle it yields.


class FileServer:
    """What ``serve_files`` yields: the address and the log of requests."""

    def __init__(self, port: int) -> None:
        self.port = port

    def url(self, name: str) -> str:
        """``http://127.0.0.1:PORT/name`` for the file ``name`` (a path relative to ``root``)."""
        return f"http://{HOST}:{self.port}/{quote(str(name))}"

    @property
    def requests(self) -> list[Request]:
        """Every request received so far (since start or ``reset()``), in arrival order."""
        return [tuple(r) for r in self._control("requests")]

    def reset(self) -> None:
        """Forget the requests seen so far; ``drop_every`` counts afresh from here."""
        self._control("reset", {})

    def _control(self, what: str, change: dict | None = None):
        """GET (or, with ``change``, POST) ``/_control/<what>``; returns the decoded JSON answer."""
        data = None if change is None else json.dumps(change).encode()
        request = urllib.request.Request(f"http://{HOST}:{self.port}{_CONTROL}{what}", data=data)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)


@contextlib.contextmanager
def serve_files(
    root: Path, *, drop_every: int = 0, fail_from_byte: int | None = None, fail_first: int = 0
) -> Iterator[FileServer]:
    """Serve the files under ``root`` on http://127.0.0.1:PORT/ for the ``with`` block.

    HEAD and GET, keep-alive, single ``Range: bytes=a-b`` / ``a-`` / ``-n`` requests (206 with
    Content-Range; 416 when the range starts past the end). Misbehaviour on demand:

    * ``drop_every=n > 0``: every n-th request (all requests count, from the start or the last
      ``reset()``) has its connection closed with no response at all: curl's error 52,
      "Empty reply from server". GDAL hides isolated drops: libcurl resends a request once
      when a reused keep-alive connection dies like this, and /vsicurl/ tries a failed range
      download three times, so with n >= 2 opens and reads still succeed (a count of the
      requests shows the drops).
    * ``fail_from_byte=k``: a GET whose range reaches byte ``k`` or beyond gets 503. HEAD and
      reads of bytes before ``k`` still work: a server that went down after the scene's header
      was read, or (``k`` = where a file's last block starts) one block that cannot be had.
    * ``fail_first=n``: the first ``n`` GETs of each file's data (after its 32 KiB header) get
      503, then all succeed: an outage that outlasts GDAL's own immediate repeats, then ends.
    """
    settings = {"drop_every": drop_every, "fail_from_byte": fail_from_byte, "fail_first": fail_first}
    config = json.dumps({"root": str(Path(root).resolve()), **settings})
    # stdin stays open for the life of the server: the child stops when it closes, so it
    # cannot outlive the test process even if that is killed.
    child = subprocess.Popen(
        [sys.executable, __file__, config], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        line = child.stdout.readline()  # the child prints its port once it listens
        if not line.strip().isdigit():
            raise RuntimeError(f"the file server did not start (exit code {child.wait(10)})")
        yield FileServer(int(line))
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        child.stdout.close()


# --------------------------------------------------------------------------------------------
# The child's side: the HTTP server itself.


class _State:
    """The server's settings and request log, shared by its handler threads."""

    def __init__(self, root: str, drop_every: int, fail_from_byte: int | None, fail_first: int) -> None:
        self.root = Path(root)
        self.drop_every = drop_every
        self.fail_from_byte = fail_from_byte
        self.fail_first = fail_first
        self.lock = threading.Lock()
        self.requests: list[Request] = []
        self.count = 0  # requests since start or the last reset, for drop_every
        self.failed: Counter[str] = Counter()  # data GETs answered 503 so far, per path

    def must_fail(self, path: str, start: int, end: int) -> bool:
        """Whether this GET gets 503: it reaches ``fail_from_byte``, or is one of the first ``fail_first``."""
        with self.lock:
            if self.fail_from_byte is not None and end >= self.fail_from_byte:
                return True
            if start >= _HEADER_BYTES and self.failed[path] < self.fail_first:
                self.failed[path] += 1
                return True
            return False

    def record(self, method: str, path: str, range_header: str | None) -> bool:
        """Log one request; True when it is the one in ``drop_every`` to drop."""
        with self.lock:
            self.requests.append((method, path, range_header))
            self.count += 1
            return self.drop_every > 0 and self.count % self.drop_every == 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive like a real host: every reply sets Content-Length
    server: _HTTPServer

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        if self.path.startswith(_CONTROL):
            self._control()
        else:
            self._serve(body=True)

    def do_POST(self) -> None:
        self._control()

    def log_message(self, format: str, *args) -> None:
        pass  # no per-request log on stderr

    def _serve(self, *, body: bool) -> None:
        state = self.server.state
        range_header = self.headers.get("Range")
        if state.record(self.command, self.path, range_header):
            # A flaky network: hang up without a byte of response.
            self.close_connection = True
            return

        path = self._resolve(urlsplit(self.path).path)
        if path is None:
            self._reply(HTTPStatus.NOT_FOUND)
            return
        size = path.stat().st_size

        start, end, status = 0, size - 1, HTTPStatus.OK  # end is inclusive, as in Content-Range
        match = _SINGLE_RANGE.match(range_header.strip()) if range_header else None
        first, last = match.groups() if match else ("", "")
        if first and not (last and int(last) < int(first)):  # "a-b" or "a-" (b < a: ignored)
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
            if start >= size:
                self._reply(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, {"Content-Range": f"bytes */{size}"})
                return
            status = HTTPStatus.PARTIAL_CONTENT
        elif not first and last:  # "-n": the last n bytes
            if int(last) == 0 or size == 0:
                self._reply(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, {"Content-Range": f"bytes */{size}"})
                return
            start, status = max(size - int(last), 0), HTTPStatus.PARTIAL_CONTENT

        if body and state.must_fail(self.path, start, end):
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE)
            return

        length = end - start + 1
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if body and length > 0:
            with path.open("rb") as f:
                f.seek(start)
                self.wfile.write(f.read(length))

    def _resolve(self, url_path: str) -> Path | None:
        """The file under root that a URL path names, or None (missing, a folder, outside root)."""
        root = self.server.state.root
        path = (root / unquote(url_path).lstrip("/")).resolve()
        return path if path.is_relative_to(root) and path.is_file() else None

    def _control(self) -> None:
        """``/_control/requests`` and ``/_control/reset``: the test's remote."""
        state = self.server.state
        what = self.path.removeprefix(_CONTROL)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))  # a POST body carries nothing
        with state.lock:
            if what == "requests":
                answer = state.requests
            elif what == "reset":
                state.requests, state.count = [], 0
                answer = {}
            else:
                answer = None
        if answer is None:
            self._reply(HTTPStatus.NOT_FOUND)
            return
        payload = json.dumps(answer).encode()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _reply(self, status: HTTPStatus, headers: dict[str, str] | None = None) -> None:
        """A short plain-text reply, with its length so that the connection stays usable."""
        payload = f"{status.value} {status.phrase}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, add=False)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a client's idle keep-alive connection must not block shutdown

    def __init__(self, state: _State) -> None:
        super().__init__((HOST, 0), _Handler)
        self.state = state
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def track(self, connection: socket.socket, *, add: bool) -> None:
        with self._open_lock:
            (self._open.add if add else self._open.discard)(connection)

    def close_connections(self) -> None:
        """Cut the clients' keep-alive connections too, so that the server is really gone."""
        with self._open_lock:
            for connection in self._open:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # clients that hang up mid-reply are normal here
        super().handle_error(request, client_address)  # anything else is a bug: print it


def _serve_until_stdin_closes(config: str) -> None:
    """The child process: serve, print the port, stop when the parent closes our stdin."""
    httpd = _HTTPServer(_State(**json.loads(config)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    print(httpd.server_address[1], flush=True)
    sys.stdin.read()  # returns at EOF: the with-block ended, or the parent died
    httpd.shutdown()  # stop accepting; returns once serve_forever has
    httpd.close_connections()
    httpd.server_close()
    thread.join()


# --------------------------------------------------------------------------------------------
# S3: moto in server mode.


class S3Server:
    """What ``s3_server`` yields: where moto listens, and a way to put files into it."""

    access_key = "testing"  # moto accepts any credentials; these are what upload() uses
    secret_key = "testing"
    region = "us-east-1"

    def __init__(self, port: int) -> None:
        self.endpoint = f"{HOST}:{port}"  # host:port without scheme, as GDAL's AWS_S3_ENDPOINT
        self.endpoint_url = f"http://{self.endpoint}"  # as boto3's endpoint_url
        self._client = None

    def client(self):
        """A boto3 S3 client for this server, with its credentials given explicitly.

        It ignores AWS_PROFILE, so that a test may point that at a profile of its own.
        """
        if self._client is None:
            import boto3
            import botocore.session

            no_profile = botocore.session.Session(session_vars={"profile": (None, None, None, None)})
            self._client = boto3.session.Session(botocore_session=no_profile).client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                region_name=self.region,
            )
        return self._client

    def upload(self, bucket: str, key: str, path: Path) -> None:
        """Put the file at ``path`` into ``s3://bucket/key``, creating the bucket if needed."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)  # us-east-1: no LocationConstraint
        client.upload_file(str(path), bucket, key)


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """Run moto's S3 on 127.0.0.1:PORT for the ``with`` block; it starts and ends empty.

    moto keeps its buckets in process-wide state, shared by every moto server and mock in this
    process, so that state is reset on the way in and on the way out.
    """
    from moto.server import ThreadedMotoServer

    werkzeug_log = logging.getLogger("werkzeug")  # moto's server logs every request through it
    old_level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    server.start()
    try:
        s3 = S3Server(server.get_host_and_port()[1])
        _moto_reset(s3.endpoint_url)
        yield s3
    finally:
        with contextlib.suppress(OSError):
            _moto_reset(f"http://{HOST}:{server.get_host_and_port()[1]}")
        server.stop()
        werkzeug_log.setLevel(old_level)


def _moto_reset(endpoint_url: str) -> None:
    """Empty moto's state (every service, every account) through its own API."""
    request = urllib.request.Request(f"{endpoint_url}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


if __name__ == "__main__":
    _serve_until_stdin_closes(sys.argv[1])
