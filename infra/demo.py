"""``make demo``: a local federated run on the embedded S3 server.

Starts the local stack (moto server, event pump, sweeper running the real
handlers), launches one ``python -m edge_client run`` process per device over
a partition of MNIST, evaluates each new global version on the 10,000 test
images, prints one line per version and writes a JSON report plus a plot.
This process imports torch for evaluation only; the handlers it runs do not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edge_client import defaults as d
from edge_client.identity import load_or_create_signing_key
from fedcore import layout
from fedcore.device.machine import DEVICE_MIN_SURVIVORS
from fedcore.dp.ledger import STATE_FILE, ReleaseTally
from fedcore.errors import FedError, NotFoundError
from fedcore.gateway import issue_token
from fedcore.layout import Phase
from fedcore.messages import parse_result
from fedcore.modelspec import DEFAULT_MODEL, MODELS
from fedcore.operator import certify, load_or_create_operator_key, public_text
from fedcore.secagg import crypto
from fedcore.server.settings import ServerSettings
from fedcore.status import cohort_ids, describe
from fedcore.storage import S3Store
from fedcore.versions import load_model
from infra import cost
from infra.stack import LocalStack
from infra.watch import Ended, VersionWatch, waiting_lines

PLAIN_TRAINING = {**asdict(d.DEVICE_TRAINING), "round_deadline_s": 90.0, "versions": 8}
# DP-SGD is about 3x slower per example: a longer input round and fewer versions.
DP_TRAINING = {**asdict(d.DP_SGD_TRAINING), "round_deadline_s": 400.0, "versions": 4}
# The DP-friendly model: its recipe, ten participations.
DP_CNN_TRAINING = {**asdict(d.DP_CNN_SGD_TRAINING), "round_deadline_s": 400.0, "versions": 10}
# While no new version comes: at most this often, a line per open cohort saying why.
NOTE_EVERY_S = 10.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infra.demo", description=__doc__)
    server = ServerSettings()
    plain, dp, dpc = PLAIN_TRAINING, DP_TRAINING, DP_CNN_TRAINING
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--cohort-size", type=int, default=5)
    p.add_argument(
        "--min-cohort-size",
        type=int,
        default=None,
        help="fewest members a cohort forms and completes with (default 3, or the cohort size "
        "if smaller; below 3 the secure devices are told to accept it, and each member of a "
        "2-member cohort learns the other's update)",
    )
    p.add_argument(
        "--versions", type=int, default=None,
        help=f"stop after this many versions ({plain['versions']}; DP-SGD: {dp['versions']}, "
        f"on dp_cnn {dpc['versions']})",
    )  # fmt: skip
    p.add_argument("--partition", choices=["iid", "dirichlet", "shards"], default=d.PARTITION)
    p.add_argument("--alpha", type=float, default=d.DIRICHLET_ALPHA)

    # Local training; None picks PLAIN_TRAINING's, or DP_TRAINING's under --dp-epsilon.
    def default(key: str) -> str:
        return f"default {plain[key]} (DP-SGD: {dp[key]}; DP-SGD on dp_cnn: {dpc[key]})"

    p.add_argument("--epochs", type=int, default=None, help=default("epochs"))
    p.add_argument("--batch-size", type=int, default=None, help=default("batch_size"))
    p.add_argument("--lr", type=float, default=None, help=default("lr"))
    p.add_argument("--momentum", type=float, default=None, help=default("momentum"))
    p.add_argument("--optimizer", choices=d.OPTIMIZERS, default=None, help=default("optimizer"))
    p.add_argument("--server-lr", type=float, default=server.server_lr)
    p.add_argument("--max-samples", type=int, default=0, help="cap each device's shard (0: all)")
    p.add_argument(
        "--round-deadline-s",
        type=float,
        default=None,
        help=f"limit of the training/input round ({plain['round_deadline_s']:.0f} s; "
        f"DP-SGD: {dpc['round_deadline_s']:.0f} s)",
    )
    p.add_argument(
        "--deadline-margin",
        type=float,
        default=server.deadline_margin,
        help="adaptive inputs deadlines: this many times what recent members needed to "
        "train, within the server's DEADLINE_MIN_S/DEADLINE_MAX_S (0: off, the fixed "
        "--round-deadline-s; see the README's 'Slow and uneven devices')",
    )
    p.add_argument(
        "--short-round-s",
        type=float,
        default=15.0,
        help="limit of the key, share and unmask rounds (secure aggregation)",
    )
    p.add_argument(
        "--plaintext",
        action="store_true",
        help="plaintext cohorts on server and devices (debugging and cost measurements only)",
    )
    p.add_argument(
        "--drop-fraction",
        type=float,
        default=0.0,
        help="each device vanishes from a cohort with this probability (dropout experiment)",
    )
    p.add_argument(
        "--drop-round",
        choices=["keys", "shares", "inputs"],
        default="shares",
        help="where dropped devices vanish: before advertising keys, after sharing keys, "
        "or after uploading their masked input",
    )
    p.add_argument(
        "--timeout-s",
        type=float,
        default=1800.0,
        help="give up after this long (the default run took 509 s on an idle 2-core machine "
        "and 843 s beside eight CPU-burning processes)",
    )
    p.add_argument(
        "--endpoint-url", default=None, help="use this S3 API instead of the embedded one"
    )
    p.add_argument("--bucket", default=None, help="default: a fresh fl-demo-<time> bucket")
    p.add_argument("--report", type=Path, default=Path("runs/demo/report.json"))
    p.add_argument("--eval-threads", type=int, default=1)
    p.add_argument(
        "--dp-epsilon",
        type=float,
        default=0.0,
        help="sample-level DP-SGD on every device with this epsilon budget (0: off)",
    )
    p.add_argument("--dp-delta", type=float, default=d.DP_DELTA)
    p.add_argument(
        "--model",
        choices=sorted(MODELS),
        default=DEFAULT_MODEL,
        help="what version 0 is: simple_cnn (1.2M parameters) or dp_cnn (26k, GroupNorm, "
        "tanh; with --dp-epsilon it trains with DP_CNN_TRAINING and a per-sample clip of "
        f"{d.DP_CNN_MAX_GRAD_NORM})",
    )
    p.add_argument(
        "--dp-user-noise",
        type=float,
        default=d.DP_USER_NOISE,
        help="user-level distributed DP: Skellam noise multiplier of each cohort sum (0: off)",
    )
    p.add_argument(
        "--dp-user-clip", type=float, default=d.DP_USER_CLIP, help="user-level DP: L2 clip"
    )
    p.add_argument(
        "--dp-user-checkin-p",
        type=float,
        default=d.DP_USER_CHECKIN_P,
        help="user-level DP random check-in: each device's chance per cohort to contribute "
        "its update (else zeros); below 1 devices book the amplified epsilon",
    )
    p.add_argument(
        "--direct-s3",
        action="store_true",
        help="devices use S3 credentials directly (debugging); default: no credentials, "
        "enrollment tokens and presigned URLs from the gateway",
    )
    p.add_argument("--duplicate-events", action="store_true", help="deliver every event twice")
    p.add_argument("--shuffle-events", action="store_true", help="shuffle event delivery order")
    args = p.parse_args(argv)
    # DP-SGD wants large batches, no momentum and a larger step (the noise's norm grows
    # with the model's 1.2M dimensions and shrinks with the batch).
    base = dp_training(args.model) if args.dp_epsilon else PLAIN_TRAINING
    for name, value in base.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        d.optimizer_name(dp_sgd=bool(args.dp_epsilon), asked=args.optimizer)
    except ValueError as exc:
        p.error(str(exc))
    if args.dp_user_noise and args.plaintext:
        p.error("--dp-user-noise needs secure aggregation: the noise hides under the masks")
    if not 0 < args.dp_user_checkin_p <= 1:
        p.error("--dp-user-checkin-p is a probability in (0, 1]")
    if not 0.0 <= args.drop_fraction < 1.0:
        p.error("--drop-fraction must be in [0, 1)")
    if args.plaintext and args.drop_round != "inputs" and args.drop_fraction:
        args.drop_round = "inputs"  # plaintext cohorts have only the input round
    if args.min_cohort_size is None:
        args.min_cohort_size = min(DEVICE_MIN_SURVIVORS, args.cohort_size)
    if args.min_cohort_size < 2:
        p.error("--min-cohort-size must be at least 2")
    if args.clients < args.min_cohort_size or args.cohort_size < args.min_cohort_size:
        p.error("need --clients and --cohort-size >= --min-cohort-size")
    return args


def dp_training(model: str) -> dict[str, Any]:
    """The demo's DP-SGD training for ``model`` (its help text and its defaults)."""
    return DP_CNN_TRAINING if model == "dp_cnn" else DP_TRAINING


