"""Accuracy and cost of differential privacy on MNIST.

Three measurements, written to ``benchmarks/results/dp.json``:

1. **DP-SGD cost** (SimpleCNN): one local epoch (600 examples at B=10 as in the
   secure-aggregation benchmark; 6,000 examples at B=64 and at B=256) without
   privacy, with Opacus' fast gradient clipping ("ghost") and with per-sample
   hooks (the smallest point), in the same process, interleaved, as ratios to
   the non-private epoch. Same model, nonlinearity and optimizer both ways.
2. **Sample-level DP, federated** (``sample_level``): 10 devices (IID shards of
   6,000), every device in every round, each running DP-SGD with the device code
   (``edge_client.privacy``: the loader's true rate and steps, PLD calibration
   for all rounds, Opacus ghost clipping) on ``--model`` (default the DP model,
   with its recipe ``edge_client.defaults.DP_CNN_SGD_TRAINING``), FedAvg of their
   deltas; for target epsilon 1, 3 and 8 (delta 1e-5). Test accuracy on the
   10,000 test images after each round, with the PLD epsilon spent so far and
   RDP's statement of the same runs.
3. **User-level distributed DP at scale** (``user_level``): ``--devices`` devices
   (IID shards of 60) in cohorts of ``--cohort-size``; each run ``z:p:k`` gives
   the noise multiplier, the random check-in probability and the cohorts each
   device joins. Members train plainly, draw their check-in coin, clip, quantize
   and add their Skellam share with the product's code, the function's checked
   decoding recovers the mean, and every member books what the device books.
   The pairwise masks are left out because they cancel exactly in the sum (the
   integration tests check that bit for bit).

Rounds run in-process (no bucket) so the runs fit in an hour; the full path
through S3 and secure aggregation is ``make demo ARGS='--model dp_cnn
--dp-epsilon 3'`` and ``benchmarks/scale.py --dp-user-noise``.

Run: ``.venv/bin/python -m benchmarks.dp`` (sample level about 55 minutes and
user level about 12 on 2 cores; ``--skip cost,user`` and the like run parts,
keeping the others' rows); ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import functools
import json
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


@functools.cache
def _mnist() -> Any:
    """MNIST, decoded once per process (a worker runs many jobs)."""
    from edge_client.data import load_mnist

    return load_mnist()


# ------------------------------------------------------------------------- 1. cost
# (examples, batch size, DP modes timed, timed repeats of each mode): B=256 first, the batch
# the sample-level runs below (and the DP demo) use; B=64; B=10 as in the secure-aggregation
# benchmark. Hooks only at the small point: it materialises every per-sample gradient
# (9.4x at 6,000 examples and B=64 in an earlier run), minutes per epoch on a shared machine.
COST_POINTS = (
    (6000, 256, ("ghost",), 2),
    (6000, 64, ("ghost",), 1),
    (600, 10, ("ghost", "hooks"), 3),
)


def epoch_costs(activation: str = "tanh") -> dict[str, Any]:
    from edge_client.data import load_mnist
    from edge_client.model import build
    from edge_client.privacy import train_local_dp
    from edge_client.train import TrainSettings, train_local
    from fedcore.modelspec import init_params

    _torch_setup()
    mnist = load_mnist()
    out: dict[str, Any] = {}
    warm = True
    for n, batch, modes, repeats in COST_POINTS:
        x, y = mnist.train_x[:n], mnist.train_y[:n]
        # The same model, nonlinearity and optimizer both ways: only DP-SGD differs.
        settings = TrainSettings(
            epochs=1, batch_size=batch, lr=0.05, momentum=0.0, activation=activation
        )

        def plain() -> None:
            train_local(build(init_params(seed=0)), x, y, settings)  # noqa: B023

        def private(mode: str) -> None:
            train_local_dp(
                build(init_params(seed=0)), x, y, settings,  # noqa: B023
                noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode,
            )  # fmt: skip

        fns = {"plain": plain} | {m: (lambda m=m: private(m)) for m in modes}
        if warm:  # first calls (imports, allocator) on a small slice, once
            warm = False
            train_local(build(init_params(seed=0)), x[:512], y[:512], settings)
            for mode in ("ghost", "hooks"):
                train_local_dp(
                    build(init_params(seed=0)), x[:512], y[:512], settings,
                    noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode,
                )  # fmt: skip
        runs: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):  # interleaved, so load from other work hits every mode alike
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                runs[name].append(time.perf_counter() - t)
        timings = {name: float(np.median(r)) for name, r in runs.items()}
        row: dict[str, Any] = {"epoch_s": timings, "runs_s": runs}
        row |= {f"{m}_vs_plain": timings[m] / timings["plain"] for m in modes}
        out[f"{n}_examples_B{batch}"] = row
        print(
            f"epoch of {n} examples, B={batch}: plain {timings['plain']:.2f}s, "
            + ", ".join(
                f"{m} {timings[m]:.2f}s ({timings[m] / timings['plain']:.2f}x)" for m in modes
            ),
            flush=True,
        )
    return out


# ------------------------------------------------------------------------- 2. sample level
def _device_round(job: dict[str, Any]) -> tuple[dict[str, np.ndarray], float, int]:
    """One device's DP-SGD participation, in a worker process; returns its delta.

    Every job's noise and Poisson sampling are keyed afresh from the OS CSPRNG inside
    ``train_local_dp``. Before that fix the noise came from torch's global generator,
    which every forked worker inherits in the same state: the k-th job of each worker
    added the same noise (correlation 1.00). ``results/dp*.json`` written before
    2026-12-01 come from such runs and understate what the code achieves.
    """
    from edge_client.model import build, to_numpy
    from edge_client.privacy import train_local_dp
    from edge_client.train import TrainSettings

    _torch_setup()
    mnist = _mnist()
    idx = job["idx"]
    model = build(job["params"])  # train_local_dp applies the activation
    settings = TrainSettings(
        epochs=job["epochs"], batch_size=job["batch"], lr=job["lr"], momentum=job["momentum"],
        seed=job["seed"], activation=job["activation"], optimizer="sgd",
    )  # fmt: skip
    res = train_local_dp(
        model, mnist.train_x[idx], mnist.train_y[idx], settings,
        noise_multiplier=job["sigma"], max_grad_norm=job["clip"], grad_sample_mode="ghost",
        sample_rate=job["q"],
    )  # fmt: skip
    new = to_numpy(model)
    return {k: new[k] - job["params"][k] for k in new}, res.loss, res.steps


def sample_level(
    epsilons: list[float],
    *,
    model: str,
    rounds: int,
    clients: int,
    epochs: int,
    batch: int,
    lr: float,
    momentum: float,
    clip: float,
    activation: str,
    workers: int,
) -> list[dict[str, Any]]:
    """The epsilons run side by side (threads), their devices' rounds in one process pool.

    Each device does what ``edge_client run --dp-epsilon`` does: the loader's true rate
    and steps (``steps_per_participation``), noise calibrated once for all ``rounds``
    participations with the PLD accountant (``DeviceLedger.plan_sample``), DP-SGD with
    Opacus; the server averages the deltas (FedAvg, server learning rate 1)."""
    from concurrent.futures import ThreadPoolExecutor

    from edge_client.data import load_mnist, partition
    from edge_client.model import build
    from edge_client.privacy import steps_per_participation
    from edge_client.train import TrainSettings, evaluate
    from fedcore.dp import pld, rdp
    from fedcore.modelspec import init_params, num_parameters, schema

    _torch_setup()
    mnist = load_mnist()
    shards = partition(mnist.train_y, clients, "iid", seed=0)
    spec = schema(model)

    def one(target: float, pool: ProcessPoolExecutor) -> dict[str, Any]:
        n = len(shards[0])
        q, steps = steps_per_participation(n, TrainSettings(epochs=epochs, batch_size=batch))
        sigma = pld.calibrate_noise(target_epsilon=target, delta=1e-5, q=q, steps=steps * rounds)
        params = init_params(spec, seed=0)
        curve = []
        t0 = time.perf_counter()
        for r in range(1, rounds + 1):
            jobs = [
                {"idx": shards[c], "params": params, "epochs": epochs, "batch": batch,
                 "lr": lr, "momentum": momentum, "seed": 1000 * r + c, "sigma": sigma,
                 "q": q, "clip": clip, "activation": activation}
                for c in range(clients)
            ]  # fmt: skip
            results = list(pool.map(_device_round, jobs))
            params = {
                k: params[k] + np.mean([d[k] for d, _, _ in results], axis=0).astype(np.float32)
                for k in params
            }
            spent = pld.epsilon(sigma=sigma, q=q, steps=steps * r, delta=1e-5)
            by_rdp = rdp.epsilon(
                rdp.ORDERS, rdp.sampled_gaussian(q=q, sigma=sigma, steps=steps * r), 1e-5
            )[0]
            acc, _ = evaluate(build(params, activation=activation), mnist.test_x, mnist.test_y)
            curve.append(
                {"round": r, "epsilon": spent, "epsilon_rdp": by_rdp, "test_accuracy": acc}
            )
            print(
                f"sample-level target eps {target}: round {r} eps {spent:.2f} (RDP {by_rdp:.2f}) "
                f"acc {acc:.4f} ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
        return {
            "epsilon": target,
            "delta": 1e-5,
            "accountant": "pld",
            "model": f"{model} ({num_parameters(spec):,} parameters)",
            "batch": batch,
            "rounds": rounds,
            "accuracy": curve[-1]["test_accuracy"],
            "devices": clients,
            "examples_per_device": n,
            "epochs_per_round": epochs,
            "lr": lr,
            "momentum": momentum,
            "noise_multiplier": sigma,
            "sampling_rate": q,
            "steps_per_round": steps,
            "clip": clip,
            "activation": activation,
            "final_epsilon": curve[-1]["epsilon"],
            "final_epsilon_rdp": curve[-1]["epsilon_rdp"],
            "curve": curve,
            "wall_s": time.perf_counter() - t0,
        }

    with (
        ProcessPoolExecutor(max_workers=workers) as pool,
        ThreadPoolExecutor(max_workers=len(epsilons)) as threads,
    ):
        return list(threads.map(lambda e: one(e, pool), epsilons))


# ------------------------------------------------------------------------- 3. user level
def _member_deltas(job: dict[str, Any]) -> list[np.ndarray]:
    """Several simulated members' plain local training: flattened deltas (sorted names)."""
    from edge_client.model import build, to_numpy
    from edge_client.train import TrainSettings, train_local
    from fedcore.secure_round import flatten_weighted

    _torch_setup()
    mnist = _mnist()
    out = []
    for i, idx in enumerate(job["shards"]):
        model = build(job["params"])
        settings = TrainSettings(
            epochs=job["epochs"], batch_size=job["batch"], lr=job["lr"], momentum=0.0,
            seed=job["seed"] + i, optimizer="sgd",
        )  # fmt: skip
        train_local(model, mnist.train_x[idx], mnist.train_y[idx], settings)
        new = to_numpy(model)
        # The device's own layout: parameters in sorted-name order (weight slot dropped).
        out.append(flatten_weighted({k: new[k] - job["params"][k] for k in new}, 1.0)[:-1])
    return out


