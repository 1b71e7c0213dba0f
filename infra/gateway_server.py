"""The gateway function behind a local HTTP server (a stand-in for its Function URL).

A stdlib ``ThreadingHTTPServer`` on 127.0.0.1 turns each request into the
payload-2.0 event a Lambda Function URL sends and calls the *real* handler
(``functions.gateway.app.handler``), so devices in the local stack talk to
the same code they would in AWS. The handler reads ``BUCKET`` and
``S3_ENDPOINT_URL`` from the environment, as in Lambda.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from infra.pump import LocalContext

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 20


def build_event(method: str, target: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """A Lambda Function URL event (payload format 2.0) for one HTTP request."""
    parts = urlsplit(target)
    now = time.time()
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": parts.path,
        "rawQueryString": parts.query,
        "headers": {k.lower(): v for k, v in headers.items()},
        "requestContext": {
            "accountId": "anonymous",
            "apiId": "local",
            "domainName": headers.get("Host", "127.0.0.1"),
            "domainPrefix": "local",
            "http": {
                "method": method,
                "path": parts.path,
                "protocol": "HTTP/1.1",
                "sourceIp": "127.0.0.1",
                "userAgent": headers.get("User-Agent", ""),
            },
            "requestId": str(uuid.uuid4()),
            "routeKey": "$default",
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "body": base64.b64encode(body).decode("ascii"),
        "isBase64Encoded": True,
    }


class GatewayServer:
    """Serve the gateway handler on ``url`` until ``stop``."""

    def __init__(self, port: int = 0, *, wrap: Any = None) -> None:
        self.port = port
        self.wrap = wrap  # e.g. InvocationMeter.timed, to meter the function
        self.url = ""
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> GatewayServer:
        from functions.gateway.app import handler  # reads the environment per invocation

        if self.wrap is not None:
            handler = self.wrap("gateway", handler)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body in one segment, no Nagle: otherwise each answer waits ~40 ms
            # for the client's delayed ACK.
            disable_nagle_algorithm = True
            wbufsize = 1 << 16

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_REQUEST_BYTES:
                    self.send_error(413)
                    return
                body = self.rfile.read(length) if length else b""
                event = build_event(self.command, self.path, dict(self.headers.items()), body)
                try:
                    resp = handler(event, LocalContext("gateway"))
                except Exception:  # a crash is a 502 from a Function URL too
                    log.exception("gateway handler crashed")
                    resp = {"statusCode": 502, "headers": {}, "body": '{"error":"internal"}'}
                data = resp.get("body", "").encode()
                self.send_response(int(resp.get("statusCode", 200)))
                for k, v in (resp.get("headers") or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = _serve
            do_GET = _serve

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("gateway %s", format % args)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="gateway-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
