"""The local stack: an S3 API, a seeded bucket, the event pump and the sweeper.

``LocalStack`` runs the *real* handlers in this process against a real S3
API: the embedded moto server by default, or any endpoint you give (MinIO,
SeaweedFS, AWS). Events come from the pump's listing, or from a push source
such as SeaweedFS's webhook bridge (``notifications=``). Run it alone with
``python -m infra.stack`` and point devices at the endpoint it prints.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedcore.clock import Clock, ManualClock
from fedcore.errors import NotFoundError
from fedcore.events import scheduled_event
from fedcore.modelspec import DEFAULT_MODEL, init_params, schema
from fedcore.server.settings import ServerSettings
from fedcore.storage import S3Store
from fedcore.versions import read_pointer, seed
from infra.cost import InvocationMeter, S3Meter
from infra.pump import EventPump, LocalContext, PushSource, Timer
from infra.s3server import EmbeddedS3

log = logging.getLogger(__name__)

# Field name -> environment variable the handlers read (template.yaml sets the same names;
# tests/infra/test_settings_template.py checks both directions).
SETTING_ENV = ServerSettings.env_names()


def seed_bucket(store: S3Store, *, model_seed: int = 0, model: str = DEFAULT_MODEL) -> bool:
    """Create the bucket and version 0 of ``model`` (a ``fedcore.modelspec.MODELS`` name)
    unless present; True if this call seeded. Version 0 fixes the model for good: devices
    build whatever its tensors fit."""
    spec = schema(model)  # an unknown name fails even where the bucket is seeded already
    store.ensure_bucket()
    try:
        read_pointer(store)
        return False
    except NotFoundError:
        return seed(store, init_params(spec, seed=model_seed))


def route_function_logs(path: Path | None, level: str = "INFO") -> None:
    """Send the handlers' JSON logs (powertools) to a file instead of stdout."""
    names = ["fl-aggregator", "fl-sweeper", "fl-gateway", "fedcore"]
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    for name in names:
        lg = logging.getLogger(name)
        fmt = next((h.formatter for h in lg.handlers if h.formatter), None)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        if fmt is not None:
            handler.setFormatter(fmt)
        lg.addHandler(handler)
        lg.setLevel(level)
        lg.propagate = False


