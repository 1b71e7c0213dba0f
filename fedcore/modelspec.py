"""The tensor schema of the demo model, and a torch-free initialisation.

The bucket bootstrap (``infra``) seeds version 0 without importing torch, so
the initial weights are drawn here with PyTorch's default rule for Conv2d and
Linear (Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), +1/sqrt(fan_in))
for weights and biases). ``edge_client.model`` checks its module against this
schema, so the two cannot drift apart.
"""

from __future__ import annotations

import math

import numpy as np

# The classic PyTorch MNIST CNN: conv 1->32 3x3, conv 32->64 3x3, max-pool 2,
# fc 9216->128, fc 128->10 (1,199,882 parameters).
SIMPLE_CNN: dict[str, tuple[int, ...]] = {
    "conv1.weight": (32, 1, 3, 3),
    "conv1.bias": (32,),
    "conv2.weight": (64, 32, 3, 3),
    "conv2.bias": (64,),
    "fc1.weight": (128, 9216),
    "fc1.bias": (128,),
    "fc2.weight": (10, 128),
    "fc2.bias": (10,),
}


def num_parameters(spec: dict[str, tuple[int, ...]] = SIMPLE_CNN) -> int:
    return sum(math.prod(s) for s in spec.values())


def init_params(
    spec: dict[str, tuple[int, ...]] = SIMPLE_CNN, *, seed: int = 0
) -> dict[str, np.ndarray]:
    """PyTorch-default initial weights (not secret: numpy's generator is fine here)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in spec.items():
        layer = name.rsplit(".", 1)[0]
        fan_in = math.prod(spec[f"{layer}.weight"][1:])
        bound = 1.0 / math.sqrt(fan_in)
        out[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return out
