"""A real S3 API on loopback for tests: moto's server mode, plus a fault-injecting proxy.

    server = S3Server.start()                     # moto.server.ThreadedMotoServer on 127.0.0.1
    server.create_bucket("bucket")
    proxy = FaultyProxy(server.endpoint, rate=0.2, seed=0).start()
    storage_options = {"endpoint_url": proxy.endpoint, "key": "testing", "secret": "testing"}

`FaultyProxy` is an HTTP/1.1 forwarder on 127.0.0.1 in front of the server. It forwards
method, path, query, headers (signatures included) and bodies (Content-Length or chunked,
passed through as the raw bytes) unchanged, one upstream connection per request, and
streams the response back (Content-Length bodies as is, chunked ones re-chunked); the
client's connection is kept alive. For a fraction `rate` of the requests whose method is in
`methods` (chosen by a seeded RNG, so a run is repeatable for the same request order), and/or
for every `every`-th request of each method (cycling through `kinds`: every kind hits every
method, whatever the order of requests), it injects one fault instead:

  "500", "503"     an S3 XML error (InternalError / ServiceUnavailable), nothing forwarded
  "drop"           the request is read, then the connection is closed without a reply
                   (nothing forwarded: a PUT did not happen)
  "drop_after"     the request is forwarded (a PUT did happen), then the connection is
                   closed without a reply: the client must retry an operation that succeeded
  "truncate"       the request is forwarded and the response cut off halfway through its
                   body (halfway through the headers when it has no body), then closed

Everything injected is counted in `proxy.injected[(method, kind)]`, everything forwarded in
`proxy.forwarded[method]`, so a test can check the faults really happened.

`Expect: 100-continue` (botocore sends it with large PUTs) is answered by the proxy itself;
the request then goes upstream without it.
"""

from __future__ import annotations

import collections
import http.client
import io
import random
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable

FAULT_KINDS = ("500", "503", "drop", "drop_after", "truncate")

ERROR_BODIES = {
    "500": ("Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "503": ("Service Unavailable", "ServiceUnavailable", "Please reduce your request rate."),
}

TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def isolated_aws_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment with test credentials and none of the real machine's AWS settings."""
    import os

    env = {k: v for k, v in (base if base is not None else os.environ).items() if not k.startswith("AWS_")}
    env.update(TEST_CREDENTIALS)
    env["AWS_CONFIG_FILE"] = os.devnull
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env["AWS_DEFAULT_REGION"] = "us-east-1"
    return env


class S3Server:
    """moto's S3 (and every other service) in a thread of this process, on 127.0.0.1."""

    def __init__(self, server, host: str, port: int):
        self._server = server
        self.host, self.port = host, port

    @classmethod
    def start(cls) -> S3Server:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        return cls(server, host, port)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """{key: size} of every object under `prefix` (straight from the server)."""
        out = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = obj["Size"]
        return out

    def multipart_uploads(self, bucket: str) -> list[dict]:
        return self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])

    def stop(self) -> None:
        self._server.stop()


# ---- the fault-injecting proxy ---------------------------------------------------------------


class _Request:
    def __init__(self, method: str, target: str, version: str, headers: list[tuple[str, str]], body: bytes):
        self.method, self.target, self.version, self.headers, self.body = method, target, version, headers, body

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


def _read_line(rfile) -> bytes:
    line = rfile.readline(65537)
    if len(line) > 65536:
        raise ValueError("header line too long")
    return line


def _read_request(rfile, wfile) -> _Request | None:
    """One request off the client connection, body as raw bytes; None at EOF."""
    line = _read_line(rfile)
    while line in (b"\r\n", b"\n"):  # tolerate stray CRLF between requests
        line = _read_line(rfile)
    if not line:
        return None
    method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers = []
    while True:
        h = _read_line(rfile)
        if h in (b"\r\n", b"\n", b""):
            break
        k, v = h.decode("latin-1").rstrip("\r\n").split(":", 1)
        headers.append((k, v.strip()))
    request = _Request(method, target, version, headers, b"")
    if (request.header("Expect") or "").lower() == "100-continue":
        wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        wfile.flush()
        request.headers = [(k, v) for k, v in headers if k.lower() != "expect"]
    if "chunked" in (request.header("Transfer-Encoding") or "").lower():
        raw = bytearray()
        while True:  # chunk-size line, data, CRLF ... 0-size chunk, trailers, CRLF
            size_line = _read_line(rfile)
            raw += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:
                    trailer = _read_line(rfile)
                    raw += trailer
                    if trailer in (b"\r\n", b"\n", b""):
                        break
                break
            raw += rfile.read(size + 2)
        request.body = bytes(raw)
    elif request.header("Content-Length"):
        request.body = rfile.read(int(request.header("Content-Length")))
    return request


