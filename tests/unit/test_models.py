"""The model registry: torch modules, torch-free schemas and initial weights agree, a
version's tensors pick their module, and the DP-friendly model trains under DP-SGD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge_client.model import DPCNN, MODULES, SimpleCNN, build, to_numpy
from fedcore.modelspec import DP_CNN, MODELS, SIMPLE_CNN, init_params, model_of, num_parameters
from fedcore.storage import S3Store


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_module_matches_its_schema_and_the_torch_free_init_is_pytorchs_rule(name: str) -> None:
    """GIVEN each registered model WHEN torch builds it and fedcore draws version 0 without
    torch THEN names and shapes agree, GroupNorm's affine parameters start at (1, 0) as in
    torch, and every other tensor lies within torch's own bound U(+-1/sqrt(fan_in))."""
    torch_init = to_numpy(MODULES[name]())
    ours = init_params(MODELS[name], seed=3)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in torch_init.items()}
    for key, value in ours.items():
        assert value.dtype == np.float32
        if key.startswith("gn"):
            np.testing.assert_array_equal(value, torch_init[key])
        else:
            bound = max(abs(torch_init[key]).max(), abs(value).max())
            layer = key.rsplit(".", 1)[0]
            fan_in = math.prod(MODELS[name][f"{layer}.weight"][1:])
            assert bound <= 1 / math.sqrt(fan_in) + 1e-7


def test_sizes() -> None:
    assert num_parameters(SIMPLE_CNN) == 1_199_882
    assert num_parameters(DP_CNN) == 26_106


def test_a_versions_tensors_choose_the_module() -> None:
    """GIVEN version-0 tensors of either model WHEN a device builds from them THEN it gets
    that model (the bucket, not a flag, fixes it), each with its default nonlinearity."""
    dp = build(init_params(DP_CNN))
    simple = build(init_params(SIMPLE_CNN))
    assert isinstance(dp, DPCNN) and dp.activation == "tanh"
    assert isinstance(simple, SimpleCNN) and simple.activation == "relu"
    assert isinstance(build(), SimpleCNN) and isinstance(build(model="dp_cnn"), DPCNN)
    assert build(init_params(DP_CNN), activation="relu").activation == "relu"
    out = dp(torch.zeros(2, 1, 28, 28))
    assert out.shape == (2, 10)


def test_tensors_that_fit_no_model_or_another_model_are_refused() -> None:
    params = init_params(DP_CNN)
    with pytest.raises(ValueError, match="not 'simple_cnn'"):
        build(params, model="simple_cnn")
    bad = dict(params)
    bad["fc2.weight"] = np.zeros((10, 33), np.float32)
    with pytest.raises(ValueError, match="match no model"):
        model_of(bad)
    with pytest.raises(ValueError, match="match no model"):
        model_of({k: v for k, v in params.items() if k != "gn1.bias"})


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_the_dp_model_trains_under_dp_sgd(mode: str) -> None:
    """GIVEN the GroupNorm CNN WHEN Opacus trains it (fast clipping and per-sample hooks:
    GroupNorm has per-sample gradients, BatchNorm would not) THEN every tensor moves and
    stays finite."""
    pytest.importorskip("opacus")
    from edge_client.privacy import train_local_dp
    from edge_client.train import TrainSettings

    gen = np.random.default_rng(0)
    x = gen.random((64, 28, 28), dtype=np.float32)
    y = gen.integers(0, 10, 64)
    params = init_params(DP_CNN)
    model = build(params)
    settings = TrainSettings(epochs=1, batch_size=16, lr=0.5, momentum=0.9, optimizer="sgd")
    result = train_local_dp(
        model, x, y, settings, noise_multiplier=1.0, max_grad_norm=0.1, grad_sample_mode=mode
    )
    assert result.steps > 0 and math.isfinite(result.loss)
    after = to_numpy(model)
    assert all(np.isfinite(v).all() for v in after.values())
    assert all(not np.array_equal(after[k], params[k]) for k in params)


def test_the_bucket_is_seeded_with_the_chosen_model_and_keeps_it(store: S3Store) -> None:
    """GIVEN an empty bucket on a real S3 API WHEN it is seeded with the DP model THEN
    version 0 holds that model's tensors (a device builds a DPCNN from them), and seeding
    again with another model changes nothing."""
    from fedcore.versions import load_model
    from infra.stack import seed_bucket

    assert seed_bucket(store, model="dp_cnn")
    assert not seed_bucket(store, model="simple_cnn")
    params, _, _ = load_model(store, 0)
    assert model_of(params) == "dp_cnn"
    assert isinstance(build(params), DPCNN)
    with pytest.raises(ValueError, match="unknown model"):
        seed_bucket(store, model="resnet")
