"""``make demo``: a local federated run on the embedded S3 server.

Starts the local stack (moto server, event pump, sweeper running the real
handlers), launches one ``python -m edge_client run`` process per device over
a partition of MNIST, evaluates each new global version on the 10,000 test
images, prints one line per version and writes a JSON report plus a plot.
This process imports torch for evaluation only; the handlers it runs do not.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedcore.versions import find_head, load_model
from infra.stack import LocalStack


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infra.demo", description=__doc__)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--cohort-size", type=int, default=5)
    p.add_argument("--min-cohort-size", type=int, default=2)
    p.add_argument("--versions", type=int, default=8, help="stop after this many new versions")
    p.add_argument("--partition", choices=["iid", "dirichlet", "shards"], default="iid")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--max-samples", type=int, default=0, help="cap each device's shard (0: all)")
    p.add_argument("--round-deadline-s", type=float, default=120.0)
    p.add_argument("--timeout-s", type=float, default=600.0, help="give up after this long")
    p.add_argument(
        "--endpoint-url", default=None, help="use this S3 API instead of the embedded one"
    )
    p.add_argument("--bucket", default=None, help="default: a fresh fl-demo-<time> bucket")
    p.add_argument("--report", type=Path, default=Path("runs/demo/report.json"))
    p.add_argument("--eval-threads", type=int, default=1)
    p.add_argument("--duplicate-events", action="store_true", help="deliver every event twice")
    p.add_argument("--shuffle-events", action="store_true", help="shuffle event delivery order")
    args = p.parse_args(argv)
    if args.clients < args.min_cohort_size or args.cohort_size < args.min_cohort_size:
        p.error("need --clients and --cohort-size >= --min-cohort-size")
    return args


def spawn_devices(
    args: argparse.Namespace, stack: LocalStack, out: Path
) -> list[subprocess.Popen[bytes]]:
    env = dict(
        os.environ, S3_ENDPOINT_URL=stack.endpoint_url, BUCKET=stack.bucket, PYTHONUNBUFFERED="1"
    )
    logs = out / "devices"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(args.clients):
        cid = f"dev-{i:03d}"
        cmd = [
            sys.executable, "-m", "edge_client", "run",
            "--client-id", cid, "--num-shards", str(args.clients), "--shard", str(i),
            "--partition", args.partition, "--alpha", str(args.alpha),
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--seed", str(i), "--until-version", str(args.versions), "--poll-s", "0.5",
            "--max-samples", str(args.max_samples),
        ]  # fmt: skip
        log = open(logs / f"{cid}.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def stop_devices(procs: list[subprocess.Popen[bytes]], grace_s: float = 20.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [v["version"] for v in report["versions"]]
    ys = [v["test_accuracy"] for v in report["versions"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, marker="o")
    ax.set_xlabel("global version")
    ax.set_ylabel("test accuracy (10,000 MNIST images)")
    cfg = report["config"]
    ax.set_title(f"{cfg['clients']} devices, cohorts of {cfg['cohort_size']}, {cfg['partition']}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from edge_client.data import load_mnist
    from edge_client.model import build
    from edge_client.train import evaluate

    torch.set_num_threads(args.eval_threads)
    out = args.report.parent
    out.mkdir(parents=True, exist_ok=True)
    mnist = load_mnist(progress=print)  # devices find the cache warm
    bucket = args.bucket or f"fl-demo-{int(time.time())}"
    settings = {
        "cohort_size": args.cohort_size,
        "min_cohort_size": args.min_cohort_size,
        "round_deadline_s": args.round_deadline_s,
        "checkin_wait_s": 10.0,
        "stuck_after_s": 30.0,
        "server_lr": args.server_lr,
    }
    t0 = time.monotonic()
    report: dict[str, Any] = {
        "config": {**vars(args), "report": str(args.report), "bucket": bucket},
        "versions": [],
    }
    with LocalStack(
        endpoint_url=args.endpoint_url,
        bucket=bucket,
        settings=settings,
        duplicate=args.duplicate_events,
        shuffle=args.shuffle_events,
        log_path=out / "functions.log",
    ) as stack:
        print(
            f"S3 API {stack.endpoint_url}, bucket {bucket}; device logs in {out / 'devices'}, "
            f"function logs in {out / 'functions.log'}"
        )
        params, _, _ = load_model(stack.store, 0)
        acc0, _ = evaluate(build(params), mnist.test_x, mnist.test_y)
        print(f"v0     initial model                                   acc {acc0:.4f}")
        procs = spawn_devices(args, stack, out)
        seen = 0
        last_note = time.monotonic()
        try:
            while seen < args.versions:
                if time.monotonic() - t0 > args.timeout_s:
                    print(
                        f"timeout after {args.timeout_s:.0f}s with {seen} versions", file=sys.stderr
                    )
                    break
                head = find_head(stack.store)
                if head <= seen and all(p.poll() is not None for p in procs):
                    print("all devices exited early; see their logs", file=sys.stderr)
                    break
                if head <= seen:
                    if time.monotonic() - last_note > 30:
                        print(
                            f"... waiting for v{seen + 1} ({time.monotonic() - t0:.0f}s)",
                            flush=True,
                        )
                        last_note = time.monotonic()
                    time.sleep(0.5)
                    continue
                seen += 1
                last_note = time.monotonic()
                params, meta, _ = load_model(stack.store, seen)
                acc, loss = evaluate(build(params), mnist.test_x, mnist.test_y)
                elapsed = time.monotonic() - t0
                entry = {
                    "version": seen,
                    "test_accuracy": acc,
                    "test_loss": loss,
                    "elapsed_s": round(elapsed, 2),
                    "cohort": meta.cohorts[0] if meta.cohorts else None,
                    "staleness": meta.staleness,
                    "weight": meta.weight,
                    "members": meta.members,
                    "num_samples": meta.num_samples,
                    "train_loss": meta.metrics.get("train_loss"),
                }
                report["versions"].append(entry)
                print(
                    f"v{seen:<5} cohort {entry['cohort']}  staleness {meta.staleness}  "
                    f"members {len(meta.members)}  acc {acc:.4f}  loss {loss:.4f}  {elapsed:6.1f}s",
                    flush=True,
                )
        finally:
            stop_devices(procs)
        report["pump"] = {
            "events": stack.pump.stats.events if stack.pump else 0,
            "invocations": stack.pump.stats.invocations if stack.pump else 0,
            "dead_letters": stack.pump.stats.dead_letters if stack.pump else [],
        }
    report["final_test_accuracy"] = (
        report["versions"][-1]["test_accuracy"] if report["versions"] else acc0
    )
    report["wall_time_s"] = round(time.monotonic() - t0, 2)
    args.report.write_text(json.dumps(report, indent=2))
    plot(report, args.report.with_suffix(".png"))
    print(
        f"final test accuracy {report['final_test_accuracy']:.4f} after {len(report['versions'])} versions "
        f"in {report['wall_time_s']:.0f}s; report {args.report}"
    )
    return 0 if len(report["versions"]) >= args.versions else 1


if __name__ == "__main__":
    sys.exit(main())
