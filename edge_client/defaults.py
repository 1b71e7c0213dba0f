"""Defaults shared by the device CLI, the simulator, ``make demo`` and the scale benchmark.

They used to be restated as argparse defaults in ``edge_client/__main__.py`` (``run`` and
``simulate``), ``infra/demo.py`` and ``benchmarks/scale.py``, and drifted (scale.py's
``--dp-user-clip`` once differed from the simulate CLI's). Each value is declared here once;
a CLI that means something else on purpose (a faster demo poll, scale's longer deadlines)
says so where it differs. Server-side values (cohort sizes, deadlines, the user-level DP
clip and delta) are not repeated: they come from ``ServerSettings``
(``fedcore/server/settings.py``), the one source the SAM template is checked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedcore.server.settings import ServerSettings

_SERVER = ServerSettings()


OPTIMIZERS = ("adam", "sgd")  # a device's local optimizer (edge_client.train.local_optimizer)


@dataclass(frozen=True)
class Training:
    """Local training of one participation: epochs over the device's shard, batch size, step
    size, SGD's momentum and the optimizer (``edge_client.train.TrainSettings`` takes the
    same fields)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    optimizer: str = "sgd"


# A device with a large shard (thousands of examples; ``edge_client run``, ``make demo``).
# Adam: a time-boxed participation may run only tens of steps, where Adam learns most
# (``edge_client.train.local_optimizer``).
DEVICE_TRAINING = Training(epochs=1, batch_size=32, lr=0.002, momentum=0.0, optimizer="adam")
# DP-SGD: large batches, no momentum and a larger step (the noise's norm grows with the
# model's 1.2M dimensions and shrinks with the batch); ``make demo --dp-epsilon``.
DP_SGD_TRAINING = Training(epochs=1, batch_size=256, lr=2.0, momentum=0.0)
# DP-SGD on the DP-friendly model (``--model dp_cnn``: 26k parameters, GroupNorm, tanh):
# Tramer & Boneh's recipe of momentum 0.9 and a small per-sample clip, with the batch and
# step chosen on 10 devices x 6,000 images at epsilon 3 (benchmarks/dp.py, README).
DP_CNN_SGD_TRAINING = Training(epochs=5, batch_size=256, lr=2.0, momentum=0.9)
DP_CNN_MAX_GRAD_NORM = 0.1
# Small shards (60 examples each for 1,000 devices): several short epochs, plain SGD
# (momentum 0.9 over 30 steps of batch 10 overshoots and the average oscillates).
SIM_TRAINING = Training(epochs=5, batch_size=10, lr=0.1, momentum=0.0)


def activation(*, dp_sgd: bool) -> str:
    """SimpleCNN's nonlinearity: tanh under DP-SGD (it trains better with clipped, noisy
    gradients), else relu. Every device of a deployment, and the evaluator, must agree."""
    return "tanh" if dp_sgd else "relu"


def optimizer_name(*, dp_sgd: bool, asked: str | None = None) -> str:
    """The local optimizer a device trains with: ``asked`` (default ``DEVICE_TRAINING``'s),
    always SGD under DP-SGD, whose accounting describes SGD; asking for another there is
    a ValueError, not a silent switch. The device CLI and the demo both ask here."""
    if dp_sgd:
        if asked not in (None, "sgd"):
            raise ValueError("--dp-epsilon runs DP-SGD: --optimizer must be sgd")
        return "sgd"
    return asked or DEVICE_TRAINING.optimizer


# Partition of MNIST over devices.
PARTITION = "iid"
DIRICHLET_ALPHA = 0.5  # concentration of the non-IID "dirichlet" split

# The device loop.
POLL_S = 1.0  # seconds between two reads of the pointer, configs and manifests
COHORT_TIMEOUT_S = 600.0  # a device gives up on a cohort after this long
DROP_AT = "inputs"  # where a device vanishes in dropout experiments (keys, shares, inputs)

# Privacy. The delta serves both levels: a device's DP-SGD budget and the server's user-level
# releases (DP_DELTA); the cohort clip is the server's (DP_USER_CLIP).
DP_DELTA = _SERVER.dp_delta
DP_MAX_GRAD_NORM = 1.0  # per-sample clip of DP-SGD
DP_PLANNED_ROUNDS = 10  # participations the DP-SGD noise is calibrated for
DP_USER_NOISE = _SERVER.dp_user_noise  # user-level noise multiplier z (0: off)
DP_USER_CLIP = _SERVER.dp_user_clip  # user-level L2 clip C a server applies
DP_USER_EPSILON = 10.0  # a device's user-level epsilon cap over all its releases
DP_USER_CHECKIN_P = 1.0  # a device's random check-in probability (1: no amplification)
DEVICE_MAX_USER_CLIP = math.inf  # a device joins cohorts with any clip unless told otherwise

# Many simulated devices (``python -m infra.simulate``, ``benchmarks/scale.py``): the acceptance
# target of 1,000 devices in cohorts of 100.
SIM_DEVICES = 1000
SIM_COHORT_SIZE = 100
SIM_MIN_COHORT_SIZE = 50
SIM_MAX_MINUTES = 30.0
# A cohort of 100 trains and exchanges shares on a few shared cores: the key, share and
# unmask rounds need longer than the server's default SHORT_ROUND_S.
SIM_SHORT_ROUND_S = 120.0
