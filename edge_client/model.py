"""The models (SimpleCNN, the DP-friendly DPCNN) and conversions to torch-free tensor dicts.

Each module's parameter names and shapes must equal its schema in
``fedcore.modelspec.MODELS``, which the bucket bootstrap uses without torch;
``check_matches_spec`` enforces that whenever a model is built. ``build`` picks the
module from the tensors it is given, so a device trains whatever model version 0
was seeded with.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedcore.modelspec import DEFAULT_MODEL, MODELS, model_of

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


class _SelectableActivation(nn.Module):
    """A module whose nonlinearity can be switched (no parameters, so no schema change)."""

    _activation = "relu"

    @property
    def activation(self) -> str:
        return self._activation

    @activation.setter
    def activation(self, name: str) -> None:
        if name not in ACTIVATIONS:
            raise ValueError(f"activation {name!r} not in {sorted(ACTIVATIONS)}")
        self._activation = name


class SimpleCNN(_SelectableActivation):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self._activation]
        x = act(self.conv1(x))
        x = act(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = torch.flatten(x, 1)
        x = act(self.fc1(x))
        return self.fc2(x)


class DPCNN(_SelectableActivation):
    """Tramer & Boneh's (ICLR 2021) MNIST CNN for DP-SGD, with GroupNorm: 26,106 params.

    conv 1->16 8x8 stride 2 pad 3, GroupNorm(4), act, max-pool 2 stride 1; conv
    16->32 4x4 stride 2, GroupNorm(4), act, max-pool 2 stride 1; fc 512->32, act;
    fc 32->10. Small because DP-SGD's noise grows with the dimension; GroupNorm
    because BatchNorm mixes the examples of a batch, which per-sample clipping
    cannot bound; tanh by default (bounded activations, Papernot et al. 2020).
    """

    def __init__(self, activation: str = "tanh") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, stride=2, padding=3)
        self.gn1 = nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv2d(16, 32, 4, stride=2)
        self.gn2 = nn.GroupNorm(4, 32)
        self.fc1 = nn.Linear(512, 32)
        self.fc2 = nn.Linear(32, 10)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self._activation]
        x = F.max_pool2d(act(self.gn1(self.conv1(x))), 2, 1)
        x = F.max_pool2d(act(self.gn2(self.conv2(x))), 2, 1)
        x = torch.flatten(x, 1)
        return self.fc2(act(self.fc1(x)))


MODULES: dict[str, type[SimpleCNN] | type[DPCNN]] = {"simple_cnn": SimpleCNN, "dp_cnn": DPCNN}


def check_matches_spec(model: nn.Module, name: str = DEFAULT_MODEL) -> None:
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if got != MODELS[name]:
        raise RuntimeError(f"model parameters {got} differ from fedcore.modelspec {name!r}")


def to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    return {
        k: v.detach().cpu().numpy().astype(np.float32, copy=True)
        for k, v in model.state_dict().items()
    }


def load_numpy(model: nn.Module, params: dict[str, np.ndarray]) -> None:
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in params.items()}
    model.load_state_dict(state, strict=True)


def build(
    params: dict[str, np.ndarray] | None = None,
    *,
    activation: str | None = None,
    model: str | None = None,
) -> nn.Module:
    """The module ``params`` fit (``model`` when no params; SimpleCNN by default), loaded.

    ``activation`` None keeps the module's own default (SimpleCNN relu, DPCNN tanh).
    Raises ``ValueError`` for tensors that fit no model, or another model than ``model``."""
    name = model_of(params) if params is not None else (model or DEFAULT_MODEL)
    if model is not None and model != name:
        raise ValueError(f"the tensors are a {name!r} model, not {model!r}")
    module = MODULES[name]() if activation is None else MODULES[name](activation)
    check_matches_spec(module, name)
    if params is not None:
        load_numpy(module, params)
    return module
