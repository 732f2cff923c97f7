"""The API fuzzed from its own OpenAPI schema (the one /api/docs shows) with schemathesis.

Every operation gets generated requests, valid and invalid, with a shopper's bearer token:
no answer may be a 5xx, and every answer must be a status the schema declares, with the
content type and body shape it declares. Bounded and derandomized, so CI runs the same
examples each time.
"""

import hypothesis
import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from accounts.services import issue_api_token
from tests.factories import OrderFactory, ProductFactory, UserFactory

# Some 20 s on two cores: in `make test`, not in the one-minute unit tier (`pytest -m fuzz` alone).
pytestmark = [pytest.mark.django_db, pytest.mark.fuzz]

CHECKS = [
    schemathesis.checks.not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


# The schema /api/docs shows, served by the app in-process; the generated requests go to the same WSGI app.
schema = schemathesis.openapi.from_wsgi("/api/openapi.json", WSGIHandler())


@pytest.fixture(autouse=True)
def in_process_app(settings, tmp_path):
    """Requests share the test's connection and transaction, as with Django's test client."""
    settings.MEDIA_ROOT = tmp_path / "media"
    ProductFactory(sku="MUG-001", name="Mug", stock=1000)
    # The start and the end of a request would otherwise close the connection that holds the transaction.
    for signal in (request_started, request_finished):
        signal.disconnect(close_old_connections)
    try:
        yield
    finally:
        for signal in (request_started, request_finished):
            signal.connect(close_old_connections)


@pytest.fixture
def shopper_token():
    shopper = UserFactory()
    # Ids that exist, so generated ids sometimes hit the caller's own rows.
    for _ in range(3):
        OrderFactory(owner=shopper)
    return issue_api_token(user=shopper)


@schema.parametrize()
@hypothesis.settings(
    max_examples=50,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[
        hypothesis.HealthCheck.too_slow,
        hypothesis.HealthCheck.filter_too_much,
        hypothesis.HealthCheck.function_scoped_fixture,
    ],
)
def test_api_conforms_to_its_schema_and_never_answers_5xx(case, shopper_token):
    case.call_and_validate(headers={"Authorization": f"Bearer {shopper_token}"}, checks=CHECKS)
