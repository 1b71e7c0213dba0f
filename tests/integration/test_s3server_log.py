"""The embedded S3 server's own errors go to its log file, never to the terminal."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

from infra.s3server import EmbeddedS3
from tests.helpers import wait_until


def test_server_errors_go_to_the_log_file(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "s3server.log"
    with EmbeddedS3(log_path=log) as server:
        wsgi = server._server._server
        assert wsgi is not None

        def broken(environ: object, start_response: object) -> list[bytes]:
            raise ValueError("I/O operation on closed file (test)")

        wsgi.app = broken  # an error inside the request, as moto raises one
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(server.endpoint_url + "/bucket-x", timeout=10)
        # werkzeug sends the 500 first and logs after it, on the request's thread.
        wait_until(
            lambda: log.exists() and "I/O operation on closed file (test)" in log.read_text(),
            what="the request error in the log file",
        )
        try:  # an error outside the app: what socketserver prints with print_exc
            raise OSError("client hung up (test)")
        except OSError:
            wsgi.handle_error(None, ("127.0.0.1", 1))
    text = log.read_text()
    assert "I/O operation on closed file (test)" in text
    assert "client hung up (test)" in text
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert "(test)" not in out + err
