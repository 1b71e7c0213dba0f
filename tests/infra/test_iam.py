"""The template's IAM, evaluated: which role may create, replace, delete and read which key.

README "Security model" cites these tests. They parse template.yaml with the loader the other
infra tests use (samtranslator's ``yaml_parse``, which turns CloudFormation tags into
``Fn::`` dicts) and evaluate the policies for concrete requests on keys of the bucket layout
(``fedcore.layout``, ``fedcore.gateway``), as IAM does for a request within one account: an
explicit Deny in any applicable policy wins, else any Allow allows, else it is denied.

Why a small evaluator rather than assertions on the statements' text: the guarantees are
about requests ("a PUT without If-None-Match on a check-in is refused"), and several
statements combine to give each one. The write-once rules are checked as *explicit* denies,
by evaluating each role with an extra ``Allow s3:*`` on the whole bucket: they must hold
whatever else the role is granted, now or by a later edit. Condition operators other than
the ones the template uses fail the test instead of being ignored.

moto does not evaluate IAM, so nothing else in the suite exercises these policies.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest
from samtranslator.yaml_helper import yaml_parse

from fedcore import layout
from fedcore.gateway import nonce_key, token_key, used_key
from fedcore.layout import Kind, Phase

TEMPLATE = Path(__file__).resolve().parents[2] / "template.yaml"
BUCKET_ARN = "arn:${AWS::Partition}:s3:::securefl-${AWS::AccountId}-${AWS::Region}-${StackSuffix}"

# Condition keys of a request: the conditional headers it carries (S3 exposes If-None-Match
# and If-Match on PutObject as s3:if-none-match and s3:if-match), over TLS 1.3.
IF_NONE_MATCH = {"s3:if-none-match": "*"}
IF_MATCH = {"s3:if-match": '"0123456789abcdef0123456789abcdef"'}
NO_HEADER: dict[str, str] = {}
TLS = {"aws:SecureTransport": "true", "s3:TlsVersion": "1.3"}

ME, PEER, CID = "dev-1", "dev-2", "c00000003"
DIGEST = "0" * 64
# Client ids chosen so that a sloppy glob (cohorts/*/config.json, cohorts/*/state/*.json,
# cohorts/*/keys/*) would match their input or reveal: IAM's * also matches "/".
TRICKY_IDS = ("config", "state", "keys", "shares")

# Roles the template gives S3 access to; test_every_role_with_s3_access_is_checked keeps
# this list complete.
ROLES = ("FunctionRole", "GatewayFunctionRole")


# --------------------------------------------------------------------------- the layout


def write_once_keys() -> list[str]:
    """One key of every write-once kind (DESIGN.md section 3 and the gateway's records)."""
    keys = [
        layout.model_key(0),
        layout.model_key(7),
        layout.optimizer_key(7, CID, "0123456789abcdef"),  # state a commit may name (DESIGN.md 4.6)
        layout.identity_key(ME),
        layout.certificate_key(ME),
        layout.checkin_key(ME, "n1"),
        layout.config_key(CID),
        layout.sum_key(CID, "0123456789abcdef"),
        token_key(DIGEST),
        used_key(DIGEST),
        nonce_key(ME, "n" * 20),
    ]
    keys += [layout.state_key(CID, p) for p in Phase]
    for kind in (Kind.KEYS, Kind.SHARES, Kind.MASKED, Kind.PLAIN, Kind.CONSISTENCY, Kind.UNMASK):
        keys += [layout.member_key(CID, kind, c) for c in (ME, PEER, *TRICKY_IDS)]
    return keys


def private_keys() -> list[str]:
    """What the gateway must never read: inputs, reveals and masked sums (README)."""
    keys = [layout.sum_key(CID, "0123456789abcdef"), layout.sum_key(CID, "f" * 16)]
    for kind in (Kind.MASKED, Kind.PLAIN, Kind.UNMASK):
        keys += [layout.member_key(CID, kind, c) for c in (ME, PEER, *TRICKY_IDS)]
    return keys


# What each role's code creates (put_new), so the denies are shown not to break it.
CREATES = {
    "FunctionRole": [
        layout.model_key(8),
        layout.config_key(CID),
        layout.sum_key(CID, "0123456789abcdef"),
        *(layout.state_key(CID, p) for p in Phase),
    ],
    "GatewayFunctionRole": [
        layout.checkin_key(ME, "n1"),
        layout.identity_key(ME),
        used_key(DIGEST),
        nonce_key(ME, "n" * 20),
        *(
            layout.member_key(CID, kind, ME)
            for kind in (
                Kind.KEYS,
                Kind.SHARES,
                Kind.MASKED,
                Kind.PLAIN,
                Kind.CONSISTENCY,
                Kind.UNMASK,
            )
        ),
    ],
}


# --------------------------------------------------------------------------- the evaluator


def _as_list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else [x]


def _resource_glob(value: Any) -> str | None:
    """The object-key glob of an S3 resource ('<bucket>' for the bucket), None if not S3."""
    if value == {"Fn::GetAtt": ["DataBucket", "Arn"]}:
        return "<bucket>"
    if not (isinstance(value, dict) and "Fn::Sub" in value):
        return None
    sub = value["Fn::Sub"]
    text = sub[0] if isinstance(sub, list) else sub
    for prefix in (BUCKET_ARN, "${DataBucket.Arn}"):
        if text == prefix:
            return "<bucket>"
        if text.startswith(prefix + "/"):
            return text[len(prefix) + 1 :]
    return None


def _condition_holds(condition: dict[str, Any], context: dict[str, str]) -> bool:
    """IAM semantics for the operators the template uses: every operator and key must hold."""
    for operator, pairs in condition.items():
        for key, expected in pairs.items():
            values = [str(v).lower() for v in _as_list(expected)]
            present = key in context
            if operator == "Null":
                ok = ("false" if present else "true") in values
            elif operator == "Bool":
                ok = present and context[key].lower() in values
            elif operator == "NumericLessThan":
                ok = present and any(float(context[key]) < float(v) for v in values)
            else:
                raise AssertionError(f"the evaluator does not know condition {operator}")
            if not ok:
                return False
    return True


def _applies(st: dict[str, Any], action: str, key: str, context: dict[str, str]) -> bool:
    assert "NotAction" not in st and "NotResource" not in st, st
    if "Principal" in st:
        assert st["Principal"] == "*", f"unexpected principal in {st.get('Sid')}"
    if not any(fnmatchcase(action, a) for a in _as_list(st["Action"])):
        return False
    globs = [g for g in map(_resource_glob, _as_list(st["Resource"])) if g is not None]
    if not any(fnmatchcase(key, g) for g in globs):
        return False
    return _condition_holds(st.get("Condition", {}), context)


def allowed(
    statements: list[dict[str, Any]], action: str, key: str, headers: dict[str, str]
) -> bool:
    """Would a request ``action`` on ``key`` carrying ``headers`` be allowed?"""
    context = {**TLS, **headers}
    hits = [st for st in statements if _applies(st, action, key, context)]
    if any(st["Effect"] == "Deny" for st in hits):
        return False
    return any(st["Effect"] == "Allow" for st in hits)


@pytest.fixture(scope="module")
def resources() -> dict[str, Any]:
    return yaml_parse(TEMPLATE.read_text())["Resources"]


def _role_documents(resources: dict[str, Any], role: str) -> Iterator[dict[str, Any]]:
    props = resources[role]["Properties"]
    for pol in props.get("Policies", []):
        yield pol["PolicyDocument"]
    for ref in props.get("ManagedPolicyArns", []):
        yield resources[ref["Ref"]]["Properties"]["PolicyDocument"]


def role_statements(resources: dict[str, Any], role: str) -> list[dict[str, Any]]:
    return [st for doc in _role_documents(resources, role) for st in _as_list(doc["Statement"])]


def bucket_statements(resources: dict[str, Any]) -> list[dict[str, Any]]:
    (policy,) = [
        r["Properties"]["PolicyDocument"]
        for r in resources.values()
        if r["Type"] == "AWS::S3::BucketPolicy"
        and r["Properties"]["Bucket"] == {"Ref": "DataBucket"}
    ]
    return _as_list(policy["Statement"])


# A grant of everything on the bucket, added to a role's policies to check that its denies
# are explicit (hold whatever the role is allowed), or standing for an admin principal.
ALLOW_ALL = {
    "Effect": "Allow",
    "Action": "s3:*",
    "Resource": [{"Fn::Sub": BUCKET_ARN}, {"Fn::Sub": BUCKET_ARN + "/*"}],
}


def explicitly_denied(
    resources: dict[str, Any], role: str, action: str, key: str, headers: dict[str, str]
) -> bool:
    """Denied by the role's own policies even if it were granted s3:* on the whole bucket."""
    return not allowed([*role_statements(resources, role), ALLOW_ALL], action, key, headers)


def effective(
    resources: dict[str, Any], role: str, action: str, key: str, headers: dict[str, str]
) -> bool:
    """The role's policies and the bucket policy together (what S3 would decide)."""
    statements = [*role_statements(resources, role), *bucket_statements(resources)]
    return allowed(statements, action, key, headers)


# --------------------------------------------------------------------------- tests


def test_every_role_with_s3_access_is_checked(resources: dict[str, Any]) -> None:
    with_s3 = {
        name
        for name, res in resources.items()
        if res["Type"] == "AWS::IAM::Role"
        and any(
            a.startswith("s3:")
            for st in role_statements(resources, name)
            for a in _as_list(st["Action"])
        )
    }
    assert with_s3 == set(ROLES)


@pytest.mark.parametrize("role", ROLES)
def test_no_role_writes_a_write_once_key_without_if_none_match(
    resources: dict[str, Any], role: str
) -> None:
    """GIVEN any role, even granted s3:* WHEN it PUTs a write-once key without
    If-None-Match (no header, or If-Match, which would replace the object) THEN denied."""
    for key in write_once_keys():
        for headers in (NO_HEADER, IF_MATCH):
            assert explicitly_denied(resources, role, "s3:PutObject", key, headers), (key, headers)


@pytest.mark.parametrize("role", ROLES)
def test_each_role_still_creates_what_its_code_writes(resources: dict[str, Any], role: str) -> None:
    """GIVEN the role and the bucket policy WHEN the role creates (If-None-Match: *) a key its
    code writes THEN allowed: the denies leave the protocol working."""
    for key in CREATES[role]:
        assert effective(resources, role, "s3:PutObject", key, IF_NONE_MATCH), key


def test_the_functions_role_creates_no_members_object(resources: dict[str, Any]) -> None:
    """GIVEN the aggregation functions' role WHEN it creates a member's message or input,
    whatever the client id (``config`` and ``state`` included: an IAM ``*`` matches ``/``, so
    ``cohorts/*/config.json`` matched ``cohorts/c.../unmask/config.json``) THEN not allowed:
    members' objects are the members' own word."""
    for kind in (Kind.KEYS, Kind.SHARES, Kind.MASKED, Kind.PLAIN, Kind.CONSISTENCY, Kind.UNMASK):
        for client in (ME, *TRICKY_IDS):
            key = layout.member_key(CID, kind, client)
            assert not effective(resources, "FunctionRole", "s3:PutObject", key, IF_NONE_MATCH), key


@pytest.mark.parametrize("role", ROLES)
def test_the_pointer_moves_only_by_compare_and_swap(resources: dict[str, Any], role: str) -> None:
    """GIVEN any role, even granted s3:* WHEN it PUTs global/latest.json without If-Match
    THEN denied (infra.bootstrap creates it with the operator's credentials); the
    aggregation functions' CAS with If-Match is allowed."""
    for headers in (NO_HEADER, IF_NONE_MATCH):
        assert explicitly_denied(resources, role, "s3:PutObject", layout.LATEST_KEY, headers)
    cas = effective(resources, role, "s3:PutObject", layout.LATEST_KEY, IF_MATCH)
    assert cas == (role == "FunctionRole")


@pytest.mark.parametrize("role", ROLES)
def test_no_role_deletes_or_overwrites_global_versions(
    resources: dict[str, Any], role: str
) -> None:
    """GIVEN any role, even granted s3:* WHEN it deletes any object or version under global/,
    or PUTs a version without If-None-Match THEN denied."""
    versions = [
        layout.model_key(0),
        layout.model_key(7),
        layout.optimizer_key(7, CID, "0123456789abcdef"),
    ]
    for key in [*versions, layout.LATEST_KEY]:
        for action in ("s3:DeleteObject", "s3:DeleteObjectVersion"):
            assert explicitly_denied(resources, role, action, key, NO_HEADER), (action, key)
    for key in versions:
        for headers in (NO_HEADER, IF_MATCH):
            assert explicitly_denied(resources, role, "s3:PutObject", key, headers), key


def test_no_principal_deletes_or_overwrites_a_committed_version(
    resources: dict[str, Any],
) -> None:
    """GIVEN an admin allowed s3:* (or any role added later) and the bucket policy WHEN it
    deletes a version or PUTs one without If-None-Match, or PUTs the pointer with neither
    condition THEN denied; creating a version and bootstrap's create of the pointer pass."""
    admin = [ALLOW_ALL, *bucket_statements(resources)]
    for key in (layout.model_key(0), layout.model_key(7)):
        for action in ("s3:DeleteObject", "s3:DeleteObjectVersion"):
            assert not allowed(admin, action, key, NO_HEADER), (action, key)
        assert not allowed(admin, "s3:PutObject", key, NO_HEADER), key
        assert not allowed(admin, "s3:PutObject", key, IF_MATCH), key
        assert allowed(admin, "s3:PutObject", key, IF_NONE_MATCH), key
    assert not allowed(admin, "s3:PutObject", layout.LATEST_KEY, NO_HEADER)
    assert allowed(admin, "s3:PutObject", layout.LATEST_KEY, IF_MATCH)
    assert allowed(admin, "s3:PutObject", layout.LATEST_KEY, IF_NONE_MATCH)
    assert not allowed(admin, "s3:GetObject", layout.model_key(0), {"aws:SecureTransport": "false"})


def test_gateway_cannot_read_inputs_reveals_or_sums(resources: dict[str, Any]) -> None:
    """GIVEN the gateway's role (the ceiling of every presigned URL) WHEN it GETs (or HEADs:
    same permission) a masked or plain input, a reveal or a masked sum THEN denied, for
    client ids that a loose glob would confuse with configs, manifests or key messages."""
    statements = role_statements(resources, "GatewayFunctionRole")
    for key in private_keys():
        assert not allowed(statements, "s3:GetObject", key, NO_HEADER), key


def test_gateway_reads_what_devices_and_enrollment_need(resources: dict[str, Any]) -> None:
    """Control for the test above: the narrowing keeps every read fedcore.access presigns
    and the gateway's own reads (tokens, consumed markers, identities, configs)."""
    statements = role_statements(resources, "GatewayFunctionRole")
    for key in [
        layout.LATEST_KEY,
        layout.model_key(7),
        layout.identity_key(PEER),
        layout.checkin_key(ME, "n1"),
        layout.config_key(CID),
        *(layout.state_key(CID, p) for p in Phase),
        *(
            layout.member_key(CID, k, c)
            for k in (Kind.KEYS, Kind.SHARES, Kind.CONSISTENCY)
            for c in (ME, PEER)
        ),
        token_key(DIGEST),
        used_key(DIGEST),
    ]:
        assert allowed(statements, "s3:GetObject", key, NO_HEADER), key


def _expiring_rules(resources: dict[str, Any]) -> Iterator[dict[str, Any]]:
    rules = resources["DataBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    for rule in rules:
        if rule["Status"] != "Enabled":
            continue
        if {"ExpirationInDays", "ExpirationDate", "NoncurrentVersionExpiration",
            "NoncurrentVersionExpirationInDays"} & set(rule):  # fmt: skip
            yield rule


def test_lifecycle_never_expires_a_model_version(resources: dict[str, Any]) -> None:
    """GIVEN the bucket's lifecycle rules THEN none expires objects or noncurrent versions
    under global/v*: a version that someone with rights to change the policies replaced or
    deleted stays as a noncurrent version. The pointer's CAS history does expire."""
    rules = list(_expiring_rules(resources))
    for rule in rules:
        prefix = rule.get("Prefix", "")
        assert "Filter" not in rule, rule["Id"]  # only Prefix-scoped rules are modelled here
        for key in (layout.model_key(7), layout.optimizer_key(7, CID, "0123456789abcdef")):
            assert not key.startswith(prefix), f"{rule['Id']} expires {key}"
    noncurrent = {r.get("Prefix") for r in rules if "NoncurrentVersionExpiration" in r}
    assert layout.LATEST_KEY in noncurrent, json.dumps(sorted(map(str, noncurrent)))
