"""``python -m infra.simulate``: many simulated devices against a local stack, and a report.

Starts the local stack (the real event pump, aggregation handler and
sweeper; moto's S3 server in a process of its own unless ``--endpoint-url``),
lets ``sim``'s worker processes play the devices until the stop rule says so,
evaluates each new global version on the 10,000 MNIST test images and writes
a JSON report. The devices are in ``sim``; this module is what boots the
server around them, so that ``sim`` and ``edge_client`` never import ``infra``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge_client import defaults as d
from fedcore.errors import FedError
from fedcore.server.settings import ServerSettings
from fedcore.storage import ObjectStore
from fedcore.versions import load_model
from infra.demo import cohort_outcomes
from infra.s3server import moto_process
from infra.stack import LocalStack
from infra.watch import VersionWatch
from sim.simulation import (
    InFlight,
    Simulation,
    StopRule,
    UserPrivacyTally,
    overlapping_participations,
    progress_line,
)
from sim.worker import SimSettings


def watch_versions(
    store: ObjectStore,
    sim: Simulation,
    flight: InFlight,
    *,
    evaluate: Callable[[dict[str, np.ndarray]], tuple[float, float]] | None,
    stop_when: Callable[[int, float | None], bool],
    max_s: float,
    sample_s: float = 2.0,
    on_version: Callable[[dict[str, Any]], None] = lambda entry: None,
) -> Iterator[dict[str, Any]]:
    """Yield one entry per new global version until ``stop_when(version, accuracy)``,
    ``max_s`` seconds, or every worker has exited; samples cohorts in flight meanwhile."""
    watch = VersionWatch(store, max_s=max_s)
    privacy = UserPrivacyTally()

    def wait() -> None:
        sim.drain(sample_s)
        flight.sample()

    for new in watch.follow(wait=wait, alive=lambda: bool(sim.alive())):
        meta = new.meta
        acc, loss = evaluate(new.params) if evaluate else (None, None)
        entry = {
            "version": new.version,
            "test_accuracy": acc,
            "test_loss": loss,
            "elapsed_s": watch.elapsed_s(),
            "cohort": meta.cohorts[0] if meta.cohorts else None,
            "staleness": meta.staleness,
            "members": len(meta.members),
            "dropouts": len(meta.metrics.get("dropouts", [])),
            "train_loss": meta.metrics.get("train_loss"),
            "cohorts_in_flight": flight.samples[-1],
            "participations": sim.tally.participations,
            "devices_participated": len(sim.tally.devices_seen),
        }
        spent = privacy.add(
            meta.metrics.get("privacy"), list(meta.members), where=f"v{new.version}"
        )
        if spent:
            entry["privacy"] = spent
        on_version(entry)
        yield entry
        if stop_when(new.version, acc):
            return


def _mean_phase_s(versions: list[dict[str, Any]]) -> dict[str, float]:
    per: dict[str, list[float]] = {}
    for v in versions:
        for name, sec in (v.get("phase_s") or {}).items():
            per.setdefault(name, []).append(float(sec))
    return {name: round(float(np.mean(xs)), 3) for name, xs in per.items()}


def run(
    settings: SimSettings,
    server: dict[str, Any],
    rule: StopRule,
    *,
    endpoint_url: str | None = None,
    bucket: str | None = None,
    evaluate: bool = True,
    log_path: Any = None,
    pump_interval_s: float = 1.0,
    sweep_interval_s: float = 5.0,
    out: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Start the local stack (real handlers; a moto server process of its own unless
    ``endpoint_url``), play the devices until ``rule`` says stop, and report.

    ``server`` holds the handlers' settings by ``infra.stack.SETTING_ENV`` name
    (cohort_size, min_cohort_size, round_deadline_s, secagg_degree, ...).
    """
    import torch

    from edge_client.data import load_mnist
    from edge_client.model import build
    from edge_client.train import evaluate as evaluate_model

    torch.set_num_threads(1)
    mnist = load_mnist(progress=None)
    bucket = bucket or f"fl-sim-{int(time.time())}"

    def score(params: dict[str, np.ndarray]) -> tuple[float, float]:
        return evaluate_model(build(params), mnist.test_x, mnist.test_y)

    report: dict[str, Any] = {
        "settings": settings.__dict__ | {"workers": settings.num_workers},
        "server": server | {"mode": settings.mode},
        "stop_rule": rule.__dict__,
        "bucket": bucket,
        "s3": endpoint_url or "moto server process",
        "versions": [],
    }
    t0 = time.monotonic()
    with contextlib.ExitStack() as resources:
        if endpoint_url is None:
            server_log = Path(log_path).with_name("s3server.log") if log_path else None
            endpoint_url = resources.enter_context(moto_process(log_path=server_log))
        with LocalStack(
            endpoint_url=endpoint_url, bucket=bucket, settings=report["server"],
            pump_interval_s=pump_interval_s, sweep_interval_s=sweep_interval_s, log_path=log_path,
        ) as stack:  # fmt: skip
            acc0 = score(load_model(stack.store, 0)[0])[0] if evaluate else None
            out(f"v0    acc {acc0}  initial model; starting {settings.num_workers} workers "
                f"for {settings.devices} devices")  # fmt: skip
            sim = Simulation(stack.endpoint_url, bucket, settings).start(mnist.train_y)
            flight = InFlight(stack.store)
            try:
                while sim.tally.ready_workers < min(settings.num_workers, settings.devices):
                    sim.drain(1.0)
                    if not sim.alive():
                        raise RuntimeError("simulation workers exited during start-up")
                report["setup_s"] = round(time.monotonic() - t0, 2)
                out(f"workers ready after {report['setup_s']:.1f}s (devices enrolled)")
                for entry in watch_versions(
                    stack.store, sim, flight, evaluate=score if evaluate else None,
                    stop_when=rule.reached, max_s=rule.max_s - (time.monotonic() - t0),
                    on_version=lambda e: out(progress_line(e)),
                ):  # fmt: skip
                    report["versions"].append(entry)
            finally:
                tally = sim.stop()
            report["run_s"] = round(time.monotonic() - t0, 2)
            report["cohorts"] = cohort_outcomes(stack.store, report["versions"])
            assert stack.pump is not None
            report["pump"] = {
                "events": stack.pump.stats.events,
                "invocations": stack.pump.stats.invocations,
                "retries": stack.pump.stats.retries,
                "dead_letters": stack.pump.stats.dead_letters,
            }
            report["sweeper_invocations"] = stack.sweeps
    report["wall_time_s"] = round(time.monotonic() - t0, 2)
    report["initial_accuracy"] = acc0
    last = report["versions"][-1] if report["versions"] else None
    report["final_version"] = last["version"] if last else 0
    report["final_test_accuracy"] = last["test_accuracy"] if last else acc0
    report["reached_target"] = bool(
        last and rule.target_accuracy and (last["test_accuracy"] or 0) >= rule.target_accuracy
    )
    report["cohorts_in_flight"] = {
        "max": flight.max,
        "mean": round(flight.mean, 2),
        "samples": len(flight.samples),
    }
    report["function_invocations"] = report["pump"]["invocations"] + report["sweeper_invocations"]
    report["participations"] = {
        "total": tally.participations,
        "outcomes": tally.outcomes,
        "devices": len(tally.devices_seen),
        "overlapping": overlapping_participations(tally.records),
    }
    report["dropouts_in_applied_versions"] = sum(v["dropouts"] for v in report["versions"])
    report["phase_s_mean"] = _mean_phase_s(report["versions"])
    steps: dict[str, list[float]] = {}
    for ws in tally.worker_stats.values():
        for kind, total in ws["step_s"].items():
            agg = steps.setdefault(kind, [0.0, 0])
            agg[0] += total
            agg[1] += ws["step_n"][kind]
    report["device_steps"] = {
        k: {"count": int(n), "total_s": round(t, 2), "mean_s": round(t / n, 4)}
        for k, (t, n) in sorted(steps.items())
    }
    report["bucket_reads_by_workers"] = sum(ws["reads"] for ws in tally.worker_stats.values())
    report["member_messages_read_from_worker_copy"] = sum(
        ws["shared_hits"] for ws in tally.worker_stats.values()
    )
    report["participation_records"] = tally.records
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    sim = argparse.ArgumentParser(prog="python -m infra.simulate", description=__doc__)
    server = ServerSettings()  # what the local stack runs with unless told otherwise
    sim.add_argument("--devices", type=int, default=d.SIM_DEVICES)
    sim.add_argument("--workers", type=int, default=0, help="worker processes (0: cpu count)")
    sim.add_argument("--cohort-size", type=int, default=d.SIM_COHORT_SIZE)
    sim.add_argument("--max-active", type=int, default=0, help="devices online at once (0: all)")
    sim.add_argument("--min-cohort-size", type=int, default=d.SIM_MIN_COHORT_SIZE)
    sim.add_argument("--partition", choices=["iid", "dirichlet", "shards"], default=d.PARTITION)
    sim.add_argument("--alpha", type=float, default=d.DIRICHLET_ALPHA)
    sim.add_argument("--max-samples", type=int, default=0, help="cap each device's shard")
    sim.add_argument("--epochs", type=int, default=d.SIM_TRAINING.epochs)
    sim.add_argument("--batch-size", type=int, default=d.SIM_TRAINING.batch_size)
    sim.add_argument("--lr", type=float, default=d.SIM_TRAINING.lr)
    sim.add_argument("--momentum", type=float, default=d.SIM_TRAINING.momentum)
    sim.add_argument("--plaintext", action="store_true", help="plaintext cohorts (debugging)")
    sim.add_argument(
        "--secagg-degree", type=int, default=server.secagg_degree,
        help="0: SecAgg+ default (log n)",
    )  # fmt: skip
    sim.add_argument("--round-deadline-s", type=float, default=server.round_deadline_s)
    sim.add_argument(
        "--short-round-s", type=float, default=d.SIM_SHORT_ROUND_S,
        help="key, share and unmask rounds (a cohort of 100 on a few cores needs over 60 s)",
    )  # fmt: skip
    sim.add_argument(
        "--dp-user-noise", type=float, default=d.DP_USER_NOISE,
        help="user-level distributed DP noise multiplier z for every cohort (0: off)",
    )  # fmt: skip
    sim.add_argument(
        "--dp-user-clip", type=float, default=d.DP_USER_CLIP, help="L2 clip of each delta"
    )
    sim.add_argument("--drop-prob", type=float, default=0.0)
    sim.add_argument("--drop-at", choices=["keys", "shares", "inputs"], default=d.DROP_AT)
    sim.add_argument("--target-accuracy", type=float, default=0.0, help="stop at this accuracy")
    sim.add_argument("--max-versions", type=int, default=0, help="stop at this version")
    sim.add_argument("--max-minutes", type=float, default=d.SIM_MAX_MINUTES)
    sim.add_argument(
        "--endpoint-url", default=None, help="an S3 API to use instead of the embedded server"
    )
    sim.add_argument("--bucket", default=None, help="default: a fresh fl-sim-<time> bucket")
    sim.add_argument("--report", type=Path, default=Path("runs/simulate/report.json"))
    return sim.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return simulate(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except FedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def simulate(args: argparse.Namespace) -> int:
    """One run from the command line's flags; the report goes to ``args.report``."""
    settings = SimSettings(
        devices=args.devices, workers=args.workers, partition=args.partition, alpha=args.alpha,
        max_samples=args.max_samples, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, mode="plaintext" if args.plaintext else "secagg",
        drop_prob=args.drop_prob, drop_at=args.drop_at, max_active=args.max_active,
        operator_dir=str(args.report.parent / "operator"),  # this run's operator key
    )  # fmt: skip
    server = {
        "cohort_size": args.cohort_size,
        "min_cohort_size": args.min_cohort_size,
        "round_deadline_s": args.round_deadline_s,
        "short_round_s": args.short_round_s,
        "secagg_degree": args.secagg_degree,
    }
    if args.dp_user_noise > 0:
        if args.plaintext:
            print("--dp-user-noise needs secure aggregation (drop --plaintext)", file=sys.stderr)
            return 2
        server |= {"dp_user_noise": args.dp_user_noise, "dp_user_clip": args.dp_user_clip}
    rule = StopRule(args.target_accuracy, args.max_versions, args.max_minutes * 60)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    report = run(
        settings, server, rule, endpoint_url=args.endpoint_url, bucket=args.bucket,
        log_path=args.report.parent / "functions.log",
    )  # fmt: skip
    args.report.write_text(json.dumps(report, indent=2, default=str))
    print(
        f"{report['final_version']} versions, accuracy {report['final_test_accuracy']}, "
        f"{report['wall_time_s']:.0f}s; report {args.report}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
