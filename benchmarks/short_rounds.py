"""Which local optimizer learns most when a round allows only tens of steps.

The setting of ``make demo ARGS='--clients 4 --cohort-size 2 --versions 3
--round-deadline-s 10'`` (issue 16's acceptance), replayed in one process without a
bucket so that only the optimizer differs: four devices with IID shards of 15,000
MNIST images; cohort 1 (devices 0, 1) and cohort 2 (devices 2, 3) both train from
v0; v1 applies cohort 1's mean delta, v2 applies cohort 2's on top with the default
staleness weight (inverse_sqrt: 1/sqrt(2)), and cohort 3 (devices 1, 2) trains
from v2 to make v3. Each device runs ``steps`` steps of batch 32 on fresh samples of
its shard (a time-boxed participation: about 60 steps idle and 30-40 with four
CPU burners on the 2-core machine, from the demo's device logs), with the device's
own training code (``edge_client.train.train_local``). Test accuracy of v1, v2, v3
on the 10,000 test images, for several seeds.

Run: ``.venv/bin/python -m benchmarks.short_rounds`` (a few minutes); writes
``benchmarks/results/short_rounds.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results" / "short_rounds.json"
CANDIDATES = [
    {"optimizer": "adam", "lr": 0.002, "momentum": 0.0},
    {"optimizer": "adam", "lr": 0.001, "momentum": 0.0},
    {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},  # the default until 2026-12-01
]
SHARD = 15_000  # 60,000 images over the demo's 4 devices
BATCH = 32


def replay(
    candidate: dict[str, Any], steps: int, seed: int, mnist: Any, v0: dict[str, np.ndarray]
) -> list[float]:
    """Accuracy of v1, v2, v3 in the 4-device demo's schedule."""
    from edge_client.model import build, to_numpy
    from edge_client.train import TrainSettings, evaluate, train_local
    from fedcore.server.apply import staleness_weight

    rng = np.random.default_rng(seed)

    def cohort(base: dict[str, np.ndarray], devices: tuple[int, int]) -> dict[str, np.ndarray]:
        deltas = []
        for dev in devices:
            idx = rng.choice(np.arange(dev * SHARD, (dev + 1) * SHARD), steps * BATCH, False)
            model = build(base)
            settings = TrainSettings(epochs=1, batch_size=BATCH, seed=seed + dev, **candidate)
            train_local(model, mnist.train_x[idx], mnist.train_y[idx], settings)
            deltas.append({k: v - base[k] for k, v in to_numpy(model).items()})
        return {k: np.mean([d[k] for d in deltas], axis=0) for k in base}

    def accuracy(params: dict[str, np.ndarray]) -> float:
        return evaluate(build(params), mnist.test_x, mnist.test_y)[0]

    d1, d2 = cohort(v0, (0, 1)), cohort(v0, (2, 3))
    v1 = {k: v0[k] + d1[k] for k in v0}
    v2 = {k: v1[k] + staleness_weight(1) * d2[k] for k in v0}
    d3 = cohort(v2, (1, 2))
    v3 = {k: v2[k] + d3[k] for k in v0}
    return [accuracy(v1), accuracy(v2), accuracy(v3)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.short_rounds", description=__doc__)
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 35, 60])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import torch

    from edge_client.data import load_mnist
    from fedcore.modelspec import init_params

    torch.set_num_threads(1)
    mnist, v0 = load_mnist(), init_params(seed=0)
    rows = []
    started = time.time()
    for steps in args.steps:
        for cand in CANDIDATES:
            runs = [replay(cand, steps, seed, mnist, v0) for seed in range(args.seeds)]
            v3 = [r[2] for r in runs]
            row = {**cand, "steps": steps, "runs": runs, "v3_mean": statistics.mean(v3)}
            row["v3_min"] = min(v3)
            rows.append(row)
            print(
                f"{steps:3d} steps  {cand['optimizer']:4s} lr {cand['lr']:<6g} "
                f"v3 mean {row['v3_mean']:.4f} min {row['v3_min']:.4f}  "
                f"({time.time() - started:.0f}s)",
                flush=True,
            )
    doc = {
        "benchmark": "short_rounds",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "settings": {"shard": SHARD, "batch": BATCH, "seeds": args.seeds, "devices": 4},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
