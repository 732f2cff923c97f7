"""What each test needs is said by markers; every test needs the real PostgreSQL.

- `redis`: the real Redis (added to every test that uses the `broker` fixture);
- `rabbitmq`: the real RabbitMQ (127.0.0.1:5672, a virtual host per test: added to every test whose
  `broker` is parametrised to "rabbitmq": `@on_both_brokers`);
- `sandbox_process`: the sandbox as a process (added to every test that uses `sandbox_process` or
  `payment_provider`); the others get it in-process behind a `responses` stub (tests/provider_stub.py);
- `worker`, `chaos`: real Celery workers (and Redis, and the sandbox process);
- `e2e`, `browser`: every test under tests/e2e and tests/browser (real processes, Redis, the sandbox
  process, chromium); `compose`: tests/compose, a Docker engine of its own.

Two kinds of test need nothing more but stay out of the unit tier (the tier is meant to take a minute):
- `transactional`: added to a test with `django_db(transaction=True)` (it commits for real, and ends with a
  flush of every table);
- `process`: written on a test that starts a process of its own (`manage.py` in a fresh interpreter, `make`,
  promtool, Flower, a fork).

A test with none of these is marked `unit`: it runs on PostgreSQL alone, inside a transaction rolled back
after it (a dead letter is recorded on a connection of its own, as in production: `dead_letters_forgotten`),
with Celery's `memory://` broker (eager tasks never reach it) and the stubbed sandbox.
`pytest -m unit` is the unit tier.
"""

from contextlib import ExitStack
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.db import connection
from django.test import override_settings

from accounts.services import issue_api_token
from tests.brokers import celery_broker
from tests.factories import ProductFactory, UserFactory

pytest_plugins = ["tests.sandbox_fixtures", "tests.after_sale"]

