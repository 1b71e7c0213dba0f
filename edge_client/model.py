"""The demo model (SimpleCNN) and conversions to the torch-free tensor dicts.

The module's parameter names and shapes must equal ``fedcore.modelspec.SIMPLE_CNN``,
which the bucket bootstrap and the aggregation function use without torch;
``check_matches_spec`` enforces that at start-up.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedcore.modelspec import SIMPLE_CNN

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


class SimpleCNN(nn.Module):
    """conv 1->32 3x3, conv 32->64 3x3, max-pool 2, fc 9216->128, fc 128->10 (1.2M params).

    ``activation`` is the nonlinearity after conv1, conv2 and fc1: ReLU as in
    PyTorch's MNIST example, or tanh for DP-SGD (Papernot et al. 2020: bounded
    activations keep per-sample gradients small, so clipping discards less).
    It has no parameters, so the schema is the same either way; the weights
    of one are not meaningful under the other.
    """

    def __init__(self, activation: str = "relu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)
        self.activation = activation

    @property
    def activation(self) -> str:
        return self._activation

    @activation.setter
    def activation(self, name: str) -> None:
        if name not in ACTIVATIONS:
            raise ValueError(f"activation {name!r} not in {sorted(ACTIVATIONS)}")
        self._activation = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self._activation]
        x = act(self.conv1(x))
        x = act(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = torch.flatten(x, 1)
        x = act(self.fc1(x))
        return self.fc2(x)


def check_matches_spec(model: nn.Module) -> None:
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if got != SIMPLE_CNN:
        raise RuntimeError(f"model parameters {got} differ from fedcore.modelspec.SIMPLE_CNN")


def to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    return {
        k: v.detach().cpu().numpy().astype(np.float32, copy=True)
        for k, v in model.state_dict().items()
    }


def load_numpy(model: nn.Module, params: dict[str, np.ndarray]) -> None:
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in params.items()}
    model.load_state_dict(state, strict=True)


def build(params: dict[str, np.ndarray] | None = None, *, activation: str = "relu") -> SimpleCNN:
    model = SimpleCNN(activation)
    check_matches_spec(model)
    if params is not None:
        load_numpy(model, params)
    return model
