"""README "Security model" claims that no other test proved: an identity the server cannot swap.

Devices trust a peer's identity key only if the operator's certificate of it verifies
(``tests/adversary/test_identity.py``). That defence holds only while no role of the
stack can write a certificate: the operator writes ``clients/{id}/certificate.json``
with its own credentials, outside AWS's roles (``fedcore/operator.py``). A gateway or
function role that could create one would certify its own key for any id without one,
and one that could replace one would swap an enrolled device's key.

Evaluated with ``tests/infra/test_iam.py``'s small IAM evaluator (explicit deny wins,
then any allow), on the template's role policies together with the bucket policy.
"""

from __future__ import annotations

from typing import Any

import pytest
from samtranslator.yaml_helper import yaml_parse

from fedcore import layout
from tests.infra.test_iam import (
    IF_MATCH,
    IF_NONE_MATCH,
    NO_HEADER,
    ROLES,
    TEMPLATE,
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
