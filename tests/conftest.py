import pytest
import redis
from django.conf import settings
from django.db import connection
from django.test import override_settings

from orders.services import issue_api_token
from tests.factories import ProductFactory, UserFactory

pytest_plugins = ["tests.sandbox_fixtures"]


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


@pytest.fixture(scope="session", autouse=True)
def payment_provider(sandbox_process):
    """The shop talks to a real sandbox process (started once per session) as its provider and warehouse."""
    override = override_settings(PAYMENT_PROVIDER_URL=sandbox_process.url, FULFILLMENT_API_URL=sandbox_process.url)
    override.enable()
    yield sandbox_process
    override.disable()


@pytest.fixture
def broker():
    """The test broker, emptied, with this process publishing to it for real (eager mode off)."""
    from config.celery import app
    from core import outbox

    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    client.flushdb()
    # A flushed broker is a broker that lost its data: this process checks the epoch key again at once.
    outbox._epoch_checked_at[0] = 0.0
    was_eager = app.conf.task_always_eager
    app.conf.task_always_eager = False
    try:
        yield client
    finally:
        app.conf.task_always_eager = was_eager
        # Retries and unacknowledged messages the workers put back must not leak into the next test.
        client.flushdb()
        client.close()
