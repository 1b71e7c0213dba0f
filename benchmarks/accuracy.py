"""Accuracy benchmark: FedAvg on MNIST with 100 clients, through the real system.

What it reproduces
------------------
McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS), Table 2, the FedAvg CNN row with C=0.1, E=5,
B=10: 100 clients hold 600 MNIST training images each, every round 10 of them
(chosen at random) train 5 local epochs of plain minibatch SGD with batch size
10 from the current global model, and the server replaces the model by the
sample-weighted mean of their models. The paper reports the number of rounds
to reach 99% test accuracy: 20 for the IID split and 229 for the pathological
non-IID split (each client holds 2 label-sorted shards of 300 examples).

Why it runs through the system
------------------------------
The point is to show that the product's pipeline (check-in, cohort formation,
write-once update objects, the aggregation handler triggered by S3 events,
the version log and its pointer) trains as well as textbook FedAvg, not to
re-run FedAvg in a loop. So every round goes through a :class:`LocalStack`
(embedded moto S3 server, the real aggregation handler fed by the event pump,
the real sweeper), and the clients are in-process simulated devices that speak
the protocol with :class:`fedcore.participant.Participant` and train with
torch: check in, find the cohort, fetch the cohort's base version, train,
upload the model delta in plaintext mode. The server settings make the apply
rule exactly FedAvg: cohorts of exactly 10 (``cohort_size`` =
``min_cohort_size`` = 10), ``server_lr`` = 1 and, because rounds are
synchronous like the paper's, staleness 0 (FedBuff weight 1); every client has
600 examples, so the handler's sample-weighted mean is the paper's weighted
mean. After each round the new version is read back from the bucket and
evaluated on the 10,000 MNIST test images.

Differences from the paper (recorded in the JSON as well)
---------------------------------------------------------
* The model is the product's SimpleCNN (two 3x3 convolutions with 32 and 64
  channels, one 2x2 max-pool, fc 128, 1.2M parameters), not the paper's CNN
  (two 5x5 convolutions each followed by 2x2 max-pooling, fc 512, 1.66M).
* Inputs are normalised with MNIST's mean and standard deviation.
* The paper tuned the learning rate per setting over a grid; here it is a
  flag. The default, 0.1, comes from a short sweep of the IID setting (see
  ``DEFAULT_LR``). Local SGD has no momentum by default, like the paper's.
* One seeded run, not the best over a learning-rate grid.

Run ``python -m benchmarks.accuracy --help``. Results go to
``benchmarks/results/accuracy_{partition}.json`` (rewritten after every round,
so an interrupted run leaves its curve so far, marked ``"complete": false``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from edge_client.data import MnistArrays, load_mnist, partition
from edge_client.model import build, to_numpy
from edge_client.train import TrainSettings, evaluate, train_local
from fedcore.messages import CohortConfig
from fedcore.modelspec import num_parameters
from fedcore.participant import Participant
from fedcore.secagg import crypto
from fedcore.storage import ObjectStore
from fedcore.versions import find_head, load_model, read_meta
from infra.stack import LocalStack

NUM_CLIENTS: Final = 100
COHORT_SIZE: Final = 10  # C = 0.1
LOCAL_EPOCHS: Final = 5  # E
BATCH_SIZE: Final = 10  # B
THRESHOLDS: Final = (0.97, 0.99)
PARTITIONS: Final = ("iid", "shards")

# Client learning rate, from a 5-round sweep of the IID setting (plain SGD, seed 0).
# Test accuracy after rounds 1..5:
#   0.02: .902 .933 .948 .957 .960    0.05: .921 .956 .966 .970 .973
#   0.1:  .930 .958 .969 .973 .976    0.2:  .744 .954 .967 .972 .975 (unstable in round 1)
# 0.1 led at every round. The non-IID run was not swept (too slow here) and uses the same.
DEFAULT_LR: Final = {"iid": 0.1, "shards": 0.1}
DEFAULT_MAX_ROUNDS: Final = {"iid": 60, "shards": 60}

PAPER: Final = {
    "citation": (
        "McMahan, Moore, Ramage, Hampson, Aguera y Arcas. Communication-Efficient Learning "
        "of Deep Networks from Decentralized Data. AISTATS 2017, Table 2"
    ),
    "setting": "FedAvg, MNIST CNN, C=0.1 (10 of 100 clients per round), E=5, B=10",
    "target_accuracy": 0.99,
    "rounds_to_target": {"iid": 20, "shards": 229},
    "note": (
        "The paper's rounds are for the 99% target only (best learning rate from a grid); "
        "its CNN is 5x5 conv 32 -> pool -> 5x5 conv 64 -> pool -> fc 512 (1,663,370 "
        "parameters). FedSGD (E=1, B=inf) needed 626 (IID) and 483 (non-IID) rounds."
    ),
}

log = logging.getLogger("benchmarks.accuracy")


@dataclass(frozen=True)
class RunSettings:
    """Everything that determines one partition's run."""

    partition: str
    lr: float
    momentum: float
    max_rounds: int
    target: float
    seed: int
    num_clients: int = NUM_CLIENTS
    cohort_size: int = COHORT_SIZE
    local_epochs: int = LOCAL_EPOCHS
    batch_size: int = BATCH_SIZE
    server_lr: float = 1.0
    torch_threads: int = 2
    pump_interval_s: float = 0.5


