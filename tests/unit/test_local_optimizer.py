"""The device's local optimizer: Adam by default, SGD on request and always under DP-SGD."""

from __future__ import annotations

import argparse

import pytest
import torch

from edge_client import defaults as d
from edge_client.__main__ import local_optimizer_name
from edge_client.model import build
from edge_client.train import TrainSettings, local_optimizer


def test_adam_is_the_default_and_sgd_keeps_its_momentum() -> None:
    model = build()
    assert isinstance(local_optimizer(model, TrainSettings()), torch.optim.Adam)
    assert TrainSettings().optimizer == d.DEVICE_TRAINING.optimizer == "adam"
    sgd = local_optimizer(model, TrainSettings(optimizer="sgd", lr=0.05, momentum=0.9))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["lr"] == 0.05


def test_settings_refuse_an_unknown_optimizer_and_momentum_for_adam() -> None:
    """A momentum given with Adam would be silently ignored: refuse it instead."""
    with pytest.raises(ValueError, match="unknown optimizer"):
        TrainSettings(optimizer="rmsprop")
    with pytest.raises(ValueError, match="momentum is SGD's"):
        TrainSettings(optimizer="adam", momentum=0.9)


def test_dp_sgd_runs_sgd() -> None:
    """The DP accounting describes DP-SGD: a run under --dp-epsilon trains with SGD, and
    asking for Adam there is an error, not a silent switch."""
    ns = argparse.Namespace
    assert local_optimizer_name(ns(dp_epsilon=3.0, optimizer=None)) == "sgd"
    assert local_optimizer_name(ns(dp_epsilon=0.0, optimizer=None)) == "adam"
    assert local_optimizer_name(ns(dp_epsilon=0.0, optimizer="sgd")) == "sgd"
    with pytest.raises(SystemExit, match="must be sgd"):
        local_optimizer_name(ns(dp_epsilon=3.0, optimizer="adam"))
    assert d.DP_SGD_TRAINING.optimizer == "sgd"
