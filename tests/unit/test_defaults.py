"""The CLI defaults module agrees with the dataclasses that still state their own."""

from __future__ import annotations

from edge_client import defaults as d


def test_device_training_defaults_are_train_settings_defaults() -> None:
    """TrainSettings (edge_client/train.py) keeps its own defaults for library callers;
    they must stay those of `edge_client run` and the demo."""
    from edge_client.train import TrainSettings

    t = TrainSettings()
    assert d.Training(t.epochs, t.batch_size, t.lr, t.momentum, t.optimizer) == d.DEVICE_TRAINING


def test_activation_follows_dp_sgd() -> None:
    assert d.activation(dp_sgd=True) == "tanh"
    assert d.activation(dp_sgd=False) == "relu"
