"""The device gateway in template.yaml: its URL, its role, and that the role is the ceiling.

A presigned URL acts with the gateway function's role, so every key the access
policy (fedcore.access) lets a device touch must be inside the role's grants,
and the role must grant nothing a device or the gateway does not need.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest
from samtranslator.yaml_helper import yaml_parse

from fedcore import access, layout
from fedcore.access import CohortFacts
from fedcore.gateway import nonce_key, token_key, used_key
from fedcore.layout import Kind, Phase

TEMPLATE = Path(__file__).resolve().parents[2] / "template.yaml"
BUCKET = "arn:${AWS::Partition}:s3:::securefl-${AWS::AccountId}-${AWS::Region}-${StackSuffix}"


@pytest.fixture(scope="module")
def resources() -> dict[str, Any]:
    return yaml_parse(TEMPLATE.read_text())["Resources"]


def _text(value: Any) -> str:
    sub = value["Fn::Sub"]
    return sub[0] if isinstance(sub, list) else sub


def grants(resources: dict[str, Any]) -> dict[str, set[str]]:
    """s3 action -> object-key globs ('<bucket>' for the bucket) the gateway role may use."""
    role = resources["GatewayFunctionRole"]["Properties"]
    docs = [p["PolicyDocument"] for p in role.get("Policies", [])]
    for ref in role["ManagedPolicyArns"]:
        docs.append(resources[ref["Ref"]]["Properties"]["PolicyDocument"])
    out: dict[str, set[str]] = {}
    for doc in docs:
        for st in doc["Statement"]:
            if st["Effect"] == "Deny":
                continue  # ProtocolWriteRules: evaluated in test_iam.py
            assert st["Effect"] == "Allow" and "Condition" not in st
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            res = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
            for action in actions:
                if not action.startswith("s3:"):
                    continue
                for r in res:
                    text = _text(r)
                    assert text.startswith(BUCKET), text
                    out.setdefault(action, set()).add(text[len(BUCKET) + 1 :] or "<bucket>")
    return out


def test_gateway_function_has_a_url_and_its_own_role(resources: dict[str, Any]) -> None:
    fn = resources["GatewayFunction"]["Properties"]
    assert fn["Handler"] == "functions.gateway.app.handler"
    # Devices have no AWS credentials: the function authenticates every call by signature.
    assert fn["FunctionUrlConfig"]["AuthType"] == "NONE"
    assert fn["Role"] == {"Fn::GetAtt": ["GatewayFunctionRole", "Arn"]}
    assert fn["Environment"]["Variables"]["POWERTOOLS_SERVICE_NAME"] == "fl-gateway"
    logs = resources["GatewayFunctionRole"]["Properties"]["Policies"][0]["PolicyDocument"]
    (st,) = logs["Statement"]
    assert st["Resource"] == {"Fn::GetAtt": ["GatewayLogGroup", "Arn"]}


def test_gateway_role_grants_exactly_what_devices_and_enrollment_need(
    resources: dict[str, Any],
) -> None:
    member = {
        f"cohorts/c????????/{k}/*"
        for k in ("keys", "shares", "masked", "plain", "consistency", "unmask")
    }
    assert grants(resources) == {
        "s3:ListBucket": {"<bucket>"},
        "s3:GetObject": {"global/*", "clients/*/identity.json", "clients/*/certificate.json",
                         "checkins/*",
                         "cohorts/c????????/config.json", "cohorts/c????????/state/*.json",
                         "cohorts/c????????/keys/*", "cohorts/c????????/shares/*",
                         "cohorts/c????????/consistency/*", "enrollment/*"},
        "s3:PutObject": {"checkins/*", "clients/*/identity.json", "enrollment/used/*",
                         "gateway/nonces/*"} | member,
    }  # fmt: skip


def _sample_keys(me: str, peer: str, cid: str) -> list[str]:
    keys = [
        layout.LATEST_KEY,
        layout.model_key(7),
        layout.identity_key(me),
        layout.identity_key(peer),
        layout.certificate_key(me),
        layout.certificate_key(peer),
        layout.checkin_key(me, "n1"),
        layout.checkin_key(peer, "n1"),
        layout.config_key(cid),
        layout.sum_key(cid, "0123456789abcdef"),
    ]
    keys += [layout.state_key(cid, p) for p in Phase]
    for kind in (Kind.KEYS, Kind.SHARES, Kind.MASKED, Kind.PLAIN, Kind.CONSISTENCY, Kind.UNMASK):
        keys += [layout.member_key(cid, kind, me), layout.member_key(cid, kind, peer)]
    return keys


@pytest.mark.parametrize("mode", ["secagg", "plaintext"])
def test_the_role_is_the_ceiling_of_the_access_policy(resources: dict[str, Any], mode: str) -> None:
    """Every (op, key) access.allowed grants is inside the role; the role denies the rest
    of the server's objects outright (sums, manifests, configs, models: no device writes)."""
    g = grants(resources)
    me, peer, cid = "dev-1", "dev-2", "c00000003"
    facts = CohortFacts(frozenset({me, peer}), mode)
    action = {"get": "s3:GetObject", "head": "s3:GetObject", "put_new": "s3:PutObject"}
    for key in _sample_keys(me, peer, cid):
        for op, act in action.items():
            if access.allowed(me, op, key, cohort=lambda c: facts):
                assert any(fnmatchcase(key, glob) for glob in g[act]), (op, key)
    # Certificates are written by the operator only, never through the gateway.
    for key in [layout.LATEST_KEY, layout.model_key(1), layout.config_key(cid),
                layout.state_key(cid, Phase.RESULT), layout.sum_key(cid, "0" * 16),
                layout.certificate_key(me)]:  # fmt: skip
        assert not any(fnmatchcase(key, glob) for glob in g["s3:PutObject"]), key
    for key in [layout.sum_key(cid, "0" * 16)] + [
        layout.member_key(cid, kind, who)
        for kind in (Kind.MASKED, Kind.PLAIN, Kind.UNMASK)
        for who in (me, peer, "config")
    ]:
        assert not any(fnmatchcase(key, glob) for glob in g["s3:GetObject"]), key
    # The gateway's own records are covered too.
    digest = "0" * 64
    assert any(fnmatchcase(token_key(digest), glob) for glob in g["s3:GetObject"])
    for key in (used_key(digest), nonce_key(me, "n" * 20), layout.identity_key(me)):
        assert any(fnmatchcase(key, glob) for glob in g["s3:PutObject"]), key
    assert "s3:DeleteObject" not in g


def test_gateway_records_expire(resources: dict[str, Any]) -> None:
    rules = resources["DataBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    by_prefix = {
        r.get("Prefix"): r for r in rules if r["Status"] == "Enabled" and "ExpirationInDays" in r
    }
    assert by_prefix["gateway/nonces/"]["ExpirationInDays"] == 1
    # Consumed-token markers must outlive every token (at most 30 days, infra.enroll).
    assert by_prefix["enrollment/"]["ExpirationInDays"] > 30


def test_gateway_has_an_errors_alarm(resources: dict[str, Any]) -> None:
    alarm = resources["GatewayErrorsAlarm"]["Properties"]
    assert alarm["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": "GatewayFunction"}}]
    assert alarm["AlarmActions"] == [{"Ref": "AlarmTopic"}]
