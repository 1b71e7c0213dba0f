"""Seed version 0 of the global model into a bucket (AWS, MinIO, SeaweedFS...).

``python -m infra.bootstrap --bucket NAME [--endpoint-url URL]``; idempotent:
a bucket that already has a pointer is left alone. Runs with whatever AWS
credentials boto3 finds, and needs no torch (the initial weights come from
``fedcore.modelspec``).
"""

from __future__ import annotations

import argparse
import sys

from fedcore.modelspec import DEFAULT_MODEL, MODELS, num_parameters
from fedcore.storage import S3Store
from infra.stack import seed_bucket


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.bootstrap", description=__doc__)
    p.add_argument("--bucket", required=True)
    p.add_argument("--endpoint-url", default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    p.add_argument(
        "--model",
        choices=sorted(MODELS),
        default=DEFAULT_MODEL,
        help="the model to train: simple_cnn (1.2M parameters, the default) or dp_cnn "
        "(26k, GroupNorm and tanh: for sample-level DP-SGD); fixed by version 0",
    )
    args = p.parse_args(argv)
    store = S3Store.connect(args.bucket, args.endpoint_url)
    if seed_bucket(store, model_seed=args.seed, model=args.model):
        size = num_parameters(MODELS[args.model])
        print(f"seeded s3://{args.bucket}/global/v00000000: {args.model}, {size:,} parameters")
    else:
        print(f"s3://{args.bucket} already has a global model; left unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
