import pytest
import redis
from django.conf import settings
from django.db import connection

from orders.services import issue_api_token
from tests.factories import ProductFactory, UserFactory


@pytest.fixture(scope="session", autouse=True)
def real_services_are_up():
    """The suite runs on the real PostgreSQL and Redis; a missing one is a loud failure."""
    redis.Redis.from_url(settings.CELERY_BROKER_URL, socket_connect_timeout=3).ping()
    assert settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"


@pytest.fixture
def user(db):
    return UserFactory()


@pytest.fixture
def other_user(db):
    return UserFactory()


@pytest.fixture
def product(db):
    return ProductFactory(sku="MUG-001", name="Mug", stock=10)


@pytest.fixture
def api_client(client, user):
    """A test client that sends the user's bearer token on every request."""
    token = issue_api_token(user=user)
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return client


@pytest.fixture
def db_name():
    return connection.settings_dict["NAME"]


@pytest.fixture(autouse=True)
def _no_charge_dispatch_yet(request, monkeypatch):
    """TEMPORARY while the sandbox provider is being wired into the suite: orders stop at confirmed."""
    if "payments_flow" in request.keywords:
        return
    monkeypatch.setattr("orders.services._dispatch_charge", lambda order_id: None)