class _Handler(socketserver.StreamRequestHandler):
    server: _ProxyServer

    def handle(self) -> None:
        proxy = self.server.proxy
        while True:
            try:
                request = _read_request(self.rfile, self.wfile)
            except (OSError, ValueError):
                return
            if request is None:
                return
            fault = proxy.choose_fault(request.method, request.target)
            try:
                keep_open = self._serve(request, fault, proxy)
            except OSError:
                return
            if not keep_open or (request.header("Connection") or "").lower() == "close":
                return

    def _serve(self, request: _Request, fault: str | None, proxy: FaultyProxy) -> bool:
        if fault in ("500", "503"):
            reason, code, message = ERROR_BODIES[fault]
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>{message}</Message>"
                f"<RequestId>fault-{proxy.requests}</RequestId><HostId>faulty-proxy</HostId></Error>"
            ).encode()
            head = f"HTTP/1.1 {fault} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {0 if request.method == 'HEAD' else len(body)}\r\n\r\n"
            self.wfile.write(head.encode() + (b"" if request.method == "HEAD" else body))
            self.wfile.flush()
            return True
        if fault == "drop":
            self._hang_up()
            return False

        upstream = socket.create_connection((proxy.upstream_host, proxy.upstream_port), timeout=60)
        try:
            head = f"{request.method} {request.target} {request.version}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in request.headers if k.lower() not in ("connection", "keep-alive", "proxy-connection"))
            head += "Connection: close\r\n\r\n"
            upstream.sendall(head.encode("latin-1") + request.body)
            response = http.client.HTTPResponse(upstream, method=request.method)
            response.begin()
            with proxy.lock:
                proxy.forwarded[request.method] += 1
            if fault == "drop_after":
                response.read()
                self._hang_up()
                return False
            self._relay(request, response, truncate=fault == "truncate")
            return fault != "truncate"
        finally:
            upstream.close()

    def _relay(self, request: _Request, response: http.client.HTTPResponse, truncate: bool) -> None:
        no_body = request.method == "HEAD" or response.status in (204, 304)
        chunked = bool(response.chunked) and not no_body
        headers = [(k, v) for k, v in response.getheaders() if k.lower() not in ("connection", "keep-alive", "transfer-encoding")]
        stream = response
        if not no_body and not chunked and response.getheader("Content-Length") is None:
            body = response.read()  # a close-delimited body: give it a length
            headers.append(("Content-Length", str(len(body))))
            stream = io.BytesIO(body)
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        head = f"HTTP/1.1 {response.status} {response.reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        head_bytes = head.encode("latin-1")
        length = 0 if no_body or chunked else int({k.lower(): v for k, v in headers}["content-length"])
        if truncate and not chunked and length == 0:
            self.wfile.write(head_bytes[: len(head_bytes) // 2])
            self._hang_up()
            return
        self.wfile.write(head_bytes)
        if no_body:
            self.wfile.flush()
            return
        sent = 0
        while True:
            piece = stream.read(64 * 1024)
            if not piece:
                break
            if truncate and chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece) // 2, piece[: len(piece) // 2]))
                self._hang_up()
                return
            if truncate and sent + len(piece) > length // 2:
                self.wfile.write(piece[: length // 2 - sent])
                self._hang_up()
                return
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            sent += len(piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _hang_up(self) -> None:
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _ProxyServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultyProxy


class FaultyProxy:
    """See the module docstring. `rate`: fraction of eligible requests that get a fault;
    `kinds`: the faults to draw from; `methods`: which methods are eligible (None: all);
    `every`: also fault every n-th eligible request of each method, cycling through `kinds`;
    `schedule`: instead of the RNG, a function (request number, method, target) -> kind or
    None, for exact sequences ("fail the next three PUTs")."""

    def __init__(
        self,
        upstream: str,
        rate: float = 0.0,
        kinds: Iterable[str] = FAULT_KINDS,
        methods: Iterable[str] | None = None,
        seed: int = 0,
        every: int | None = None,
        schedule: Callable[[int, str, str], str | None] | None = None,
    ):
        host, port = upstream.removeprefix("http://").rstrip("/").rsplit(":", 1)
        self.upstream_host, self.upstream_port = host, int(port)
        self.rate = rate
        self.kinds = tuple(kinds)
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        self.methods = set(methods) if methods is not None else None
        self.every = every
        self.schedule = schedule
        self.per_method: collections.Counter = collections.Counter()
        self.pending: list[list] = []  # [count, kind, method, substring of the target]
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests = 0
        self.injected: collections.Counter = collections.Counter()
        self.forwarded: collections.Counter = collections.Counter()
        self._server: _ProxyServer | None = None

    def choose_fault(self, method: str, target: str) -> str | None:
        with self.lock:
            self.requests += 1
            eligible = self.methods is None or method in self.methods
            if eligible:
                self.per_method[method] += 1
            n = self.per_method[method]
            queued = next((p for p in self.pending if p[0] > 0 and p[2] in (None, method) and p[3] in target), None)
            if queued is not None:
                queued[0] -= 1
                fault = queued[1]
            elif self.schedule is not None:
                fault = self.schedule(self.requests, method, target)
            elif eligible and self.every and n % self.every == 0:
                fault = self.kinds[(n // self.every - 1) % len(self.kinds)]
            elif self.rate and (self.methods is None or method in self.methods) and self.rng.random() < self.rate:
                fault = self.rng.choice(self.kinds)
            else:
                fault = None
            if fault is not None:
                self.injected[(method, fault)] += 1
            return fault

    def fail_next(self, count: int, kind: str, method: str | None = None, target_contains: str = "") -> None:
        """Fault the next `count` requests with this method (any: None) whose path and query
        contain `target_contains`, before any other rule."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        with self.lock:
            self.pending.append([count, kind, method, target_contains])

    def clear(self) -> None:
        """No more queued faults; counters kept."""
        with self.lock:
            self.pending.clear()

    def start(self) -> FaultyProxy:
        self._server = _ProxyServer(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        threading.Thread(target=self._server.serve_forever, name="faulty-proxy", daemon=True).start()
        return self

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def faults(self, method: str | None = None) -> int:
        return sum(n for (m, _), n in self.injected.items() if method is None or m == method)
