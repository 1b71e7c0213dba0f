"""SeaweedFS-only tests: ``store``, ``s3_endpoint`` and ``notifications`` are SeaweedFS's here.

The ``seaweed`` server fixture and the scenarios that run on both servers
(``both_backends``) live in tests/conftest.py and the suites they belong to.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def backend() -> str:
    return "seaweed"
