"""Accuracy and cost of differential privacy on MNIST with the SimpleCNN.

Three measurements, written to ``benchmarks/results/dp.json``:

1. **DP-SGD cost**: one local epoch (600 examples, B=10 as in the secure-
   aggregation benchmark, and 6,000 examples at the federated batch size)
   without privacy, with Opacus' fast gradient clipping ("ghost") and with
   per-sample hooks, in the same process, as ratios to the non-private epoch.
2. **Sample-level DP, federated**: 10 devices (IID shards of 6,000), every
   device in every round, each running DP-SGD with the device code
   (``edge_client.privacy``: calibration, budget, Opacus), FedAvg of their
   deltas; for target epsilon 1, 3 and 8 (delta 1e-5) spent over ``rounds``
   participations. Test accuracy on the 10,000 test images after each round,
   with the epsilon spent so far (the same for every device).
3. **User-level distributed DP**: ``users`` simulated devices (small IID
   shards), all in one cohort per round; each trains one plain epoch, clips
   its delta, quantizes and adds its Skellam share with the product's code
   (``DistributedDP.privatize``), the sum is decoded with the function's code
   (``decode_sum``), and the release is accounted (``release``; composed over
   rounds). The pairwise masks are left out because they cancel exactly in
   the sum (the integration tests check that bit for bit); the noise, clip,
   quantization and accounting are the real ones.

Rounds run in-process (no bucket) so the three epsilons fit in minutes; the
full path through S3 and secure aggregation is ``make demo ARGS='--dp-epsilon 3'``.

Run: ``.venv/bin/python -m benchmarks.dp`` (about 25 minutes on 2 cores);
``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results" / "dp.json"
REFERENCES = {
    "opacus_mnist_example": [
        {"epsilon": 3.01, "accuracy": 0.9678},
        {"epsilon": 1.19, "accuracy": 0.9463},
    ],
    "tramer_boneh_2021_end_to_end_cnn": [{"epsilon": 3.0, "accuracy": 0.981}],
}


def _torch_setup() -> None:
    import torch

    torch.set_num_threads(1)


# ------------------------------------------------------------------------- 1. cost
def epoch_costs(repeats: int = 3) -> dict[str, Any]:
    from edge_client.data import load_mnist
    from edge_client.model import build
    from edge_client.privacy import train_local_dp
    from edge_client.train import TrainSettings, train_local
    from fedcore.modelspec import init_params

    _torch_setup()
    mnist = load_mnist()
    out: dict[str, Any] = {}
    for n, batch in ((600, 10), (6000, 64)):
        x, y = mnist.train_x[:n], mnist.train_y[:n]
        settings = TrainSettings(epochs=1, batch_size=batch, lr=0.05, momentum=0.0)

        def plain() -> None:
            train_local(build(init_params(seed=0)), x, y, settings)  # noqa: B023

        def private(mode: str) -> None:
            train_local_dp(
                build(init_params(seed=0)), x, y, settings,  # noqa: B023
                noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode,
            )  # fmt: skip

        timings: dict[str, float] = {}
        for name, fn in (
            ("plain", plain),
            ("ghost", lambda: private("ghost")),
            ("hooks", lambda: private("hooks")),
        ):
            fn()  # warm-up
            runs = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - t)
            timings[name] = float(np.median(runs))
        out[f"{n}_examples_B{batch}"] = {
            "epoch_s": timings,
            "ghost_vs_plain": timings["ghost"] / timings["plain"],
            "hooks_vs_plain": timings["hooks"] / timings["plain"],
        }
        print(
            f"epoch of {n} examples, B={batch}: plain {timings['plain']:.2f}s, ghost "
            f"{timings['ghost']:.2f}s ({timings['ghost'] / timings['plain']:.2f}x), hooks "
            f"{timings['hooks']:.2f}s ({timings['hooks'] / timings['plain']:.2f}x)",
            flush=True,
        )
    return out


# ------------------------------------------------------------------------- 2. sample level
def _device_round(job: dict[str, Any]) -> tuple[dict[str, np.ndarray], float, int]:
    """One device's DP-SGD participation, in a worker process; returns its delta."""
    from edge_client.data import load_mnist
    from edge_client.model import build, to_numpy
    from edge_client.privacy import train_local_dp
    from edge_client.train import TrainSettings

    _torch_setup()
    mnist = load_mnist()
    idx = job["idx"]
    model = build(job["params"])
    settings = TrainSettings(
        epochs=job["epochs"], batch_size=job["batch"], lr=job["lr"], momentum=0.0, seed=job["seed"]
    )
    res = train_local_dp(
        model, mnist.train_x[idx], mnist.train_y[idx], settings,
        noise_multiplier=job["sigma"], max_grad_norm=job["clip"], grad_sample_mode="ghost",
    )  # fmt: skip
    new = to_numpy(model)
    return {k: new[k] - job["params"][k] for k in new}, res.loss, res.steps


