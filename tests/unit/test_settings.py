"""Server settings: one declaration per field, everything else derived from it."""

from __future__ import annotations

import dataclasses

import pytest

from fedcore.server.optimizers import ServerOptimizer
from fedcore.server.settings import ServerSettings
from infra.stack import SETTING_ENV, LocalStack


def test_every_field_declares_a_distinct_environment_variable() -> None:
    names = ServerSettings.env_names()
    assert list(names) == [f.name for f in dataclasses.fields(ServerSettings)]
    assert len(set(names.values())) == len(names)
    assert all(v.isupper() and v.isidentifier() for v in names.values())
    assert names == SETTING_ENV  # the local stack sets exactly these


def test_from_env_of_nothing_is_the_defaults() -> None:
    assert ServerSettings.from_env({}) == ServerSettings()


def test_from_env_reads_every_variable_by_its_field_type() -> None:
    """GIVEN a value different from the default for every setting, written as the template
    would (strings) THEN from_env reads each into its field, with the field's type."""
    changed = {
        "cohort_size": 7, "min_cohort_size": 2, "round_deadline_s": 30.5,
        "checkin_wait_s": 5.0, "checkin_ttl_s": 99.0, "stuck_after_s": 7.5, "server_lr": 0.5,
        "staleness_weight": "inverse", "mode": "secagg", "read_concurrency": 2,
        "short_round_s": 12.0, "secagg_clip": 2.0, "secagg_degree": 3,
        "secagg_max_dropout": 0.2, "dp_user_noise": 1.5, "dp_user_clip": 0.5,
        "dp_delta": 1e-6, "secagg_weight_cap": 100, "plaintext_clip": 5.0,
        "server_optimizer": ServerOptimizer.FEDADAM, "server_momentum": 0.5,
        "server_beta1": 0.8, "server_beta2": 0.9, "server_tau": 1e-2,
        "deadline_margin": 2.0, "deadline_min_s": 20.0, "deadline_max_s": 900.0,
        "deadline_window": 3, "checkins_per_minute": 12, "secagg_colluders": 0,
    }  # fmt: skip
    assert set(changed) == set(ServerSettings.env_names())
    env = ServerSettings.env_for(changed)
    got = ServerSettings.from_env(env)
    for name, value in changed.items():
        assert getattr(got, name) == value and type(getattr(got, name)) is type(value), name


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"COHORT_SIZE": "ten"}, "COHORT_SIZE='ten' is not a valid int"),
        ({"SECAGG_DEGREE": "2.5"}, "SECAGG_DEGREE='2.5' is not a valid int"),
        ({"DP_DELTA": ""}, "DP_DELTA='' is not a valid float"),
        ({"AGGREGATION_MODE": "fast"}, "mode must be one of"),
        ({"SERVER_OPTIMIZER": "sgd"}, "SERVER_OPTIMIZER='sgd' is not a valid ServerOptimizer"),
        ({"SERVER_MOMENTUM": "1.0"}, r"server momentum must be in \[0, 1\)"),
        ({"SERVER_TAU": "0"}, "server tau must be finite and positive"),
    ],
)
def test_a_bad_value_names_its_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerSettings.from_env(env)


def test_env_for_refuses_unknown_keys_and_invalid_combinations() -> None:
    assert ServerSettings.env_for({"cohort_size": 5, "dp_delta": 1e-5}) == {
        "COHORT_SIZE": "5",
        "DP_DELTA": "1e-05",
    }
    with pytest.raises(ValueError, match=r"unknown server settings \['cohort'\]"):
        ServerSettings.env_for({"cohort": 5})
    with pytest.raises(ValueError, match="needs AGGREGATION_MODE=secagg"):
        ServerSettings.env_for({"mode": "plaintext", "dp_user_noise": 1.0})


def test_local_stack_refuses_an_unknown_setting_before_it_starts() -> None:
    """GIVEN a misspelt setting THEN LocalStack raises at once (it used to drop it, and the
    handlers ran with the default)."""
    with pytest.raises(ValueError, match="round_deadline"):
        LocalStack(settings={"round_deadline": 5.0})
    stack = LocalStack(settings={"round_deadline_s": 5.0})  # a known key: nothing starts
    assert stack.settings == {"round_deadline_s": 5.0}
