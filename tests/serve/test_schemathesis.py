"""Schemathesis (property-based tests from the server's own OpenAPI schema) against a real
server: every operation, examples generated from its request schema, positive and
negative, bounded per operation; no answer may be a 5xx (``not_a_server_error``)."""

from __future__ import annotations

import pytest
import schemathesis
from conftest import API_KEY
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

AUTH = {"Authorization": f"Bearer {API_KEY}"}
pytestmark = pytest.mark.slow  # about 30 s: 9 operations x 30 examples


@pytest.fixture(scope="module")
def api_schema(tiny_server):
    return schemathesis.openapi.from_url(tiny_server.url + "/openapi.json", headers=AUTH)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_error(case):
    case.call_and_validate(headers=AUTH, checks=[not_a_server_error], timeout=60)
