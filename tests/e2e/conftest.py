"""Real Celery worker processes, started with the Procfile's command, against the test database and broker.

`start_worker("critical")` starts `celery -A config worker -Q critical ...` on the
pytest database and the test Redis database, waits until it is ready, and stops it
(SIGTERM, then SIGKILL) when the test ends. A failing test shows each worker's log.
Tests that use it need `pytest.mark.django_db(transaction=True)`: the worker only
sees committed rows.
"""

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from urllib.parse import quote

import pytest
from django.conf import settings
from django.db import connection

from tests.stack import MailServer, Processes, Worker, start_celery_worker

WORKERS = pytest.StashKey[list["Worker"]]()


def database_url(settings_dict: Mapping) -> str:
    credentials = quote(settings_dict["USER"] or "", safe="")
    if settings_dict["PASSWORD"]:
        credentials += ":" + quote(settings_dict["PASSWORD"], safe="")
    host = settings_dict["HOST"] or "127.0.0.1"
    port = settings_dict["PORT"] or "5432"
    return f"postgres://{credentials}@{host}:{port}/{settings_dict['NAME']}"


@pytest.fixture
def worker_env(request, django_db_setup, payment_provider) -> dict[str, str]:
    """Production settings, pointed at the pytest database, the test broker and the session's sandbox.

    The test broker is the test's `broker` when it has one (Redis, or RabbitMQ under `on_both_brokers`).
    """
    if "broker" in request.fixturenames:
        request.getfixturevalue("broker")  # first: on RabbitMQ it switches the settings read below
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings.base",
        DEBUG="false",
        SECRET_KEY="e2e-worker-only-" + "s" * 60,
        DATABASE_URL=database_url(connection.settings_dict),
        REDIS_URL=settings.CELERY_BROKER_URL,
        WEBHOOK_SECRET=settings.WEBHOOK_SECRET,
        PAYMENT_PROVIDER_URL=payment_provider.url,
        FULFILLMENT_API_URL=payment_provider.url,
        PYTHONUNBUFFERED="1",
    )
    if settings.BROKER_KIND == "rabbitmq":
        env["CELERY_BROKER_URL"] = settings.CELERY_BROKER_URL
    else:
        env.pop("CELERY_BROKER_URL", None)
    return env


@pytest.fixture
def start_worker(request, broker, worker_env, tmp_path) -> Iterator[Callable[..., Worker]]:
    """Factory: start_worker(*queues, concurrency=1, pool="prefork", name=None, options=(), env=None)."""
    workers: list[Worker] = []
    request.node.stash[WORKERS] = workers
    # Stops every worker at teardown, last started first, even when stopping one of them fails.
    stops = ExitStack()

    def start(
        *queues: str,
        concurrency: int = 1,
        pool: str = "prefork",
        name: str | None = None,
        options: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 30,
    ) -> Worker:
        assert queues, "name the queues the worker consumes"
        name = name or f"{queues[0]}-test"
        worker = start_celery_worker(
            *queues,
            name=name,
            env={**worker_env, **(env or {})},
            log_path=tmp_path / f"{name}-{len(workers)}.log",
            concurrency=concurrency,
            pool=pool,
            options=options,
        )
        workers.append(worker)
        stops.callback(worker.stop)
        worker.wait_ready(ready_timeout)
        return worker

    with stops:
        yield start


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for worker in item.stash.get(WORKERS, []):
            report.sections.append((f"celery worker {worker.name} log", worker.log()))
    return report


@pytest.fixture
def processes(tmp_path) -> Iterator[Processes]:
    """Procfile commands (web, beat, ...) started by the test, all stopped at teardown."""
    running = Processes(tmp_path)
    yield running
    running.stop_all()


@pytest.fixture
def mail() -> Iterator[MailServer]:
    """An SMTP server of the test's own (point EMAIL_URL at `mail.url`), stopped at teardown."""
    server = MailServer()
    server.start()
    yield server
    server.stop()
