"""``python -m edge_client``: the device program.

Subcommands:
  run       poll the bucket, join cohorts, train on this device's shard, upload
  evaluate  test accuracy of a global version (default: the newest)
  status    versions and open cohorts of the bucket
  identity  print this device's identity key (created if absent), for the operator
            to certify (``python -m infra.enroll issue --public-key``)

Connection settings come from flags or the environment: ``S3_ENDPOINT_URL``
(omit for AWS), ``BUCKET``, ``CLIENT_ID``; AWS credentials as boto3 finds them.
With ``--gateway URL`` (env ``FL_GATEWAY_URL``) a device holds no AWS
credentials at all: it enrolls its key once with an operator-issued
``--enroll-token`` and then reaches the bucket only through presigned URLs.
The operator's public key (``--operator-key``, env ``FL_OPERATOR_KEY``, given
with the token) certifies every member's identity; a secure device checks each
peer's certificate against it and refuses a cohort with an uncertified peer.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from edge_client import defaults as d
from fedcore.device.machine import DEVICE_MIN_SURVIVORS
from fedcore.errors import FedError

if TYPE_CHECKING:
    from edge_client.device import DevicePrivacy


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint-url",
        default=os.environ.get("S3_ENDPOINT_URL") or None,
        help="S3 API endpoint (env S3_ENDPOINT_URL; omit for AWS)",
    )
    p.add_argument("--bucket", default=os.environ.get("BUCKET"), help="bucket name (env BUCKET)")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None, help="MNIST cache dir (env FL_DATA_DIR)")
    p.add_argument("--idx-dir", type=Path, default=None, help="use these MNIST IDX files instead")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ
    ap = argparse.ArgumentParser(
        prog="python -m edge_client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="participate in federated training")
    _common(run)
    _data_args(run)
    run.add_argument(
        "--client-id", default=env.get("CLIENT_ID"), help="this device's id (env CLIENT_ID)"
    )
    run.add_argument(
        "--num-shards",
        type=int,
        default=int(env.get("NUM_SHARDS", "10")),
        help="how many devices the training set is split among",
    )
    run.add_argument(
        "--shard", type=int, default=int(env.get("SHARD", "0")), help="this device's shard index"
    )
    run.add_argument(
        "--partition",
        choices=["iid", "dirichlet", "shards"],
        default=env.get("PARTITION", d.PARTITION),
    )
    run.add_argument(
        "--alpha", type=float, default=d.DIRICHLET_ALPHA, help="Dirichlet concentration"
    )
    run.add_argument("--partition-seed", type=int, default=0)
    run.add_argument(
        "--max-samples", type=int, default=0, help="use at most this many examples (0: all)"
    )
    run.add_argument("--epochs", type=int, default=d.DEVICE_TRAINING.epochs)
    run.add_argument("--batch-size", type=int, default=d.DEVICE_TRAINING.batch_size)
    run.add_argument("--lr", type=float, default=d.DEVICE_TRAINING.lr)
    run.add_argument(
        "--momentum", type=float, default=d.DEVICE_TRAINING.momentum, help="SGD's (0 for Adam)"
    )
    run.add_argument(
        "--optimizer",
        choices=d.OPTIMIZERS,
        default=None,
        help=f"local optimizer (default {d.DEVICE_TRAINING.optimizer}; sgd under --dp-epsilon)",
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--max-grad-norm",
        type=float,
        default=0.0,
        help="clip each local step's gradient norm (0: off; not DP, a guard against divergence)",
    )
    run.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    run.add_argument(
        "--max-rounds", type=int, default=0, help="stop after this many participations (0: none)"
    )
    run.add_argument(
        "--until-version", type=int, default=0, help="stop once the global version reaches this"
    )
    run.add_argument("--poll-s", type=float, default=d.POLL_S)
    run.add_argument("--cohort-timeout-s", type=float, default=d.COHORT_TIMEOUT_S)
    run.add_argument(
        "--min-survivors",
        type=int,
        default=DEVICE_MIN_SURVIVORS,
        help="refuse secure cohorts that may complete with fewer inputs than this (default "
        f"{DEVICE_MIN_SURVIVORS}; with 2, the sum shows each member the other's update)",
    )
    run.add_argument(
        "--plaintext",
        action="store_true",
        help="join plaintext cohorts (debugging/measurement only; the server must run plaintext too)",
    )
    run.add_argument(
        "--gateway",
        default=env.get("FL_GATEWAY_URL") or None,
        help="device gateway URL: no AWS credentials, presigned URLs only (env FL_GATEWAY_URL)",
    )
    run.add_argument(
        "--enroll-token",
        default=env.get("FL_ENROLL_TOKEN") or None,
        help="operator-issued enrollment token, needed on the first run with --gateway",
    )
    run.add_argument(
        "--operator-key",
        default=env.get("FL_OPERATOR_KEY") or None,
        help="the operator's Ed25519 public key (base64, given with the enrollment token; env "
        "FL_OPERATOR_KEY): peers' identity certificates are checked against it. Required "
        "with --gateway in secure mode; without it a direct-S3 device trusts the identities "
        "the function pins (debugging only)",
    )
    run.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the device keeps its identity key (default $FL_STATE_DIR/<client id>)",
    )
    run.add_argument(
        "--drop-prob",
        type=float,
        default=0.0,
        help="chance per cohort of vanishing (dropout experiments)",
    )
    run.add_argument(
        "--drop-at",
        choices=["keys", "shares", "inputs"],
        default=d.DROP_AT,
        help="where to vanish: before advertising keys, after sharing them, after uploading",
    )

    dp = run.add_argument_group("differential privacy")
    dp.add_argument(
        "--dp-epsilon",
        type=float,
        default=0.0,
        help="sample-level DP-SGD: this device's total epsilon budget (0: off)",
    )
    dp.add_argument("--dp-delta", type=float, default=d.DP_DELTA)
    dp.add_argument(
        "--dp-max-grad-norm", type=float, default=d.DP_MAX_GRAD_NORM, help="per-sample clip"
    )
    dp.add_argument(
        "--dp-planned-rounds",
        type=int,
        default=d.DP_PLANNED_ROUNDS,
        help="participations the DP-SGD noise is calibrated for (then the budget is spent)",
    )
    dp.add_argument("--dp-mode", choices=["ghost", "hooks"], default="ghost")
    dp.add_argument(
        "--reset-privacy-ledger",
        action="store_true",
        help="start privacy accounting over: the budget is fixed at first use, and only this "
        "lets a larger one in (the old ledger is kept beside the new one)",
    )
    run.add_argument(
        "--activation",
        choices=["relu", "tanh"],
        default=None,
        help="SimpleCNN nonlinearity (default: tanh with --dp-epsilon, which DP-SGD trains "
        "better with, else relu); every device of a deployment must use the same",
    )
    dp.add_argument(
        "--dp-user-noise",
        type=float,
        default=0.0,
        help="user-level DP: join only cohorts with at least this noise multiplier (0: off)",
    )
    dp.add_argument(
        "--dp-user-clip",
        type=float,
        default=d.DEVICE_MAX_USER_CLIP,
        help="user-level DP: join only cohorts whose clip is at most this",
    )
    dp.add_argument(
        "--dp-user-epsilon",
        type=float,
        default=d.DP_USER_EPSILON,
        help="user-level DP: stop joining before this device's releases exceed this epsilon",
    )
    dp.add_argument(
        "--dp-user-checkin-p",
        type=float,
        default=d.DP_USER_CHECKIN_P,
        help="user-level DP random check-in: the chance per cohort that this device's update "
        "(else zeros) goes into the masked sum, drawn from the OS CSPRNG; below 1 the device "
        "books the amplified epsilon (1: always, unamplified)",
    )

    ev = sub.add_parser("evaluate", help="test accuracy of a global version")
    _common(ev)
    _data_args(ev)
    ev.add_argument("--version", type=int, default=None, help="default: the newest")
    ev.add_argument("--threads", type=int, default=2)
    ev.add_argument(
        "--activation",
        choices=["relu", "tanh"],
        default=d.activation(dp_sgd=False),
        help="the nonlinearity the devices trained with (tanh for sample-level DP runs)",
    )

    ident = sub.add_parser("identity", help="print this device's identity key (base64)")
    ident.add_argument("--client-id", default=env.get("CLIENT_ID"), help="env CLIENT_ID")
    ident.add_argument("--state-dir", type=Path, default=None, help="see run --state-dir")

    st = sub.add_parser("status", help="versions and open cohorts")
    _common(st)
    st.add_argument("--watch", type=float, default=0.0, help="refresh every N seconds")
    st.add_argument("--versions", type=int, default=10)
    st.add_argument("--cohorts", type=int, default=10)
    args = ap.parse_args(argv)
    if args.command == "identity":
        if not args.client_id:
            ap.error("no client id: pass --client-id or set CLIENT_ID")
        return args
    if not args.bucket and not getattr(args, "gateway", None):
        ap.error("no bucket: pass --bucket or set BUCKET (or --gateway for run)")
    if args.command == "run":
        if not args.client_id:
            ap.error("no client id: pass --client-id or set CLIENT_ID")
        if not 0 <= args.shard < args.num_shards:
            ap.error(f"--shard must be in [0, {args.num_shards})")
        if args.min_survivors < 2:
            ap.error("--min-survivors must be at least 2 (one input is that member's update)")
        local_optimizer_name(args)  # a usage error before the device enrolls or reads anything
        if args.gateway and not args.plaintext and not args.operator_key:
            ap.error("secure mode through the gateway needs --operator-key (env FL_OPERATOR_KEY)")
    return args


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from edge_client.data import load_mnist, partition
    from edge_client.device import Device, LoopSettings, log_to_terminal, say
    from edge_client.identity import default_state_dir, load_or_create_signing_key
    from edge_client.train import TrainSettings
    from fedcore.participant import Participant
    from fedcore.storage import ObjectStore, S3Store

    log_to_terminal()  # the device's lines: [HH:MM:SS] client-id: text, on stderr
    torch.set_num_threads(args.threads)
    mnist = load_mnist(
        cache_dir=args.data_dir, idx_dir=args.idx_dir, progress=lambda m: say(args.client_id, m)
    )
    idx = partition(
        mnist.train_y, args.num_shards, args.partition, seed=args.partition_seed, alpha=args.alpha
    )[args.shard]
    if args.max_samples:
        idx = idx[: args.max_samples]
    say(
        args.client_id,
        f"shard {args.shard}/{args.num_shards} ({args.partition}): {len(idx)} examples",
    )
    state_dir = args.state_dir or default_state_dir(args.client_id)
    store: ObjectStore
    if args.gateway:
        from edge_client.gateway_store import GatewayStore

        signing_key = load_or_create_signing_key(state_dir)
        store = GatewayStore(args.gateway, args.client_id, signing_key)
        if args.enroll_token and store.enroll(args.enroll_token):
            say(args.client_id, f"enrolled through the gateway (key in {state_dir})")
        say(args.client_id, f"using the gateway {args.gateway}; no bucket credentials")
    else:
        store = S3Store.connect(args.bucket, args.endpoint_url, role="device")
    if args.plaintext:
        # Plaintext updates are signed too: the function checks them against the key the
        # cohort config pins, so the device enrolls as in secure mode.
        participant = Participant(
            store, args.client_id, mode="plaintext",
            signing_key=load_or_create_signing_key(state_dir),
        )  # fmt: skip
        if not args.gateway and participant.enroll():
            say(args.client_id, f"enrolled identity (key in {state_dir})")
    else:
        from fedcore.operator import parse_public

        operator = parse_public(args.operator_key) if args.operator_key else None
        if operator is None:
            say(args.client_id, "no --operator-key: trusting the identities the function pins")
        participant = Participant(
            store, args.client_id, mode="secagg", signing_key=load_or_create_signing_key(state_dir),
            operator_key=operator,
        )  # fmt: skip
        if not args.gateway and participant.enroll():  # the gateway enrolled it already
            say(args.client_id, f"enrolled identity (key in {state_dir})")
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        say(args.client_id, "stopping after the current step (Ctrl-C again to abort now)")
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    device = Device(
        participant,
        mnist.train_x[idx],
        mnist.train_y[idx],
        TrainSettings(
            args.epochs,
            args.batch_size,
            args.lr,
            args.momentum,
            args.seed,
            args.max_grad_norm,
            activation=args.activation or d.activation(dp_sgd=args.dp_epsilon > 0),
            optimizer=local_optimizer_name(args),
        ),
        LoopSettings(
            max_rounds=args.max_rounds,
            until_version=args.until_version,
            poll_s=args.poll_s,
            cohort_timeout_s=args.cohort_timeout_s,
            drop_prob=args.drop_prob,
            drop_at=args.drop_at,
            min_survivors=args.min_survivors,
        ),
        stop=stop,
        privacy=device_privacy(args, state_dir),
    )
    rounds = device.run()
    say(args.client_id, f"finished after {rounds} participation(s)")
    return 0


def local_optimizer_name(args: argparse.Namespace) -> str:
    """The optimizer a ``run`` trains with (``defaults.optimizer_name``)."""
    try:
        return d.optimizer_name(dp_sgd=args.dp_epsilon > 0, asked=args.optimizer)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def device_privacy(args: argparse.Namespace, state_dir: Path) -> DevicePrivacy | None:
    from edge_client.device import DevicePrivacy, UserDPRequirement, say
    from edge_client.privacy import PrivacyState, SampleDPSettings

    if args.reset_privacy_ledger and (kept := PrivacyState.reset(state_dir)):
        say(args.client_id, f"privacy ledger reset on request; the old one is kept at {kept}")
    sample = (
        SampleDPSettings(
            target_epsilon=args.dp_epsilon,
            delta=args.dp_delta,
            max_grad_norm=args.dp_max_grad_norm,
            planned_rounds=args.dp_planned_rounds,
            grad_sample_mode=args.dp_mode,
        )
        if args.dp_epsilon > 0
        else None
    )
    user = None
    if args.dp_user_noise > 0:
        if args.plaintext:
            raise SystemExit("user-level DP noise hides under the masks: drop --plaintext")
        if not 0 < args.dp_user_checkin_p <= 1:
            raise SystemExit("--dp-user-checkin-p is a probability in (0, 1]")
        user = UserDPRequirement(
            target_epsilon=args.dp_user_epsilon,
            delta=args.dp_delta,
            min_noise=args.dp_user_noise,
            max_clip=args.dp_user_clip,
            checkin_p=args.dp_user_checkin_p,
        )
    if sample is None and user is None:
        return None
    return DevicePrivacy(state_dir, sample, user)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from edge_client.data import load_mnist
    from edge_client.model import build
    from edge_client.train import evaluate
    from fedcore.storage import S3Store
    from fedcore.versions import find_head, load_model

    torch.set_num_threads(args.threads)
    store = S3Store.connect(args.bucket, args.endpoint_url)
    version = find_head(store) if args.version is None else args.version
    params, meta, _ = load_model(store, version)
    mnist = load_mnist(
        cache_dir=args.data_dir, idx_dir=args.idx_dir, progress=lambda m: print(m, file=sys.stderr)
    )
    acc, loss = evaluate(build(params, activation=args.activation), mnist.test_x, mnist.test_y)
    print(
        f"version {version}: test accuracy {acc:.4f}, loss {loss:.4f} "
        f"on {len(mnist.test_y)} images (cohorts {meta.cohorts or '-'})"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from fedcore.status import describe
    from fedcore.storage import S3Store

    store = S3Store.connect(args.bucket, args.endpoint_url)
    while True:
        view = describe(store, versions=args.versions, cohorts=args.cohorts)
        lines = [
            f"bucket {args.bucket}: head version {view.head_version} (pointer {view.pointer_version})"
        ]
        for v in reversed(view.versions):
            made = (
                time.strftime("%H:%M:%S", time.localtime(v["created_at"]))
                if v["created_at"]
                else "-"
            )
            lines.append(
                f"  v{v['version']:<5} parent {v['parent']!s:<5} cohorts {','.join(v['cohorts']) or '-':<12}"
                f" staleness {v['staleness']:<3} members {v['members']:<4} {made}"
            )
        lines.append("cohorts (newest last):")
        for c in view.cohorts:
            outcome = (
                f"{c.outcome} v{c.version}" if c.outcome == "applied" else (c.outcome or "open")
            )
            lines.append(
                f"  {c.cohort_id} base v{c.base_version} members {c.members} uploads {c.uploads} "
                f"phases [{','.join(c.phases)}] {outcome}"
            )
        if args.watch:
            print("\033[2J\033[H", end="")
        print("\n".join(lines), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def cmd_identity(args: argparse.Namespace) -> int:
    from edge_client.identity import default_state_dir, load_or_create_signing_key
    from fedcore.secagg import crypto

    key = load_or_create_signing_key(args.state_dir or default_state_dir(args.client_id))
    print(crypto.b64(crypto.ed25519_public(key)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return {
            "run": cmd_run, "evaluate": cmd_evaluate, "status": cmd_status,
            "identity": cmd_identity,
        }[args.command](args)  # fmt: skip
    except KeyboardInterrupt:
        print("interrupted; nothing partial was written", file=sys.stderr)
        return 130
    except FedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
