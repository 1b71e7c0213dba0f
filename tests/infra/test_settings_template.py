"""template.yaml against ``ServerSettings``, in both directions.

The dataclass is the one declaration of each server setting (its field, default and
environment variable). The template must offer every one of them as a Parameter with the
same default, wired into the Environment of each function that reads settings, and must
set no variable that is neither a setting nor a known non-setting. Offline and fast: only
the YAML is parsed (the SAM transform, cfn-lint and checkov run in test_template.py).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from samtranslator.yaml_helper import yaml_parse

from fedcore.server.settings import ServerSettings

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "template.yaml"
# Variables the template may set that are not ServerSettings: the bucket (functions.runtime,
# functions.gateway.app) and powertools' own configuration.
NON_SETTINGS = {"BUCKET"}
NON_SETTING_PREFIXES = ("POWERTOOLS_",)
# Settings read by the functions whose handler builds a coordinator through this module.
SETTINGS_READER = "functions.runtime"


@pytest.fixture(scope="module")
def sam_template() -> dict[str, Any]:
    return yaml_parse(TEMPLATE.read_text())


def _functions(tpl: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: res
        for name, res in tpl["Resources"].items()
        if res["Type"] == "AWS::Serverless::Function"
    }


def _environment(tpl: dict[str, Any], function: str) -> dict[str, Any]:
    """The function's variables as Lambda sees them: Globals, overridden by its own."""
    merged = dict(tpl["Globals"]["Function"].get("Environment", {}).get("Variables", {}))
    props = tpl["Resources"][function]["Properties"]
    merged.update(props.get("Environment", {}).get("Variables", {}))
    return merged


def _reads_settings(function: dict[str, Any]) -> bool:
    """Whether the function's handler module builds its coordinator from the environment."""
    module = function["Properties"]["Handler"].rsplit(".", 1)[0]
    source = REPO / (module.replace(".", "/") + ".py")
    return SETTINGS_READER in source.read_text()


def setting_mismatches(tpl: dict[str, Any]) -> list[str]:
    """Every way the template and ServerSettings disagree (empty when they agree)."""
    problems: list[str] = []
    params = tpl.get("Parameters", {})
    defaults = {f.name: f.default for f in dataclasses.fields(ServerSettings)}
    names = ServerSettings.env_names()
    readers = [n for n, res in _functions(tpl).items() if _reads_settings(res)]
    if not readers:
        problems.append("no function reads settings (handler modules moved?)")
    # ServerSettings -> template: each setting from a Parameter with the dataclass default.
    for function in readers:
        env = _environment(tpl, function)
        for field, var in names.items():
            if var not in env:
                problems.append(f"{function}: {var} ({field}) is not in its Environment")
                continue
            ref = env[var]
            if not (isinstance(ref, dict) and set(ref) == {"Ref"} and ref["Ref"] in params):
                problems.append(f"{function}: {var} is {ref!r}, not a !Ref to a Parameter")
                continue
            param = params[ref["Ref"]]
            if "Default" not in param:
                problems.append(f"Parameter {ref['Ref']} ({var}) has no Default")
                continue
            default = ServerSettings.parse_env_value(field, str(param["Default"]))
            if default != defaults[field]:
                problems.append(
                    f"Parameter {ref['Ref']} defaults to {param['Default']!r}, "
                    f"ServerSettings.{field} to {defaults[field]!r}"
                )
            for allowed in param.get("AllowedValues", []):
                try:
                    ServerSettings.from_env({var: str(allowed)})
                except ValueError as exc:
                    problems.append(f"Parameter {ref['Ref']} allows {allowed!r}: {exc}")
    # Template -> ServerSettings: nothing set that no code declares.
    known = set(names.values()) | NON_SETTINGS
    for function in _functions(tpl):
        for var in _environment(tpl, function):
            if var not in known and not var.startswith(NON_SETTING_PREFIXES):
                problems.append(f"{function}: {var} is neither a ServerSettings variable nor known")
    return problems


def test_template_offers_every_server_setting_with_the_dataclass_default(
    sam_template: dict[str, Any],
) -> None:
    """GIVEN template.yaml and ServerSettings THEN every setting is a Parameter with the same
    default, wired into the aggregator's and the sweeper's Environment, and the template
    sets no variable beyond the settings, BUCKET and POWERTOOLS_*."""
    assert {n for n, r in _functions(sam_template).items() if _reads_settings(r)} >= {
        "AggregatorFunction",
        "SweeperFunction",
    }
    assert setting_mismatches(sam_template) == []


def test_user_level_dp_can_be_switched_on_by_parameter(sam_template: dict[str, Any]) -> None:
    """The reason for the check above: a deployment turns user-level DP on by Parameters."""
    env = _environment(sam_template, "AggregatorFunction")
    for var in ("DP_USER_NOISE", "DP_USER_CLIP", "DP_DELTA"):
        assert env[var]["Ref"] in sam_template["Parameters"]


def _without_setting(tpl: dict[str, Any], var: str) -> dict[str, Any]:
    out = copy.deepcopy(tpl)
    del out["Globals"]["Function"]["Environment"]["Variables"][var]
    return out


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda t: _without_setting(t, "DP_USER_NOISE"), "DP_USER_NOISE (dp_user_noise) is not"),
        (
            lambda t: t["Parameters"]["CohortSize"].update(Default=7),
            "Parameter CohortSize defaults to 7",
        ),
        (
            lambda t: t["Globals"]["Function"]["Environment"]["Variables"].update(COHORT=1),
            "COHORT is neither",
        ),
        (
            lambda t: t["Resources"]["SweeperFunction"]["Properties"]["Environment"][
                "Variables"
            ].update(READ_CONCURRENCY="8"),
            "SweeperFunction: READ_CONCURRENCY is '8', not a !Ref",
        ),
        (
            lambda t: t["Parameters"]["AggregationMode"]["AllowedValues"].append("fast"),
            "AggregationMode allows 'fast'",
        ),
    ],
    ids=["setting-missing", "default-drifted", "unknown-variable", "literal", "bad-allowed"],
)
def test_the_check_catches_drift(sam_template: dict[str, Any], mutate: Any, expected: str) -> None:
    """Control for the check above: each kind of drift is reported."""
    tpl = copy.deepcopy(sam_template)
    out = mutate(tpl)
    problems = setting_mismatches(out if isinstance(out, dict) else tpl)
    assert any(expected in p for p in problems), problems