def user_level(
    runs: list[tuple[float, float, int]],
    *,
    model: str,
    devices: int,
    cohort_size: int,
    clip: float,
    epochs: int,
    batch: int,
    lr: float,
    server_lr: float,
    workers: int,
) -> list[dict[str, Any]]:
    """User-level distributed DP at scale: ``devices`` devices (IID shards), cohorts of
    ``cohort_size``, each run ``(z, p, participations)``: Skellam noise multiplier z, random
    check-in probability p, and how many cohorts each device joins.

    Cohorts are consecutive blocks of a fresh random order of the devices per pass (the
    server's choice, public: no amplification is claimed from it). Each member trains
    plainly, draws its check-in coin (``draw_checkin``: tails sends zeros), clips,
    quantizes and adds its Skellam share (``DistributedDP.privatize``); the sum is decoded
    with the function's checks (``decode_checked``). Each member books what the device
    books (``EdgeDevice.user_dp_refusal``/``book_release``): the worst-case release RDP at
    the cohort's minimum, amplified at p (``booked_rate``, ``booked_rdp``). The
    pairwise masks are left out: they cancel exactly in the sum (the integration tests
    check that bit for bit); noise, clip, quantization, coins and accounting are real."""
    from edge_client.data import load_mnist, partition
    from edge_client.model import build
    from edge_client.train import evaluate
    from fedcore.dp import rdp
    from fedcore.dp.amplification import booked_rate, booked_rdp, draw_checkin
    from fedcore.dp.distributed import DistributedDP, secure_generator
    from fedcore.modelspec import init_params, num_parameters, schema
    from fedcore.server.secure import unflatten

    _torch_setup()
    mnist = load_mnist()
    shards = partition(mnist.train_y, devices, "iid", seed=0)
    spec = schema(model)
    dim = num_parameters(spec)
    out = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for z, p, participations in runs:
            dp = DistributedDP.for_cohort(
                clip=clip, noise_multiplier=z, delta=1e-5, n=cohort_size, min_survivors=cohort_size
            )
            rate = booked_rate(p, secure=True, distributed_dp=True)
            booked = booked_rdp(dp.worst_case_rdp(cohort_size, dim), rate)
            order_rng = np.random.default_rng(0)  # the server's (public) choice of members

            def spent(k: int, booked: list[float] = booked) -> float:
                if k == 0:  # in no release yet: nothing spent
                    return 0.0
                return rdp.epsilon(rdp.INTEGER_ORDERS, [k * b for b in booked], 1e-5)[0]

            joined = np.zeros(devices, dtype=np.int64)
            params = init_params(spec, seed=0)
            flat_schema = {k: ("F32", v.shape) for k, v in params.items()}
            curve = []
            t0 = time.perf_counter()
            cohorts = [
                block
                for _ in range(participations)
                for perm in [order_rng.permutation(devices)]
                for block in np.array_split(perm, devices // cohort_size)
            ]
            for version, members in enumerate(cohorts, start=1):
                halves = np.array_split(members, workers)
                jobs = [
                    {"shards": [shards[m] for m in part], "params": params, "epochs": epochs,
                     "batch": batch, "lr": lr, "seed": 7919 * version + int(part[0])}
                    for part in halves if len(part)
                ]  # fmt: skip
                deltas = [d for part in pool.map(_member_deltas, jobs) for d in part]
                rng = secure_generator()
                total = np.zeros(dim + 1, dtype=np.uint32)
                contributed = 0
                for d in deltas:
                    if not draw_checkin(rate):  # tails: zeros go in, clipped, noised alike
                        d = np.zeros_like(d)
                    else:
                        contributed += 1
                    total += dp.privatize(d, rng)[0]
                mean = dp.decode_checked(total, len(deltas))
                step = unflatten(mean, flat_schema)
                params = {k: (params[k] + server_lr * step[k]).astype(np.float32) for k in params}
                joined[members] += 1
                acc, _ = evaluate(build(params), mnist.test_x, mnist.test_y)
                eps_max, eps_median = spent(int(joined.max())), spent(int(np.median(joined)))
                curve.append(
                    {"version": version, "test_accuracy": acc, "contributed": contributed,
                     "max_device_epsilon": eps_max, "median_device_epsilon": eps_median}
                )  # fmt: skip
                print(
                    f"user-level z {z} p {p}: version {version}/{len(cohorts)} acc {acc:.4f} "
                    f"device eps max {eps_max:.2f} median {eps_median:.2f} "
                    f"({contributed} of {len(deltas)} contributed, "
                    f"{time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
            out.append(
                {
                    "devices": devices,
                    "cohort_size": cohort_size,
                    "mechanism": f"distributed Skellam (zero-out neighbours), random check-ins p={p}",
                    "max_device_epsilon": curve[-1]["max_device_epsilon"],
                    "median_device_epsilon": curve[-1]["median_device_epsilon"],
                    "accuracy": curve[-1]["test_accuracy"],
                    "best_accuracy": max(c["test_accuracy"] for c in curve),
                    "delta": 1e-5,
                    "accountant": "rdp (Skellam, Agarwal et al. 2021; check-in amplification "
                    "Zhu and Wang 2019)",
                    "model": f"{model} ({dim:,} parameters)",
                    "noise_multiplier": z,
                    "clip": clip,
                    "checkin_p": p,
                    "participations_per_device": participations,
                    "versions": len(cohorts),
                    "examples_per_device": len(shards[0]),
                    "local_training": {"epochs": epochs, "batch": batch, "lr": lr},
                    "server_lr": server_lr,
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
            label=f"sample-level, target eps {row['epsilon']}, {row['model']}",
        )
    for row in doc["user_level"]:
        pts = [(p["max_device_epsilon"], p["test_accuracy"]) for p in row["curve"]]
        ax.plot(
            *zip(*pts, strict=True),
            marker="s",
            ls="--",
            label=f"user-level, {row['devices']} devices in cohorts of {row['cohort_size']}, "
            f"z {row['noise_multiplier']}, p {row['checkin_p']} (most-spent device)",
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


def _user_run(text: str) -> tuple[float, float, int]:
    z, p, k = text.split(":")
    return float(z), float(p), int(k)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dp", description=__doc__)
    ap.add_argument("--epsilons", default="1,3,8")
    # The DP-friendly model's training (edge_client.defaults.DP_CNN_TRAINING).
    ap.add_argument("--model", choices=["simple_cnn", "dp_cnn"], default="dp_cnn")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2.0)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--clip", type=float, default=0.1, help="DP-SGD per-sample clip norm")
    ap.add_argument("--activation", choices=["relu", "tanh"], default="tanh")
    ap.add_argument("--workers", type=int, default=2, help="processes for the devices' training")
    ap.add_argument(
        "--user-runs",
        default="3:1:3,2:0.5:3",
        help="user-level runs z:p:k (noise multiplier, check-in probability, cohorts each "
        "device joins); the defaults keep every device's epsilon within 3 and maximise "
        "sqrt(k) * p / z (the signal-to-noise of the summed releases) among such settings",
    )
    ap.add_argument("--user-model", choices=["simple_cnn", "dp_cnn"], default="dp_cnn")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--cohort-size", type=int, default=100)
    ap.add_argument("--user-clip", type=float, default=0.5)
    ap.add_argument("--user-server-lr", type=float, default=1.0)
    ap.add_argument(
        "--user-append",
        action="store_true",
        help="add the user-level rows to those in --out instead of replacing them",
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: cost,sample,user")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the JSON")
    args = ap.parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        print(f"wrote {args.out.with_suffix('.png')}")
        return 0
    skip = set(filter(None, args.skip.split(",")))
    if args.quick:
        args.epsilons, args.rounds, args.user_runs = "3", 1, "1.5:0.5:1"
        args.devices, args.cohort_size = 40, 20
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
        doc.update({k: v for k, v in old.items() if k.startswith(("cost", "sample", "user"))})
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each part, so a long run that is cut short keeps what it did
        args.out.write_text(json.dumps(doc, indent=2, default=str))

    if "cost" not in skip:
        doc["cost"] = epoch_costs(activation=args.activation)
        doc["cost_created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        save()
    if "sample" not in skip:
        doc["sample_level"] = sample_level(
            [float(e) for e in args.epsilons.split(",")],
            model=args.model, rounds=args.rounds, clients=10, epochs=args.epochs,
            batch=args.batch, lr=args.lr, momentum=args.momentum, clip=args.clip,
            activation=args.activation, workers=args.workers,
        )  # fmt: skip
        doc["sample_level_created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        save()
    if "user" not in skip:
        from edge_client.defaults import SIM_TRAINING as sim  # small shards' local training

        earlier = doc.get("user_level", []) if args.user_append else []
        doc["user_level"] = earlier + user_level(
            [_user_run(r) for r in args.user_runs.split(",")],
            model=args.user_model, devices=args.devices, cohort_size=args.cohort_size,
            clip=args.user_clip, epochs=sim.epochs, batch=sim.batch_size, lr=sim.lr,
            server_lr=args.user_server_lr, workers=args.workers,
        )  # fmt: skip
        doc["user_level_created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    if doc.get("sample_level") and doc.get("user_level"):
        plot(doc, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