def sample_level(
    epsilons: list[float], *, rounds: int, clients: int, epochs: int, batch: int, lr: float
) -> list[dict[str, Any]]:
    from edge_client.data import load_mnist, partition
    from edge_client.model import build
    from edge_client.privacy import calibrate_noise
    from edge_client.train import evaluate
    from fedcore.dp import rdp
    from fedcore.modelspec import init_params

    _torch_setup()
    mnist = load_mnist()
    shards = partition(mnist.train_y, clients, "iid", seed=0)
    out = []
    with ProcessPoolExecutor(max_workers=2) as pool:
        for target in epsilons:
            n = len(shards[0])
            q = batch / n
            steps = epochs * math.ceil(n / batch)
            sigma = calibrate_noise(target, 1e-5, q, steps * rounds)
            params = init_params(seed=0)
            curve = []
            t0 = time.perf_counter()
            for r in range(1, rounds + 1):
                jobs = [
                    {"idx": shards[c], "params": params, "epochs": epochs, "batch": batch,
                     "lr": lr, "seed": 1000 * r + c, "sigma": sigma, "clip": 1.0}
                    for c in range(clients)
                ]  # fmt: skip
                results = list(pool.map(_device_round, jobs))
                params = {
                    k: params[k] + np.mean([d[k] for d, _, _ in results], axis=0).astype(np.float32)
                    for k in params
                }
                spent = rdp.epsilon(
                    rdp.ORDERS, rdp.sampled_gaussian(q=q, sigma=sigma, steps=steps * r), 1e-5
                )[0]
                acc, _ = evaluate(build(params), mnist.test_x, mnist.test_y)
                curve.append({"round": r, "epsilon": spent, "test_accuracy": acc})
                print(
                    f"sample-level target eps {target}: round {r} eps {spent:.2f} acc {acc:.4f} "
                    f"({time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
            out.append(
                {
                    "target_epsilon": target,
                    "delta": 1e-5,
                    "noise_multiplier": sigma,
                    "sampling_rate": q,
                    "steps_per_round": steps,
                    "final_test_accuracy": curve[-1]["test_accuracy"],
                    "final_epsilon": curve[-1]["epsilon"],
                    "curve": curve,
                    "wall_s": time.perf_counter() - t0,
                }
            )
    return out


# ------------------------------------------------------------------------- 3. user level
def _plain_round(job: dict[str, Any]) -> list[np.ndarray]:
    """Several simulated users' plain local training, flattened deltas (sorted names)."""
    from edge_client.data import load_mnist
    from edge_client.model import build, to_numpy
    from edge_client.train import TrainSettings, train_local
    from fedcore.secure_round import flatten_weighted

    _torch_setup()
    mnist = load_mnist()
    out = []
    for i, idx in enumerate(job["shards"]):
        model = build(job["params"])
        settings = TrainSettings(
            epochs=1, batch_size=job["batch"], lr=job["lr"], momentum=0.0, seed=job["seed"] + i
        )
        train_local(model, mnist.train_x[idx], mnist.train_y[idx], settings)
        new = to_numpy(model)
        # The device's own layout: parameters in sorted-name order (weight slot dropped).
        out.append(flatten_weighted({k: new[k] - job["params"][k] for k in new}, 1.0)[:-1])
    return out


def user_level(
    noises: list[float],
    *,
    users: int,
    rounds: int,
    clip: float,
    batch: int,
    lr: float,
    server_lr: float,
) -> list[dict[str, Any]]:
    from edge_client.data import load_mnist, partition
    from edge_client.model import build
    from edge_client.train import evaluate
    from fedcore.dp import rdp
    from fedcore.dp.distributed import DistributedDP, secure_generator
    from fedcore.modelspec import init_params
    from fedcore.server.secure import unflatten

    _torch_setup()
    mnist = load_mnist()
    shards = partition(mnist.train_y, users, "iid", seed=0)
    out = []
    with ProcessPoolExecutor(max_workers=2) as pool:
        for z in noises:
            params = init_params(seed=0)
            schema = {k: ("F32", v.shape) for k, v in params.items()}
            ledger = rdp.Ledger()
            curve = []
            t0 = time.perf_counter()
            for r in range(1, rounds + 1):
                half = users // 2
                jobs = [
                    {"shards": shards[a:b], "params": params, "batch": batch, "lr": lr, "seed": 7 * r + a}
                    for a, b in ((0, half), (half, users))
                ]  # fmt: skip
                deltas = [d for part in pool.map(_plain_round, jobs) for d in part]
                if z > 0:
                    dp = DistributedDP.for_cohort(
                        clip=clip, noise_multiplier=z, delta=1e-5, n=users,
                        min_survivors=math.ceil(0.9 * users),
                    )  # fmt: skip
                    rng = secure_generator()
                    total = np.zeros(deltas[0].size + 1, dtype=np.uint32)
                    for d in deltas:
                        codes, _ = dp.privatize(d, rng)
                        total += codes
                    mean = dp.decode_sum(total, users) / users
                    release = dp.release(users, deltas[0].size)
                    ledger = ledger.plus(release["rdp"])
                    eps = ledger.epsilon(1e-5)
                else:  # no noise: the same clipped mean, for reference
                    mean = np.mean([d * min(1.0, clip / np.linalg.norm(d)) for d in deltas], axis=0)
                    eps = math.inf
                step = unflatten(mean, schema)  # the function's decoding layout
                params = {k: (params[k] + server_lr * step[k]).astype(np.float32) for k in params}
                acc, _ = evaluate(build(params), mnist.test_x, mnist.test_y)
                curve.append({"round": r, "epsilon": eps, "test_accuracy": acc})
                print(
                    f"user-level z {z}: round {r} eps {eps:.2f} acc {acc:.4f} "
                    f"({time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
            out.append(
                {
                    "noise_multiplier": z,
                    "clip": clip,
                    "users_per_round": users,
                    "final_test_accuracy": curve[-1]["test_accuracy"],
                    "final_epsilon": curve[-1]["epsilon"],
                    "curve": curve,
                    "wall_s": time.perf_counter() - t0,
                }
            )
    return out


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for row in doc["sample_level"]:
        pts = [(p["epsilon"], p["test_accuracy"]) for p in row["curve"]]
        ax.plot(
            *zip(*pts, strict=True),
            marker="o",
            label=f"sample-level, target eps {row['target_epsilon']}",
        )
    for row in doc["user_level"]:
        pts = [
            (p["epsilon"], p["test_accuracy"]) for p in row["curve"] if math.isfinite(p["epsilon"])
        ]
        if pts:
            ax.plot(
                *zip(*pts, strict=True),
                marker="s",
                ls="--",
                label=f"user-level, z {row['noise_multiplier']}",
            )
    for ref in REFERENCES["opacus_mnist_example"] + REFERENCES["tramer_boneh_2021_end_to_end_cnn"]:
        ax.scatter([ref["epsilon"]], [ref["accuracy"]], marker="*", color="k")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon spent (delta 1e-5)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dp", description=__doc__)
    ap.add_argument("--epsilons", default="1,3,8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--user-noises", default="0,0.5,1,2")
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--user-rounds", type=int, default=10)
    ap.add_argument("--user-clip", type=float, default=0.5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: cost,sample,user")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if args.quick:
        args.epsilons, args.rounds, args.user_noises, args.user_rounds = "3", 1, "1", 1
    doc: dict[str, Any] = {
        "benchmark": "dp",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "config": vars(args) | {"out": str(args.out)},
        "references": REFERENCES,
        "targets": {"accuracy_at_epsilon_3": ">= 0.97", "ghost_vs_plain": "< 2.5"},
    }
    if args.out.exists():  # keep parts measured earlier when some are skipped
        old = json.loads(args.out.read_text())
        doc.update({k: old[k] for k in ("cost", "sample_level", "user_level") if k in old})
    if "cost" not in skip:
        doc["cost"] = epoch_costs()
    if "sample" not in skip:
        doc["sample_level"] = sample_level(
            [float(e) for e in args.epsilons.split(",")],
            rounds=args.rounds, clients=10, epochs=args.epochs, batch=args.batch, lr=args.lr,
        )  # fmt: skip
    if "user" not in skip:
        doc["user_level"] = user_level(
            [float(z) for z in args.user_noises.split(",")],
            users=args.users, rounds=args.user_rounds, clip=args.user_clip, batch=10,
            lr=0.05, server_lr=1.0,
        )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=str))
    if doc.get("sample_level") and doc.get("user_level"):
        plot(doc, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
