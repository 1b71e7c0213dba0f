"""The tensor schemas of the models the product trains, and a torch-free initialisation.

The bucket bootstrap (``infra``) seeds version 0 without importing torch, so the
initial weights are drawn here with PyTorch's default rules: Kaiming-uniform with
a = sqrt(5) for Conv2d and Linear (U(-1/sqrt(fan_in), +1/sqrt(fan_in)) for weights
and biases), ones and zeros for GroupNorm's affine parameters. ``edge_client.model``
checks its modules against these schemas, so the two cannot drift apart. The
aggregation function never needs them: it handles whatever tensors version 0 holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

Schema = dict[str, tuple[int, ...]]

# The classic PyTorch MNIST CNN: conv 1->32 3x3, conv 32->64 3x3, max-pool 2,
# fc 9216->128, fc 128->10 (1,199,882 parameters). The default without DP.
SIMPLE_CNN: Schema = {
    "conv1.weight": (32, 1, 3, 3),
    "conv1.bias": (32,),
    "conv2.weight": (64, 32, 3, 3),
    "conv2.bias": (64,),
    "fc1.weight": (128, 9216),
    "fc1.bias": (128,),
    "fc2.weight": (10, 128),
    "fc2.bias": (10,),
}

# Tramer & Boneh's (ICLR 2021) end-to-end DP-SGD CNN for MNIST with GroupNorm after
# each convolution: conv 1->16 8x8/2, conv 16->32 4x4/2, fc 512->32, fc 32->10
# (26,106 parameters). DP-SGD's noise norm grows with the square root of the
# dimension while the clipped signal does not: SimpleCNN's 1.2M parameters (98% in
# fc1) drown the signal at epsilon 3, this model's 46x fewer do not.
DP_CNN: Schema = {
    "conv1.weight": (16, 1, 8, 8),
    "conv1.bias": (16,),
    "gn1.weight": (16,),
    "gn1.bias": (16,),
    "conv2.weight": (32, 16, 4, 4),
    "conv2.bias": (32,),
    "gn2.weight": (32,),
    "gn2.bias": (32,),
    "fc1.weight": (32, 512),
    "fc1.bias": (32,),
    "fc2.weight": (10, 32),
    "fc2.bias": (10,),
}

MODELS: dict[str, Schema] = {"simple_cnn": SIMPLE_CNN, "dp_cnn": DP_CNN}
DEFAULT_MODEL = "simple_cnn"
# Layers whose affine parameters PyTorch initialises to ones (weight) and zeros (bias).
_NORM_LAYERS = ("gn1", "gn2")


def schema(model: str) -> Schema:
    try:
        return MODELS[model]
    except KeyError:
        raise ValueError(f"unknown model {model!r}; one of {sorted(MODELS)}") from None


def model_of(params: Mapping[str, np.ndarray | tuple[int, ...]]) -> str:
    """The registered model whose schema ``params`` (arrays or shapes) has exactly.

    A global version names no model: its tensors are the model, so a device builds
    the module they fit. Raises ``ValueError`` for tensors that fit none."""
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in params.items()}
    for name, spec in MODELS.items():
        if shapes == spec:
            return name
    raise ValueError(f"tensors {sorted(shapes)} match no model in {sorted(MODELS)}")


def num_parameters(spec: Schema = SIMPLE_CNN) -> int:
    return sum(math.prod(s) for s in spec.values())


def init_params(spec: Schema = SIMPLE_CNN, *, seed: int = 0) -> dict[str, np.ndarray]:
    """PyTorch-default initial weights (not secret: numpy's generator is fine here)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in spec.items():
        layer, kind = name.rsplit(".", 1)
        if layer in _NORM_LAYERS:
            fill = 1.0 if kind == "weight" else 0.0
            out[name] = np.full(shape, fill, dtype=np.float32)
            continue
        fan_in = math.prod(spec[f"{layer}.weight"][1:])
        bound = 1.0 / math.sqrt(fan_in)
        out[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return out
