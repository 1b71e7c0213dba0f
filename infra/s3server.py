"""The embedded S3 API: moto's standalone server on 127.0.0.1 and a free port.

moto's server (not in-process ``mock_aws``, which is not thread-safe) honours
``If-None-Match: *`` and ``If-Match`` as AWS does (DESIGN.md section 7).
``python -m infra.s3server --port N`` serves it alone; ``moto_process`` runs
that in a child process for callers whose own threads would starve it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

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


@contextlib.contextmanager
def moto_process(start_timeout_s: float = 30.0) -> Iterator[str]:
    """moto's S3 server in a process of its own, on 127.0.0.1 and a free port.

    In-process (``EmbeddedS3``) it would share one GIL with the event pump, the
    handlers and the evaluation, and at hundreds of devices it starves them (and
    they it). Objects over 1 MB (masked inputs are ~4.8 MB, and the bucket keeps
    every cohort's) are spooled to disk rather than held in its memory.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        os.environ.setdefault(name, value)  # moto checks nothing; boto3 wants them
    env = dict(os.environ, MOTO_S3_DEFAULT_KEY_BUFFER_SIZE=str(1 << 20))
    # main() below, not moto.server's CLI: EmbeddedS3 silences its per-request log lines.
    proc = subprocess.Popen(
        [sys.executable, "-m", "infra.s3server", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the moto server process did not start") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.s3server", description=__doc__)
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    args = p.parse_args(argv)
    stop = threading.Event()
    # Ctrl-C stops the server in order; SIGTERM (what moto_process sends) keeps its
    # default and ends the process at once: the objects die with it either way.
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with EmbeddedS3(args.port) as server:
        print(f"S3 endpoint {server.endpoint_url}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
