"""README "Security model" claims that no other test proved.

An identity the server cannot swap: devices trust a peer's identity key only if the
operator's certificate of it verifies (``tests/adversary/test_identity.py``). That defence holds only while no role of the
stack can write a certificate: the operator writes ``clients/{id}/certificate.json``
with its own credentials, outside AWS's roles (``fedcore/operator.py``). A gateway or
function role that could create one would certify its own key for any id without one,
and one that could replace one would swap an enrolled device's key. Nor may the
functions' role create an identity: enrolling is the gateway's, with a token.

What a device may read through the gateway (certificates, its cohorts' consistency
signatures), and the bucket policy's TLS floor. The IAM claims are evaluated with
``tests/infra/test_iam.py``'s small IAM evaluator (explicit deny wins, then any allow),
on the template's role policies together with the bucket policy.
"""

from __future__ import annotations

from typing import Any

import pytest
from samtranslator.yaml_helper import yaml_parse

from fedcore import access, layout
from fedcore.access import CohortFacts
from fedcore.layout import Kind
from tests.infra.test_iam import (
    ALLOW_ALL,
    IF_MATCH,
    IF_NONE_MATCH,
    NO_HEADER,
    ROLES,
    TEMPLATE,
    allowed,
    bucket_statements,
    effective,
    explicitly_denied,
)


@pytest.fixture(scope="module")
def resources() -> dict[str, Any]:
    return yaml_parse(TEMPLATE.read_text())["Resources"]


@pytest.mark.parametrize("role", ROLES)
def test_no_role_creates_or_replaces_an_operator_certificate(
    resources: dict[str, Any], role: str
) -> None:
    """GIVEN the aggregation/sweeper role or the gateway role, with the bucket policy WHEN
    it PUTs an operator certificate (creating one with If-None-Match, replacing one with
    If-Match or no header) or deletes one THEN denied: only the operator's own credentials
    write certificates. Replacing one is also an explicit deny (whatever else a role is
    granted later)."""
    for client in ("dev-1", "config"):
        key = layout.certificate_key(client)
        for headers in (NO_HEADER, IF_NONE_MATCH, IF_MATCH):
            assert not effective(resources, role, "s3:PutObject", key, headers), (key, headers)
        for headers in (NO_HEADER, IF_MATCH):
            assert explicitly_denied(resources, role, "s3:PutObject", key, headers), (key, headers)
        for action in ("s3:DeleteObject", "s3:DeleteObjectVersion"):
            assert not effective(resources, role, action, key, NO_HEADER), (action, key)


def test_the_functions_role_writes_nothing_under_clients(resources: dict[str, Any]) -> None:
    """GIVEN the aggregation/sweeper role with the bucket policy WHEN it creates an identity
    (If-None-Match: *) THEN denied: only the gateway enrolls, and only the operator
    certifies, so a compromised function cannot give itself an enrolled id."""
    for client in ("dev-1", "config"):
        key = layout.identity_key(client)
        assert not effective(resources, "FunctionRole", "s3:PutObject", key, IF_NONE_MATCH), key


def test_devices_read_certificates_and_their_cohorts_consistency_signatures() -> None:
    """GIVEN a secure cohort of dev-1 and dev-2 THEN dev-1 may read any operator certificate
    (it checks each peer's before using its keys) and the consistency signatures of its
    cohort's members (it reveals only after a quorum of them); an outsider may not read
    the cohort's signatures."""
    cid = "c00000007"
    facts = CohortFacts(frozenset({"dev-1", "dev-2"}), "secagg")

    def look(c: str) -> CohortFacts | None:
        return facts if c == cid else None

    for op in access.READ_OPS:
        for client in ("dev-1", "dev-2", "dev-9"):
            assert access.allowed("dev-1", op, layout.certificate_key(client), cohort=look)
        for sender in ("dev-1", "dev-2"):
            key = layout.member_key(cid, Kind.CONSISTENCY, sender)
            assert access.allowed("dev-1", op, key, cohort=look), key
            assert not access.allowed("dev-9", op, key, cohort=look), key


def test_the_bucket_policy_refuses_tls_below_1_2(resources: dict[str, Any]) -> None:
    """GIVEN any principal allowed s3:* and the bucket policy WHEN it reads a model over
    TLS 1.1 THEN denied; over TLS 1.2 allowed (DenyOutdatedTls)."""
    admin = [ALLOW_ALL, *bucket_statements(resources)]
    key = layout.model_key(0)
    assert not allowed(admin, "s3:GetObject", key, {"s3:TlsVersion": "1.1"})
    assert allowed(admin, "s3:GetObject", key, {"s3:TlsVersion": "1.2"})