def devices_accept_small_cohorts(args: argparse.Namespace) -> bool:
    """Whether the run's secure cohorts may complete below the devices' default floor, so
    the devices are started with ``--min-survivors`` and the person is told."""
    return not args.plaintext and args.min_cohort_size < DEVICE_MIN_SURVIVORS


def device_privacy_args(args: argparse.Namespace) -> list[str]:
    """The devices' DP flags for the demo's privacy settings (none without DP)."""
    cmd: list[str] = []
    if args.dp_epsilon:
        rounds = math.ceil(args.versions * args.cohort_size / args.clients) + 1
        cmd += ["--dp-epsilon", str(args.dp_epsilon), "--dp-delta", str(args.dp_delta)]
        cmd += ["--dp-planned-rounds", str(rounds)]
        if args.model == "dp_cnn":
            cmd += ["--dp-max-grad-norm", str(d.DP_CNN_MAX_GRAD_NORM)]
    if args.dp_user_noise:
        # The noisy global model has large weights: keep local steps finite.
        cmd += ["--max-grad-norm", "1.0"]
        cmd += ["--dp-user-noise", str(args.dp_user_noise)]
        cmd += ["--dp-user-clip", str(args.dp_user_clip), "--dp-user-epsilon", "1e9"]
        cmd += ["--dp-user-checkin-p", str(args.dp_user_checkin_p)]
    return cmd


