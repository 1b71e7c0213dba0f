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
from pathlib import Path
from typing import Any

from moto.server import ThreadedMotoServer

from infra.cost import S3Meter

# The server's own loggers: werkzeug (request errors) and moto (its handlers).
SERVER_LOGGERS = ("werkzeug", "moto")


def route_server_logs(path: Path) -> logging.Handler:
    """The embedded server's errors go to ``path``, not the terminal.

    A run's terminal is for the person watching it: a moto traceback from a
    client that hung up mid-request (``ValueError: I/O operation on closed
    file``) is the server's business, not a failure of the run, but it belongs
    in a file the person can read when something does go wrong.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in SERVER_LOGGERS:
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        lg.propagate = False
    return handler


class EmbeddedS3:
    def __init__(self, port: int = 0, *, log_path: Path | None = None) -> None:
        """``log_path``: where the server's own errors go (None: werkzeug's default, stderr)."""
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.endpoint_url = ""
        self.meter: S3Meter | None = None  # counts requests and bytes by caller role
        self.log_path = log_path
        self._log_handler: logging.Handler | None = None

    def start(self) -> EmbeddedS3:
        # moto signs nothing, but boto3 refuses to send unsigned requests.
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        if self.log_path is not None:
            self._log_handler = route_server_logs(self.log_path)
        self._server.start()
        wsgi = self._server._server  # werkzeug's server; moto exposes no hook for middleware
        assert wsgi is not None
        self.meter = S3Meter(wsgi.app)
        wsgi.app = self.meter
        if self.log_path is not None:
            # socketserver prints errors outside the app (a write to a closed socket) with
            # traceback.print_exc; send them through the logger, to the same file.
            wsgi.handle_error = _log_handle_error  # type: ignore[method-assign]
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.stop()
        if self._log_handler is not None:
            for name in SERVER_LOGGERS:
                logging.getLogger(name).removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _log_handle_error(request: Any, client_address: Any) -> None:
    logging.getLogger("werkzeug").error(
        "error while serving %s", client_address, exc_info=sys.exc_info()
    )


@contextlib.contextmanager
def moto_process(start_timeout_s: float = 30.0, log_path: Path | None = None) -> Iterator[str]:
    """moto's S3 server in a process of its own, on 127.0.0.1 and a free port.

    In-process (``EmbeddedS3``) it would share one GIL with the event pump, the
    handlers and the evaluation, and at hundreds of devices it starves them (and
    they it). Objects over 1 MB (masked inputs are ~4.8 MB, and the bucket keeps
    every cohort's) are spooled to disk rather than held in its memory. Its
    output (errors included) goes to ``log_path``, or nowhere if None.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        os.environ.setdefault(name, value)  # moto checks nothing; boto3 wants them
    env = dict(os.environ, MOTO_S3_DEFAULT_KEY_BUFFER_SIZE=str(1 << 20))
    # main() below, not moto.server's CLI: EmbeddedS3 silences its per-request log lines.
    out: Any = subprocess.DEVNULL
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_path, "ab")  # noqa: SIM115 - closed below, after the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "infra.s3server", "--port", str(port)],
        env=env, stdout=out, stderr=subprocess.STDOUT,
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
        if out is not subprocess.DEVNULL:
            out.close()


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
