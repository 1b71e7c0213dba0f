"""The embedded S3 API: moto's standalone server on 127.0.0.1 and a free port.

moto's server (not in-process ``mock_aws``, which is not thread-safe) honours
``If-None-Match: *`` and ``If-Match`` as AWS does (DESIGN.md section 7).
"""

from __future__ import annotations

import logging
import os

from moto.server import ThreadedMotoServer

from infra.cost import S3Meter


class EmbeddedS3:
    def __init__(self, port: int = 0) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.endpoint_url = ""
        self.meter: S3Meter | None = None  # counts requests and bytes by caller role

    def start(self) -> EmbeddedS3:
        # moto signs nothing, but boto3 refuses to send unsigned requests.
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self._server.start()
        wsgi = self._server._server  # werkzeug's server; moto exposes no hook for middleware
        assert wsgi is not None
        self.meter = S3Meter(wsgi.app)
        wsgi.app = self.meter
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