class LocalStack:
    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        bucket: str = "fl-local",
        settings: dict[str, Any] | None = None,
        duplicate: bool = False,
        shuffle: bool = False,
        pump_interval_s: float = 0.1,
        sweep_interval_s: float = 1.0,
        workers: int = 4,
        log_path: Path | None = None,
        seed: int | None = None,
        notifications: PushSource | None = None,
        gateway: bool = True,
        clock: Clock | None = None,
        model: str = DEFAULT_MODEL,
    ) -> None:
        """``model`` is what version 0 is seeded with (if the bucket has none yet).

        ``clock`` is the time the aggregator and the sweeper read (None: the system's).

        A ``ManualClock`` makes deadlines pass only when a test calls ``advance``:
        cohort configs, manifests and results are stamped with it too, so every
        deadline the functions compute is on that clock. The device gateway keeps the
        system clock, since it checks the devices' own (real) timestamps.
        """
        self._given_endpoint = endpoint_url
        schema(model)  # an unknown name fails here, before any server starts
        self.model = model
        self.gateway = gateway  # serve the device gateway (presigned URLs) on gateway_url
        self.gateway_url = ""
        self._gateway: Any = None
        self.bucket = bucket
        self.settings = dict(settings or {})
        # Fails here, not in every handler invocation: an unknown key (a typo would
        # otherwise fall back to the default unnoticed), a value that does not parse, or a
        # combination ServerSettings refuses.
        self._setting_env = ServerSettings.env_for(self.settings)
        self.duplicate = duplicate
        self.shuffle = shuffle
        self.pump_interval_s = pump_interval_s
        self.sweep_interval_s = sweep_interval_s
        self.workers = workers
        self.log_path = log_path
        self.seed = seed
        self.clock = clock
        self._previous_clock: Clock | None = None
        self.notifications = notifications
        self._unsubscribe: Callable[[], None] | None = None
        self._server: EmbeddedS3 | None = None
        self.endpoint_url = endpoint_url or ""
        self.pump: EventPump | None = None
        self._sweeper: Timer | None = None
        self.sweeps = 0
        self.invocations = InvocationMeter()  # per-function calls and busy seconds (cost report)
        self.s3_meter: S3Meter | None = None  # requests and bytes, on the embedded server only
        self._saved_env: dict[str, str | None] = {}

    def start(self) -> LocalStack:
        if self._given_endpoint is None:
            # The server's own errors go beside the function logs (s3server.log).
            server_log = self.log_path.with_name("s3server.log") if self.log_path else None
            self._server = EmbeddedS3(log_path=server_log).start()
            self.endpoint_url = self._server.endpoint_url
            self.s3_meter = self._server.meter
        # The handlers read their settings from the process environment (as on Lambda);
        # what this stack sets is put back on stop, so a later stack or handler test in
        # the same process never inherits this one's settings.
        touched = [
            "BUCKET",
            "S3_ENDPOINT_URL",
            "POWERTOOLS_METRICS_DISABLED",
            *SETTING_ENV.values(),
        ]
        self._saved_env = {name: os.environ.get(name) for name in touched}
        os.environ["BUCKET"] = self.bucket
        os.environ["S3_ENDPOINT_URL"] = self.endpoint_url
        os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
        for env in SETTING_ENV.values():  # unset ones fall back to the code's defaults
            os.environ.pop(env, None)
        os.environ.update(self._setting_env)
        # Import after the environment is set: the handlers read it per invocation.
        from functions import runtime
        from functions.aggregator.app import handler as aggregate
        from functions.sweeper.app import handler as sweep

        if self.clock is not None:
            self._previous_clock = runtime.set_clock(self.clock)

        if self.gateway:
            import functions.gateway.app  # noqa: F401 - its loggers exist before routing

        route_function_logs(self.log_path)
        self.store = S3Store.connect(self.bucket, self.endpoint_url)
        seed_bucket(self.store, model=self.model)
        self.pump = EventPump(
            self.store,
            self.invocations.timed("aggregator", aggregate),
            interval_s=self.pump_interval_s,
            workers=self.workers,
            duplicate=self.duplicate,
            shuffle=self.shuffle,
            seed=self.seed,
            listing=self.notifications is None,
        ).start()
        if self.notifications is not None:
            self._unsubscribe = self.notifications.subscribe(self.bucket, self.pump.push)

        timed_sweep = self.invocations.timed("sweeper", sweep)

        def run_sweeper() -> None:
            timed_sweep(scheduled_event(), LocalContext("sweeper"))
            self.sweeps += 1

        self._sweep_once = run_sweeper
        self._sweeper = Timer(run_sweeper, self.sweep_interval_s, "sweeper").start()
        if self.gateway:
            from infra.gateway_server import GatewayServer

            self._gateway = GatewayServer(wrap=self.invocations.timed).start()
            self.gateway_url = self._gateway.url
        return self

    def sweep_now(self) -> None:
        self._sweep_once()

    def advance(self, seconds: float) -> None:
        """Move the stack's ``ManualClock`` forward, then sweep once, as the schedule would.

        The sweeper timer keeps its real-time cadence; with a clock that stands still,
        its sweeps find no deadline passed, so this sweep is the one that closes what
        the jump made overdue.
        """
        if not isinstance(self.clock, ManualClock):
            raise TypeError(f"advance needs LocalStack(clock=ManualClock()), not {self.clock!r}")
        self.clock.advance(seconds)
        self.sweep_now()

    def stop(self) -> None:
        if self._gateway:
            self._gateway.stop()
        if self._unsubscribe:  # before the pump stops taking events
            self._unsubscribe()
        if self._sweeper:
            self._sweeper.stop()
        if self.pump:
            self.pump.stop()
        if self._server:
            self._server.stop()
        if self._previous_clock is not None:
            from functions import runtime

            runtime.set_clock(self._previous_clock)
            self._previous_clock = None
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env = {}

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.stack", description=__doc__)
    p.add_argument("--endpoint-url", help="use this S3 API instead of the embedded moto server")
    p.add_argument("--port", type=int, default=0, help="port for the embedded server (0: any free)")
    p.add_argument("--bucket", default="fl-local")
    p.add_argument("--cohort-size", type=int, default=5)
    p.add_argument("--min-cohort-size", type=int, default=2)
    p.add_argument("--round-deadline-s", type=float, default=300.0)
    p.add_argument("--server-lr", type=float, default=ServerSettings().server_lr)
    p.add_argument("--log", type=Path, default=Path("runs/stack/functions.log"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = None
    endpoint = args.endpoint_url
    if endpoint is None:
        server = EmbeddedS3(args.port).start()
        endpoint = server.endpoint_url
    stack = LocalStack(
        endpoint_url=endpoint,
        bucket=args.bucket,
        settings={
            "cohort_size": args.cohort_size,
            "min_cohort_size": args.min_cohort_size,
            "round_deadline_s": args.round_deadline_s,
            "server_lr": args.server_lr,
        },
        log_path=args.log,
    ).start()
    print(f"S3 endpoint {endpoint}  bucket {args.bucket}  function logs {args.log}")
    print(
        f"device gateway {stack.gateway_url}; issue a token:  S3_ENDPOINT_URL={endpoint} "
        f"BUCKET={args.bucket} python -m infra.enroll issue --client dev-1"
    )
    print(
        f"run a device through the gateway:  python -m edge_client run --gateway "
        f"{stack.gateway_url} --enroll-token TOKEN --client-id dev-1 --num-shards 10 --shard 0"
    )
    print(
        f"run a device:  S3_ENDPOINT_URL={endpoint} BUCKET={args.bucket} "
        "python -m edge_client run --client-id dev-1 --num-shards 10 --shard 0"
    )
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    stack.stop()
    if server:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