TESTS = Path(__file__).resolve().parent
# What a test may need beyond PostgreSQL; a test with none of them is a unit test.
NEEDS = ("redis", "rabbitmq", "sandbox_process", "worker", "chaos", "e2e", "browser", "compose")
# Needs nothing more, but takes seconds: the property-based suites (schemathesis, a few Hypothesis tests).
# `make test` runs them, the unit tier does not; nor does it run the KINDS (the module's docstring).
SLOW = ("fuzz",)
KINDS = ("transactional", "process")
# What makes a test commit for real, as pytest-django tells it: these fixtures, or django_db(True) (positional),
# django_db(transaction=True) or django_db(reset_sequences=True).
TRANSACTIONAL_FIXTURES = {
    "transactional_db",
    "django_db_reset_sequences",
    "django_db_serialized_rollback",
    "live_server",
}
NEEDS_REDIS = ("redis", "worker", "chaos", "e2e", "browser")
NEEDS_SANDBOX_PROCESS = ("sandbox_process", "worker", "chaos", "e2e", "browser")
# By folder, so that a test added there without its marker never passes for a unit test (`make test-unit` does not
# even collect these folders).
TIER_DIRECTORIES = {"e2e": "e2e", "browser": "browser", "compose": "compose"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark each test with what it needs (before `-m` selects), and `unit` when it needs nothing but PostgreSQL."""
    for item in items:
        try:
            directory = Path(item.path).resolve().relative_to(TESTS).parts[0]
        except ValueError:
            directory = ""
        if directory in TIER_DIRECTORIES:
            item.add_marker(TIER_DIRECTORIES[directory])
        if item.get_closest_marker("compose"):
            continue
        fixtures = set(getattr(item, "fixturenames", ()))
        if "broker" in fixtures:
            item.add_marker("redis")
            if getattr(item, "callspec", None) and item.callspec.params.get("broker") == "rabbitmq":
                item.add_marker("rabbitmq")
        if fixtures & {"sandbox_process", "payment_provider"}:
            item.add_marker("sandbox_process")
        if fixtures & TRANSACTIONAL_FIXTURES or commits(item.get_closest_marker("django_db")):
            item.add_marker("transactional")
        if not any(item.get_closest_marker(name) for name in (*NEEDS, *SLOW, *KINDS)):
            item.add_marker("unit")


def commits(db) -> bool:
    """Whether a django_db marker asks for a transactional database (pytest-django's own reading of it)."""
    if db is None:
        return False
    return bool((db.args and db.args[0]) or db.kwargs.get("transaction") or db.kwargs.get("reset_sequences"))


def needs(item, markers) -> bool:
    return any(item.get_closest_marker(name) for name in markers)


def pytest_sessionfinish(session):
    from tests.brokers import wait_for_vhost_deletions

    wait_for_vhost_deletions()


@pytest.fixture(scope="session", autouse=True)
def real_services_are_up():
    """The suite runs on the real PostgreSQL (and Redis where a test needs it: `redis_is_up`)."""
    assert settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"


def _flush_by_delete(original):
    """PostgreSQL's flush as one DELETE a table, in the flush's one transaction, instead of one TRUNCATE of them all.

    Every transactional test (`transactional_db`: a real worker or a second connection must see its rows) ends
    with Django's flush. TRUNCATE makes new files for each of the ~35 tables and their indexes: 0.58 s a flush
    here against 0.02 s for DELETE on the few rows a test leaves (measured with `manage.py flush`; on the 67
    transactional tests then in the unit tier, their teardowns went from 29 s to 3 s). Both take the same lock
    first. The foreign keys Django makes are DEFERRABLE INITIALLY DEFERRED, so the order of the DELETEs does not
    matter: the keys are checked at the commit, when every table is empty (tests/test_flush.py checks both).
    Sequences are not reset by either (`reset_sequences` and CASCADE keep Django's TRUNCATE).
    """

    def sql_flush(self, style, tables, *, reset_sequences=False, allow_cascade=False):
        if reset_sequences or allow_cascade:
            return original(self, style, tables, reset_sequences=reset_sequences, allow_cascade=allow_cascade)
        if not tables:
            return []
        names = [style.SQL_FIELD(self.quote_name(table)) for table in tables]
        # The lock TRUNCATE takes, on every table at once: a worker still writing is waited for, never half deleted.
        lock = f"{style.SQL_KEYWORD('LOCK TABLE')} {', '.join(names)} {style.SQL_KEYWORD('IN ACCESS EXCLUSIVE MODE')};"
        return [lock, *(f"{style.SQL_KEYWORD('DELETE FROM')} {name};" for name in names)]

    return sql_flush


@pytest.fixture(scope="session", autouse=True)
def flush_is_a_delete():
    """Transactional tests' flush deletes rows instead of truncating tables (`_flush_by_delete`). Whether every
    foreign key waits for the commit is checked by tests/test_flush.py."""
    from django.db.backends.postgresql.operations import DatabaseOperations

    original = DatabaseOperations.sql_flush
    DatabaseOperations.sql_flush = _flush_by_delete(original)  # type: ignore[method-assign]
    yield
    DatabaseOperations.sql_flush = original  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def redis_is_up():
    """A test that needs Redis and finds none fails here, loudly: never skipped."""
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL, socket_connect_timeout=3)
    try:
        client.ping()
    finally:
        client.close()


@pytest.fixture(autouse=True)
def tier_services(request):
    """Per test: Redis (checked) for a test that needs it, else the in-memory broker: no unit test reaches Redis."""
    item = request.node
    if item.get_closest_marker("compose"):
        yield
    elif needs(item, NEEDS_REDIS):
        request.getfixturevalue("redis_is_up")
        yield
    else:
        with celery_broker("memory://"):
            yield


@pytest.fixture(autouse=True)
def provider_in_use(request):
    """The provider and warehouse the shop calls in this test: the sandbox in-process behind the `responses` stub,
    or, for a test that needs it (other processes call it, or it is the exactly-once referee of e2e and chaos
    tests), the session's real sandbox process. Either has `.url`; the `sandbox` fixture's client works on both."""
    item = request.node
    if item.get_closest_marker("compose"):
        yield None
        return
    with ExitStack() as stack:
        if needs(item, NEEDS_SANDBOX_PROCESS):
            target = request.getfixturevalue("sandbox_process")
        else:
            target = request.getfixturevalue("provider_stub")
            target.forget_calls()
            stack.enter_context(target.serving())
        stack.enter_context(override_settings(PAYMENT_PROVIDER_URL=target.url, FULFILLMENT_API_URL=target.url))
        yield target


@pytest.fixture(autouse=True)
def fresh_cache():
    """The cache holds allauth's rate limits (30 sign-ins a minute per address...): each test starts with none."""
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


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


@pytest.fixture(scope="session")
def payment_provider(sandbox_process):
    """The real sandbox process (started once per session), for processes the test starts (workers, gunicorn)."""
    return sandbox_process


@pytest.fixture
def broker(request):
    """The test broker, emptied, with this process publishing to it for real (eager mode off).

    Redis by default (the test Redis database, flushed before and after); a test parametrised with
    `tests.brokers.on_both_brokers` also runs on RabbitMQ, in a virtual host made for it and deleted after it.
    Either way the fixture is a tests.brokers.TestBroker: `.kind`, `.url`, `.depth(queue)`, `.unacked()`, and on Redis
    the client's own commands (`broker.llen("critical")`).
    """
    from config.celery import app
    from core import outbox
    from tests.brokers import RabbitVhost, TestBroker

    kind = getattr(request, "param", "redis")
    was_eager = app.conf.task_always_eager
    with ExitStack() as stack:
        if kind == "rabbitmq":
            vhost = stack.enter_context(RabbitVhost.made())
            stack.enter_context(celery_broker(vhost.url))
            handle = TestBroker(kind, vhost.url, vhost=vhost)
        else:
            handle = TestBroker(kind, settings.CELERY_BROKER_URL)
            handle.flush()
            stack.callback(handle.flush)  # retries and unacknowledged messages must not leak into the next test
            # A flushed broker is a broker that lost its data: this process checks the epoch key again at once.
            outbox._epoch_checked_at[0] = 0.0
        stack.callback(handle.close)
        app.conf.task_always_eager = False
        try:
            yield handle
        finally:
            app.conf.task_always_eager = was_eager