def spawn_devices(
    args: argparse.Namespace, stack: LocalStack, out: Path
) -> list[subprocess.Popen[bytes]]:
    env = dict(
        os.environ,
        S3_ENDPOINT_URL=stack.endpoint_url,
        BUCKET=stack.bucket,
        PYTHONUNBUFFERED="1",
        FL_STATE_DIR=str(out / "state"),  # each device's identity key lives here
    )
    logs = out / "devices"
    logs.mkdir(parents=True, exist_ok=True)
    operator_sk = None
    if not args.plaintext:
        # This run's operator key, kept in the run folder (never in the bucket): it certifies
        # each device's identity key, and devices get only its public key.
        operator_sk = load_or_create_operator_key(out / "operator")
        env["FL_OPERATOR_KEY"] = public_text(operator_sk)
    procs = []
    for i in range(args.clients):
        cid = f"dev-{i:03d}"
        public = None
        if operator_sk is not None:
            # The operator certifies the key the device will use (created here, in the
            # device's own state folder, as the device would on first run).
            device_sk = load_or_create_signing_key(out / "state" / cid)
            public = crypto.ed25519_public(device_sk)
            certify(stack.store, operator_sk, cid, public)
        cmd = [
            sys.executable, "-m", "edge_client", "run",
            "--client-id", cid, "--num-shards", str(args.clients), "--shard", str(i),
            "--partition", args.partition, "--alpha", str(args.alpha),
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--momentum", str(args.momentum), "--optimizer", args.optimizer,
            # A quicker poll than the device default: the demo's rounds are short.
            "--seed", str(i), "--until-version", str(args.versions), "--poll-s", "0.5",
            "--max-samples", str(args.max_samples),
            "--drop-prob", str(args.drop_fraction), "--drop-at", args.drop_round,
        ]  # fmt: skip
        if args.plaintext:
            cmd.append("--plaintext")
        cmd += device_privacy_args(args)
        if devices_accept_small_cohorts(args):
            cmd += ["--min-survivors", str(args.min_cohort_size)]
        dev_env = env
        if not args.direct_s3:
            # No bucket, endpoint or AWS keys: an operator token (in the environment, not argv)
            # enrolls the device's key; everything else goes through presigned URLs.
            dev_env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
            for name in ("S3_ENDPOINT_URL", "BUCKET"):
                dev_env.pop(name, None)
            dev_env["FL_ENROLL_TOKEN"] = issue_token(
                stack.store, cid, ttl_s=3600, public_key=public
            )
            cmd += ["--gateway", stack.gateway_url]
        log = open(logs / f"{cid}.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(cmd, env=dev_env, stdout=log, stderr=subprocess.STDOUT))
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


def privacy_entry(
    privacy: dict[str, Any] | None, state_dir: Path, tally: ReleaseTally
) -> dict[str, Any] | None:
    """Epsilons next to accuracy: devices' sample-level spend and this release's user level.

    ``tally`` has already composed this release (``ReleaseTally.add``); its every-release
    epsilon is the spend of a device that was in every release so far.
    """
    spent = []
    for path in sorted(state_dir.glob(f"*/{STATE_FILE}")):
        with contextlib.suppress(ValueError, OSError):
            spent.append(float(json.loads(path.read_text())["sample_epsilon"]))
    user = (privacy or {}).get("user_level")
    if not spent and not user:
        return None
    return {
        "sample_epsilon_max": max(spent, default=0.0),
        "sample_epsilon_median": statistics.median(spent) if spent else 0.0,
        "user_epsilon": user["epsilon"] if user else 0.0,
        "user_epsilon_all_releases": tally.every_release_epsilon(user["delta"]) if user else 0.0,
        "user_level": {k: v for k, v in user.items() if k not in ("rdp", "rdp_orders")}
        if user
        else None,
    }


def cohort_outcomes(store: S3Store, versions: list[dict[str, Any]]) -> dict[str, Any]:
    """Fill each version's ``phase_s`` from its cohort's result; count applied and aborted."""
    results = {}
    for cid in cohort_ids(store):
        try:
            blob = store.get(layout.state_key(cid, Phase.RESULT)).body
        except NotFoundError:
            continue  # still open, or abandoned when the demo stopped
        results[cid] = parse_result(blob, where=cid)
    for entry in versions:
        result = results.get(entry["cohort"])
        entry["phase_s"] = result.phase_s if result else None
    aborted = {c: r.reason for c, r in results.items() if r.status == "aborted"}
    return {
        "applied": sum(r.status == "applied" for r in results.values()),
        "aborted": len(aborted),
        "abort_reasons": aborted,
    }


def why_waiting(stack: LocalStack, version: int, t0: float, explained: set[str]) -> list[str]:
    """The waiting lines (``infra.watch.waiting_lines``) from the bucket's status view; adds
    the aborted cohorts they explain to ``explained`` so each reason is printed once."""
    elapsed = time.monotonic() - t0
    try:
        view = describe(stack.store, versions=0, cohorts=8)
    except FedError as exc:  # a status read is no reason to stop the run
        return [f"... waiting for v{version} ({elapsed:.0f}s): cannot read the bucket ({exc})"]
    now = (stack.clock or time.time)()
    lines = waiting_lines(
        view, next_version=version, elapsed_s=elapsed, now=now, reported=explained
    )
    explained.update(c.cohort_id for c in view.cohorts if c.outcome == "aborted")
    return lines


def cost_section(stack: LocalStack, versions: list[dict[str, Any]]) -> dict[str, Any]:
    """What this run would cost on AWS (infra/cost.py; prices in infra/aws-prices.json)."""
    if stack.s3_meter is None:
        return {"unavailable": "S3 requests are metered on the embedded S3 server only"}
    stored = sum(info.size for info in stack.store.list(""))
    return cost.estimate(
        stack.s3_meter.usage,
        stack.invocations,
        stored_bytes=stored,
        versions=len(versions),
        participations=sum(len(v["members"]) for v in versions),
        prices=cost.load_prices(),
    )


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
    mode = "plaintext" if cfg["plaintext"] else "secure aggregation"
    ax.set_title(
        f"{cfg['clients']} devices, cohorts of {cfg['cohort_size']}, {cfg['partition']}, {mode}"
    )
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    private = [v for v in report["versions"] if v.get("privacy")]
    if not private:
        return
    fig, ax = plt.subplots(figsize=(6, 4))  # accuracy against the privacy spent so far
    for key, label in (
        ("sample_epsilon_max", "sample-level epsilon (max over devices)"),
        ("user_epsilon_all_releases", "user-level epsilon (all releases composed)"),
    ):
        pts = [(v["privacy"][key], v["test_accuracy"]) for v in private if v["privacy"][key]]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xlabel(f"epsilon spent (delta {cfg['dp_delta']})")
    ax.set_ylabel("test accuracy")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path.with_name(path.stem + "-privacy.png"), dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from edge_client.data import load_mnist
    from edge_client.model import build
    from edge_client.train import evaluate

    torch.set_num_threads(args.eval_threads)
    if devices_accept_small_cohorts(args):
        print(
            f"note: cohorts may complete with {args.min_cohort_size} members; the devices are "
            "told to accept that, and each member of a 2-member cohort learns the other's update"
        )
    # Devices train tanh under DP-SGD (edge_client run's default); evaluate the same network.
    activation = d.activation(dp_sgd=args.dp_epsilon > 0)
    out = args.report.parent
    out.mkdir(parents=True, exist_ok=True)
    mnist = load_mnist(progress=print)  # devices find the cache warm
    bucket = args.bucket or f"fl-demo-{int(time.time())}"
    if args.bucket is None and (out / "state").exists():
        # A fresh bucket means fresh devices: new identity keys and untouched privacy
        # budgets (a device's budget file survives restarts against the same bucket).
        shutil.rmtree(out / "state")
    settings = {
        "cohort_size": args.cohort_size,
        "min_cohort_size": args.min_cohort_size,
        "round_deadline_s": args.round_deadline_s,
        "deadline_margin": args.deadline_margin,
        "checkin_wait_s": 10.0,
        "stuck_after_s": 30.0,
        "server_lr": args.server_lr,
        "mode": "plaintext" if args.plaintext else "secagg",
        "dp_user_noise": args.dp_user_noise,
        "dp_user_clip": args.dp_user_clip,
        "dp_delta": args.dp_delta,
        "short_round_s": args.short_round_s,
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
        model=args.model,
    ) as stack:
        print(
            f"S3 API {stack.endpoint_url}, bucket {bucket}; device logs in {out / 'devices'}, "
            f"function logs in {out / 'functions.log'}, S3 server errors in {out / 's3server.log'}"
        )
        params, _, _ = load_model(stack.store, 0)
        acc0, _ = evaluate(build(params, activation=activation), mnist.test_x, mnist.test_y)
        print(f"v0     initial model                                   acc {acc0:.4f}")
        procs = spawn_devices(args, stack, out)
        tally = ReleaseTally()
        watch = VersionWatch(stack.store, max_s=args.timeout_s, t0=t0, seen=0)
        last_note = time.monotonic()
        explained: set[str] = set()  # aborted cohorts whose reason was printed

        def wait() -> None:
            nonlocal last_note
            if time.monotonic() - last_note > NOTE_EVERY_S:
                print("\n".join(why_waiting(stack, watch.seen + 1, t0, explained)), flush=True)
                last_note = time.monotonic()
            time.sleep(0.5)

        try:
            for new in watch.follow(wait=wait, alive=lambda: any(p.poll() is None for p in procs)):
                seen, params, meta = new.version, new.params, new.meta
                last_note = time.monotonic()
                tally.add(meta.metrics.get("privacy"), meta.members, where=f"v{seen}")
                acc, loss = evaluate(
                    build(params, activation=activation), mnist.test_x, mnist.test_y
                )
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
                    "survivors": len(meta.members),
                    "dropouts": meta.metrics.get("dropouts", []),
                    "phase_s": None,  # filled from the cohort's result below
                    "privacy": privacy_entry(meta.metrics.get("privacy"), out / "state", tally),
                }
                report["versions"].append(entry)
                eps = entry["privacy"]
                eps_text = (
                    f"  eps sample {eps['sample_epsilon_max']:.2f} user {eps['user_epsilon']:.2f}"
                    if eps
                    else ""
                )
                print(
                    f"v{seen:<5} cohort {entry['cohort']}  staleness {meta.staleness}  "
                    f"members {len(meta.members)}  dropouts {len(entry['dropouts'])}  acc {acc:.4f}  loss {loss:.4f}  {elapsed:6.1f}s"
                    f"{eps_text}",
                    flush=True,
                )
                if seen >= args.versions:
                    break
            if watch.ended is Ended.TIMEOUT:
                n = len(report["versions"])
                print(f"timeout after {args.timeout_s:.0f}s with {n} versions", file=sys.stderr)
            elif watch.ended is Ended.EXITED:
                print("all devices exited early; see their logs", file=sys.stderr)
        finally:
            stop_devices(procs)
        report["cohorts"] = cohort_outcomes(stack.store, report["versions"])
        report["pump"] = {
            "events": stack.pump.stats.events if stack.pump else 0,
            "invocations": stack.pump.stats.invocations if stack.pump else 0,
            "dead_letters": stack.pump.stats.dead_letters if stack.pump else [],
        }
        report["cost"] = cost_section(stack, report["versions"])
    report["final_test_accuracy"] = (
        report["versions"][-1]["test_accuracy"] if report["versions"] else acc0
    )
    report["wall_time_s"] = round(time.monotonic() - t0, 2)
    args.report.write_text(json.dumps(report, indent=2))
    plot(report, args.report.with_suffix(".png"))
    last = report["versions"][-1]["privacy"] if report["versions"] else None
    if last:
        print(
            f"privacy spent: sample-level epsilon max {last['sample_epsilon_max']:.3f} "
            f"(median {last['sample_epsilon_median']:.3f}); user-level epsilon of the last "
            f"release {last['user_epsilon']:.3f}, all releases composed "
            f"{last['user_epsilon_all_releases']:.3f} (delta {args.dp_delta})"
        )
    c = report.get("cost", {})
    if "run_usd" in c:
        print(
            f"AWS cost estimate: ${c['run_usd']:.4f} for the run, ${c['per_version_usd'] or 0:.5f} "
            f"per version, ${c['per_participation_usd'] or 0:.6f} per device participation, "
            f"plus ${c['storage_per_month_usd']:.5f}/month to store the bucket (see report 'cost')"
        )
    print(
        f"final test accuracy {report['final_test_accuracy']:.4f} after {len(report['versions'])} versions "
        f"in {report['wall_time_s']:.0f}s; report {args.report}"
    )
    return 0 if len(report["versions"]) >= args.versions else 1


if __name__ == "__main__":
    sys.exit(main())