@dataclass(frozen=True)
class RoundRecord:
    """One synchronous round: the version it produced and that version's test accuracy."""

    round: int
    version: int
    cohort_id: str
    accuracy: float
    test_loss: float
    train_loss: float  # mean over the cohort of each client's last-epoch training loss
    elapsed_s: float  # since the start of this partition's run
    round_s: float
    cohort_s: float  # check-in until every member found the cohort
    train_s: float  # fetch + local training + upload, all 10 members in turn
    aggregate_s: float  # last upload until the new version was committed
    eval_s: float


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def git_revision() -> str | None:
    """The checkout's commit, with ``+dirty`` if the working tree has changes."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def first_round_reaching(curve: list[RoundRecord], threshold: float) -> int | None:
    return next((r.round for r in curve if r.accuracy >= threshold), None)


def wait_for_version(store: ObjectStore, after: int, *, timeout_s: float, what: str) -> int:
    """Poll the version log until a version newer than ``after`` is committed; return it."""
    deadline = time.monotonic() + timeout_s
    while True:
        version = find_head(store, after)
        if version > after:
            return version
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)


class Simulation:
    """100 simulated devices driving one LocalStack in synchronous FedAvg rounds."""

    def __init__(
        self, stack: LocalStack, data: MnistArrays, parts: list[np.ndarray], s: RunSettings
    ) -> None:
        self.stack = stack
        self.store = stack.store
        self.data = data
        self.s = s
        self.client_ids = [f"client-{i:03d}" for i in range(s.num_clients)]
        # Plaintext mode, explicitly (it is never a fallback): FedAvg's accuracy is the
        # question here, and secure aggregation would add only quantization error.
        # Each device signs its updates (the function checks them against the pinned key).
        self.participants = {
            c: Participant(self.store, c, mode="plaintext", signing_key=crypto.ed25519_keypair()[0])
            for c in self.client_ids
        }
        for p in self.participants.values():
            p.enroll()
        self.shard_of = {c: parts[i] for i, c in enumerate(self.client_ids)}
        # Independent, seeded streams: client selection, and each device's local shuffling.
        self._select_rng = np.random.default_rng([s.seed, 1])
        self._train_seeds = np.random.SeedSequence([s.seed, 2])

    def _form_cohort(self, members: list[str], head: int) -> CohortConfig:
        tickets = {c: self.participants[c].check_in(head) for c in members}
        configs: dict[str, CohortConfig] = {}
        for c in members:
            cfg = self.participants[c].wait_for_cohort(tickets[c], timeout_s=120.0, poll_s=0.05)
            if cfg is None:
                raise TimeoutError(f"{c} found no cohort within 120s after checking in")
            configs[c] = cfg
        cohorts = {cfg.cohort_id for cfg in configs.values()}
        cfg = configs[members[0]]
        if len(cohorts) != 1 or cfg.base_version != head:
            raise RuntimeError(
                f"expected one cohort on version {head}, got {sorted(cohorts)} "
                f"on {sorted({c.base_version for c in configs.values()})}"
            )
        return cfg

    def _train_member(self, client: str, cfg: CohortConfig, seed: int) -> float:
        """One device's part of the round: fetch base, train E epochs, upload the delta.

        Returns the device's mean training loss over its last local epoch.
        """
        p = self.participants[client]
        base = p.fetch_model(cfg.base_version)
        model = build(base)
        idx = self.shard_of[client]
        settings = TrainSettings(
            epochs=self.s.local_epochs,
            batch_size=self.s.batch_size,
            lr=self.s.lr,
            momentum=self.s.momentum,
            seed=seed,
        )
        result = train_local(model, self.data.train_x[idx], self.data.train_y[idx], settings)
        delta = {k: v - base[k] for k, v in to_numpy(model).items()}
        p.upload_plain(cfg, delta, num_samples=result.num_samples, loss=result.loss)
        return result.loss

    def run_round(self, round_no: int, t_start: float) -> RoundRecord:
        t0 = time.monotonic()
        head = find_head(self.store)
        members = sorted(
            self.client_ids[i]
            for i in self._select_rng.choice(self.s.num_clients, self.s.cohort_size, replace=False)
        )
        cfg = self._form_cohort(members, head)
        t1 = time.monotonic()
        seeds = self._train_seeds.spawn(1)[0].generate_state(len(members))
        losses = [
            self._train_member(c, cfg, int(seed)) for c, seed in zip(members, seeds, strict=True)
        ]
        t2 = time.monotonic()
        try:
            version = wait_for_version(
                self.store, head, timeout_s=600.0, what=f"version {head + 1} from {cfg.cohort_id}"
            )
        except TimeoutError as exc:
            result = self.participants[members[0]].result(cfg.cohort_id)
            dead = self.stack.pump.stats.dead_letters if self.stack.pump else None
            raise TimeoutError(f"{exc}; cohort result {result}; dead letters {dead}") from exc
        t3 = time.monotonic()
        meta = read_meta(self.store, version)
        if meta.cohorts != [cfg.cohort_id] or meta.parent != head or meta.staleness != 0:
            raise RuntimeError(
                f"version {version} applies {meta.cohorts} on parent {meta.parent} with "
                f"staleness {meta.staleness}; expected [{cfg.cohort_id}] on {head}, staleness 0"
            )
        params, _, _ = load_model(self.store, version)
        accuracy, test_loss = evaluate(build(params), self.data.test_x, self.data.test_y)
        t4 = time.monotonic()
        return RoundRecord(
            round=round_no,
            version=version,
            cohort_id=cfg.cohort_id,
            accuracy=accuracy,
            test_loss=test_loss,
            train_loss=float(np.mean(losses)),
            elapsed_s=t4 - t_start,
            round_s=t4 - t0,
            cohort_s=t1 - t0,
            train_s=t2 - t1,
            aggregate_s=t3 - t2,
            eval_s=t4 - t3,
        )


def summarise(s: RunSettings, curve: list[RoundRecord]) -> dict[str, Any]:
    thresholds = sorted({*THRESHOLDS, s.target})
    rounds_to = {f"{t:.4g}": first_round_reaching(curve, t) for t in thresholds}
    return {
        "rounds_to": rounds_to,
        "client_updates_to": {
            k: (None if v is None else v * s.cohort_size) for k, v in rounds_to.items()
        },
        "reached_target": first_round_reaching(curve, s.target) is not None,
        "rounds_run": len(curve),
        "final_accuracy": curve[-1].accuracy if curve else None,
        "best_accuracy": max((r.accuracy for r in curve), default=None),
    }


def run_partition(
    s: RunSettings, data: MnistArrays, out_dir: Path, log_dir: Path
) -> dict[str, Any]:
    """Run one partition to the target (or ``max_rounds``) and write its JSON after every round."""
    labels = data.train_y
    parts = partition(labels, s.num_clients, s.partition, seed=s.seed, shards_per_client=2)
    classes = [len(np.unique(labels[p])) for p in parts]
    out_path = out_dir / f"accuracy_{s.partition}.json"
    say(
        f"{s.partition}: {s.num_clients} clients, {min(map(len, parts))}-{max(map(len, parts))} "
        f"examples and {min(classes)}-{max(classes)} classes each; lr {s.lr}, momentum "
        f"{s.momentum}, up to {s.max_rounds} rounds, target {s.target:.2%}; results -> {out_path}"
    )
    doc: dict[str, Any] = {
        "benchmark": "accuracy",
        "partition": s.partition,
        "complete": False,
        "settings": {
            **asdict(s),
            "aggregation": "plaintext mode, sample-weighted mean of deltas, staleness 0",
            "model": f"edge_client.model.SimpleCNN ({num_parameters():,} parameters)",
            "examples_per_client": [int(min(map(len, parts))), int(max(map(len, parts)))],
            "classes_per_client": [int(min(classes)), int(max(classes))],
        },
        "paper": PAPER,
        "paper_rounds_to_99": PAPER["rounds_to_target"][s.partition],
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "git": git_revision(),
        },
    }
    curve: list[RoundRecord] = []
    stack_settings = {
        "cohort_size": s.cohort_size,
        "min_cohort_size": s.cohort_size,
        "server_lr": s.server_lr,
        "mode": "plaintext",
        "round_deadline_s": 3600,  # the 10 devices train one after another on this CPU
        "stuck_after_s": 600,
    }
    t_start = time.monotonic()
    with LocalStack(
        settings=stack_settings,
        log_path=log_dir / f"accuracy_{s.partition}_functions.log",
        pump_interval_s=s.pump_interval_s,
        seed=s.seed,
    ) as stack:
        sim = Simulation(stack, data, parts, s)
        params0, _, _ = load_model(stack.store, 0)
        acc0, _ = evaluate(build(params0), data.test_x, data.test_y)
        say(f"{s.partition}: version 0 test accuracy {acc0:.4f}")
        doc["initial_accuracy"] = acc0
        for round_no in range(1, s.max_rounds + 1):
            rec = sim.run_round(round_no, t_start)
            curve.append(rec)
            say(
                f"{s.partition} round {rec.round:3d}/{s.max_rounds}: v{rec.version} "
                f"acc {rec.accuracy:.4f} test loss {rec.test_loss:.4f} train loss "
                f"{rec.train_loss:.4f} | round {rec.round_s:5.1f}s (cohort {rec.cohort_s:.1f}, "
                f"train {rec.train_s:.1f}, aggregate {rec.aggregate_s:.1f}, eval "
                f"{rec.eval_s:.1f}) elapsed {rec.elapsed_s:6.0f}s"
            )
            doc["curve"] = [asdict(r) for r in curve]
            doc["summary"] = summarise(s, curve)
            doc["wall_time_s"] = time.monotonic() - t_start
            write_json_atomic(out_path, doc)
            if rec.accuracy >= s.target:
                doc["stopped"] = f"reached target {s.target} in round {rec.round}"
                break
        else:
            doc["stopped"] = f"max rounds ({s.max_rounds}) without reaching {s.target}"
        assert stack.pump is not None
        doc["pump"] = {
            "events": stack.pump.stats.events,
            "invocations": stack.pump.stats.invocations,
            "dead_letters": stack.pump.stats.dead_letters,
        }
    doc["wall_time_s"] = time.monotonic() - t_start
    doc["complete"] = True
    write_json_atomic(out_path, doc)
    return doc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy",
        description="FedAvg MNIST accuracy (McMahan et al. 2017, Table 2) through the real stack.",
    )
    p.add_argument("--partition", choices=[*PARTITIONS, "both"], default="iid")
    p.add_argument(
        "--max-rounds",
        type=int,
        help=f"rounds before giving up (default {DEFAULT_MAX_ROUNDS}; the paper's non-IID "
        "run needed 229)",
    )
    p.add_argument("--lr", type=float, help=f"client learning rate (default {DEFAULT_LR})")
    p.add_argument("--momentum", type=float, default=0.0, help="client SGD momentum (paper: 0)")
    p.add_argument("--target", type=float, default=0.99, help="stop at this test accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument(
        "--pump-interval-s",
        type=float,
        default=0.5,
        help="how often the local event pump lists the bucket; it lists every cohort's "
        "objects each time, which costs CPU that the simulated devices share",
    )
    p.add_argument(
        "--log-dir",
        type=Path,
        default=Path("runs/benchmarks"),
        help="where the aggregation functions' JSON logs go",
    )
    args = p.parse_args(argv)
    if args.max_rounds is not None and args.max_rounds < 1:
        p.error("--max-rounds must be >= 1")
    if args.lr is not None and args.lr <= 0:
        p.error("--lr must be > 0")
    if not 0 < args.target <= 1:
        p.error("--target must be in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    say("loading MNIST ...")
    data = load_mnist(progress=say)
    partitions = list(PARTITIONS) if args.partition == "both" else [args.partition]
    results = []
    for name in partitions:
        s = RunSettings(
            partition=name,
            lr=args.lr if args.lr is not None else DEFAULT_LR[name],
            momentum=args.momentum,
            max_rounds=args.max_rounds or DEFAULT_MAX_ROUNDS[name],
            target=args.target,
            seed=args.seed,
            pump_interval_s=args.pump_interval_s,
        )
        results.append(run_partition(s, data, args.out_dir, args.log_dir))
    for doc in results:
        summ = doc["summary"]
        paper = doc["paper_rounds_to_99"]
        reached = ", ".join(
            f"{k}: {'not reached' if v is None else f'{v} rounds / {u} updates'}"
            for (k, v), u in zip(
                summ["rounds_to"].items(), summ["client_updates_to"].values(), strict=True
            )
        )
        say(
            f"SUMMARY {doc['partition']}: {reached}; best {summ['best_accuracy']:.4f} in "
            f"{summ['rounds_run']} rounds, {doc['wall_time_s']:.0f}s (paper: {paper} rounds "
            f"to 0.99)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
