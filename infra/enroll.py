"""``python -m infra.enroll issue --client ID``: an operator issues an enrollment token.

Run with operator credentials (the device never has them). The bucket keeps
only the token's SHA-256 (write-once, with its expiry); the token itself is
printed once, to be handed to the device out of band (``--enroll-token``).
"""

from __future__ import annotations

import argparse
import os
import sys

from fedcore.gateway import MAX_TOKEN_TTL_S, issue_token
from fedcore.storage import S3Store


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infra.enroll", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    issue = sub.add_parser("issue", help="issue a single-use enrollment token for one client id")
    issue.add_argument("--client", required=True, help="the device's client id")
    issue.add_argument(
        "--ttl-h",
        type=float,
        default=24.0,
        help=f"hours until the token expires (at most {MAX_TOKEN_TTL_S // 3600})",
    )
    issue.add_argument(
        "--endpoint-url",
        default=os.environ.get("S3_ENDPOINT_URL") or None,
        help="S3 API endpoint (env S3_ENDPOINT_URL; omit for AWS)",
    )
    issue.add_argument("--bucket", default=os.environ.get("BUCKET"), help="bucket (env BUCKET)")
    args = ap.parse_args(argv)
    if not args.bucket:
        ap.error("no bucket: pass --bucket or set BUCKET")
    store = S3Store.connect(args.bucket, args.endpoint_url)
    try:
        token = issue_token(store, args.client, ttl_s=args.ttl_h * 3600)
    except ValueError as exc:
        ap.error(str(exc))
    print(token)
    print(
        f"token for {args.client}, valid {args.ttl_h:g} h, single use", file=sys.stderr, flush=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
