"""``python -m infra.enroll``: the operator enrolls devices (tokens and identity certificates).

Run on the operator's machine, with operator credentials (the device never has
them). The operator's Ed25519 signing key lives in a local file
(``--operator-dir``, env ``FL_OPERATOR_DIR``, default ``~/.config/s3fl/operator``),
created on first use; it is never uploaded to the bucket, the template or a
function. Devices are given its public key (``operator-key`` prints it) with
their token, and check every peer's certificate against it.

Subcommands:
  operator-key  create the operator key if needed; print its public key
  issue         a single-use enrollment token for one client id; with
                ``--public-key`` (the device's identity key, which the device prints
                or the operator generated with it) also certify that key and bind
                the token to it, so the gateway enrolls no other key under it
  certify       certify an identity key for a client id (write-once)

The bucket keeps only the token's SHA-256 (write-once, with its expiry); the
token itself is printed once, to be handed to the device out of band
(``--enroll-token``), together with the operator's public key
(``--operator-key``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedcore.errors import FedError
from fedcore.gateway import MAX_TOKEN_TTL_S, issue_token
from fedcore.operator import (
    certify,
    default_operator_dir,
    load_or_create_operator_key,
    public_text,
)
from fedcore.secagg import crypto
from fedcore.storage import S3Store


def _bucket_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint-url",
        default=os.environ.get("S3_ENDPOINT_URL") or None,
        help="S3 API endpoint (env S3_ENDPOINT_URL; omit for AWS)",
    )
    p.add_argument("--bucket", default=os.environ.get("BUCKET"), help="bucket (env BUCKET)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m infra.enroll",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--operator-dir",
        type=Path,
        default=None,
        help="where the operator's signing key lives (env FL_OPERATOR_DIR)",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("operator-key", help="print the operator's public key (creating the key)")
    issue = sub.add_parser("issue", help="issue a single-use enrollment token for one client id")
    issue.add_argument("--client", required=True, help="the device's client id")
    issue.add_argument(
        "--public-key",
        default=None,
        help="the device's Ed25519 identity key (base64): certify it and bind the token to it",
    )
    issue.add_argument(
        "--ttl-h",
        type=float,
        default=24.0,
        help=f"hours until the token expires (at most {MAX_TOKEN_TTL_S // 3600})",
    )
    _bucket_args(issue)
    cert = sub.add_parser("certify", help="certify a device's identity key (write-once)")
    cert.add_argument("--client", required=True, help="the device's client id")
    cert.add_argument("--public-key", required=True, help="its Ed25519 identity key (base64)")
    _bucket_args(cert)
    args = ap.parse_args(argv)
    operator_sk = load_or_create_operator_key(args.operator_dir or default_operator_dir())
    if args.command == "operator-key":
        print(public_text(operator_sk))
        return 0
    if not args.bucket:
        ap.error("no bucket: pass --bucket or set BUCKET")
    store = S3Store.connect(args.bucket, args.endpoint_url)
    try:
        public = (
            None
            if args.public_key is None
            else crypto.unb64(args.public_key, what="--public-key", size=32)
        )
        if public is not None:
            key = certify(store, operator_sk, args.client, public)
            print(f"certified {args.client}: {key}", file=sys.stderr, flush=True)
        if args.command == "certify":
            return 0
        token = issue_token(store, args.client, ttl_s=args.ttl_h * 3600, public_key=public)
    except (ValueError, FedError) as exc:
        ap.error(str(exc))
    print(token)
    print(
        f"token for {args.client}, valid {args.ttl_h:g} h, single use; give the device the "
        f"operator key too: --operator-key {public_text(operator_sk)}",
        file=sys.stderr,
        flush=True,
    )
    if public is None:
        print(
            "no --public-key: peers refuse this device until its key is certified "
            "(python -m infra.enroll certify)",
            file=sys.stderr,
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
