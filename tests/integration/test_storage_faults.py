"""The storage client's retries, against injected throttling and connection resets.

A fault proxy on 127.0.0.1 sits between ``S3Store`` and the moto server and, for the
requests a test picks, answers 503 SlowDown (what S3 sends when throttling a prefix),
drops the connection before forwarding, or forwards and then drops the connection
before answering (the server did the work; the client never heard). Transient faults
must be invisible to callers; persistent ones must surface as ``ThrottledError`` /
``StorageError`` naming the key; and a write-once put whose answer was lost must not
look like someone else's write.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from fedcore.errors import AlreadyExistsError, StorageError, ThrottledError
from fedcore.storage import S3Store

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultProxy:
    """Forwards to ``upstream``; the next requests matching a rule get its faults first."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.rules: list[tuple[str, str, list[str]]] = []  # (method, path part, faults)
        self.log: list[tuple[str, str, str]] = []  # (method, path, what happened)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._fault(self.command, self.path)
                if fault == "reset-before":
                    self._reset()
                    return
                status, headers, data = proxy._forward(self.command, self.path, self.headers, body)
                if fault == "reset-after":
                    self._reset()
                    return
                if fault == "503":
                    status, headers, data = 503, [("Content-Type", "application/xml")], SLOW_DOWN
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _reset(self) -> None:
                self.close_connection = True
                # SO_LINGER 0: the client sees a reset, not an orderly close.
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                self.connection.close()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def inject(self, method: str, path_part: str, *faults: str) -> None:
        with self._lock:
            self.rules.append((method, path_part, list(faults)))

    def _fault(self, method: str, path: str) -> str | None:
        with self._lock:
            for m, part, faults in self.rules:
                if m == method and part in path and faults:
                    fault = faults.pop(0)
                    self.log.append((method, path, fault))
                    return fault
            self.log.append((method, path, "ok"))
            return None

    def _forward(
        self, method: str, path: str, headers: object, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            hdrs = {k: v for k, v in headers.items() if k.lower() not in ("connection", "expect")}  # type: ignore[attr-defined]
            conn.request(method, path, body=body or None, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    p = FaultProxy(s3_endpoint)
    yield p
    p.close()


@pytest.fixture
def faulty(proxy: FaultProxy, store: S3Store) -> S3Store:
    """The test's bucket, reached through the fault proxy with the default retry policy."""
    return S3Store.connect(store.bucket, proxy.url)


def test_slowdown_and_resets_are_retried_transparently(
    proxy: FaultProxy, faulty: S3Store, store: S3Store
) -> None:
    """GIVEN 503 SlowDown and connection resets on reads, lists and conditional writes
    WHEN the store calls go through THEN every call succeeds after botocore's retries."""
    store.put_new("a/one.json", b"1")
    proxy.inject("GET", "/a/one.json", "503", "reset-before")
    assert faulty.get("a/one.json").body == b"1"
    proxy.inject("GET", "list-type=2", "503", "reset-before")
    assert [i.key for i in faulty.list("a/")] == ["a/one.json"]
    proxy.inject("PUT", "/a/two.json", "503", "reset-before")
    faulty.put_new("a/two.json", b"2")
    assert store.get("a/two.json").body == b"2"
    faults = [f for _, _, f in proxy.log if f != "ok"]
    assert faults == ["503", "reset-before"] * 3


def test_a_write_once_put_whose_answer_was_lost_is_still_ours(
    proxy: FaultProxy, faulty: S3Store, store: S3Store
) -> None:
    """GIVEN the server stores a put_new but the connection drops before the answer
    WHEN botocore retries and meets 412 THEN put_new recognises its own bytes and
    succeeds, while a different body at that key is still AlreadyExists."""
    proxy.inject("PUT", "/b/mine.json", "reset-after")
    faulty.put_new("b/mine.json", b'{"v":1}')
    assert store.get("b/mine.json").body == b'{"v":1}'
    assert [f for _, p, f in proxy.log if "mine" in p and p.startswith("/")][:2] == [
        "reset-after",
        "ok",
    ]
    with pytest.raises(AlreadyExistsError):
        faulty.put_new("b/mine.json", b'{"v":2}')


def test_persistent_throttling_surfaces_as_a_named_error(proxy: FaultProxy, store: S3Store) -> None:
    """GIVEN every attempt throttled or reset WHEN retries run out THEN the caller gets
    ThrottledError / StorageError naming the key (what the handler retries via Lambda)."""
    impatient = S3Store.connect(store.bucket, proxy.url, max_attempts=2)  # 2 retries
    store.put_new("c/x.json", b"x")
    proxy.inject("GET", "/c/x.json", "503", "503", "503")
    with pytest.raises(ThrottledError, match=r"c/x\.json"):
        impatient.get("c/x.json")
    proxy.inject("PUT", "/c/y.json", "reset-before", "reset-before", "reset-before")
    with pytest.raises(StorageError, match=r"c/y\.json"):
        impatient.put_new("c/y.json", b"y")
    assert store.head("c/y.json") is None
