"""Prometheus metrics for tasks and queues, recorded from Celery signals.

A Counter incremented inside a task body counts per process: a prefork worker runs
tasks in its pool children and gunicorn answers from several workers, each with its
own registry, so a scrape sees one process's share. Here every process writes its
values to files in prometheus_client's multiprocess directory and one reader sums
them (https://prometheus.github.io/client_python/multiprocess/):

- web: gunicorn's master gives its workers `<PROMETHEUS_MULTIPROC_DIR>/web`, emptied
  at start (config/gunicorn.conf.py); `/metrics` (ops.views.metrics) sums it.
- worker: the parent process takes `<PROMETHEUS_MULTIPROC_DIR>/<node name>`, empties
  it before the pool forks, and serves the sum on its own port (`worker_init` below).

prometheus_client chooses multiprocess mode when it is first imported, and the
`celery` command imports it (through Flower's command plugin) before this project
loads: PROMETHEUS_MULTIPROC_DIR must be in the environment a worker starts with.
The Makefile and docker-compose.yml set it.

Queue depth, dead letters and unresolved payment mismatches are read from the broker and
the database when the web `/metrics` is scraped, so they are reported once, not once per worker.
"""

import functools
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from celery import current_app as app
from celery.signals import (
    before_task_publish,
    task_failure,
    task_postrun,
    task_prerun,
    task_rejected,
    task_retry,
    task_success,
    task_unknown,
    worker_init,
    worker_process_shutdown,
)
from django.conf import settings
from django.db import DatabaseError, transaction
from django.db.models import Count
from kombu.exceptions import ChannelError
from kombu.exceptions import OperationalError as BrokerError
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, multiprocess, start_http_server, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from payments.models import PaymentMismatch

from .deadletters import PAYMENT_NEEDS_ATTENTION, REFUND_FAILED
from .models import FailedTask

logger = logging.getLogger(__name__)

# The publish time travels with the message as a header, so the worker can measure the wait.
SENT_AT_HEADER = "sent_at"
UNKNOWN = "unknown"

TASKS = Counter(
    "celery_tasks",
    "Task runs by outcome: success, failure (final), retry, rejected, unknown (unregistered name).",
    ["name", "queue", "status"],
)
TASK_DURATION = Histogram(
    "celery_task_duration_seconds",
    "Time a task ran in its worker process.",
    ["name", "queue"],
    # Orders and notifications take milliseconds; reports run up to their 300 s soft limit.
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
TASK_QUEUE_WAIT = Histogram(
    "celery_task_queue_wait_seconds",
    "Time from publish (or ETA) to the start of the run.",
    ["name", "queue"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600, 1800, 3600),
)

# Start times of the runs in progress in this process, by task id.
_started: dict[str, float] = {}


def multiprocess_mode() -> bool:
    """prometheus_client writes values to files (it found PROMETHEUS_MULTIPROC_DIR when first imported)."""
    return values.ValueClass._multiprocess


def _queue_label(routing_key: str | None) -> str:
    # Bounded label values: a message published with any other routing key is "other".
    if not routing_key:
        return UNKNOWN
    return routing_key if routing_key in app.amqp.queues else "other"


def _queue_of(task: Any, request: Any) -> str:
    delivery_info = getattr(request, "delivery_info", None) or {}
    if routing_key := delivery_info.get("routing_key"):
        return _queue_label(routing_key)
    # The parent process reports hard time limits without the message at hand: use the route.
    return _queue_label(app.amqp.router.route({}, task.name)["queue"].name)


def _is_eager(request: Any) -> bool:
    return bool(getattr(request, "is_eager", False))


def _timestamp(value: object) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


# --- Recording (publishers and worker processes) ----------------------------------


@before_task_publish.connect(dispatch_uid="ops.metrics.stamp_publish_time")
def stamp_publish_time(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    if headers is not None:
        headers[SENT_AT_HEADER] = time.time()


@task_prerun.connect(dispatch_uid="ops.metrics.record_start")
def record_start(task_id: str, task: Any, **kwargs: Any) -> None:
    request = task.request
    if _is_eager(request):
        return
    _started[task_id] = time.monotonic()
    sent_at = _timestamp(getattr(request, SENT_AT_HEADER, None))
    if sent_at is None:
        return
    # A countdown or ETA is not waiting: count from when the task was due.
    eta = _timestamp(getattr(request, "eta", None))
    ready_at = max(sent_at, eta) if eta else sent_at
    TASK_QUEUE_WAIT.labels(task.name, _queue_of(task, request)).observe(max(0.0, time.time() - ready_at))


@task_postrun.connect(dispatch_uid="ops.metrics.record_duration")
def record_duration(task_id: str, task: Any, **kwargs: Any) -> None:
    started = _started.pop(task_id, None)
    if started is not None:
        TASK_DURATION.labels(task.name, _queue_of(task, task.request)).observe(time.monotonic() - started)


def _count_outcome(task: Any, request: Any, status: str) -> None:
    if not _is_eager(request):
        TASKS.labels(task.name, _queue_of(task, request), status).inc()


@task_success.connect(dispatch_uid="ops.metrics.count_success")
def count_success(sender: Any, **kwargs: Any) -> None:
    _count_outcome(sender, sender.request, "success")


@task_failure.connect(dispatch_uid="ops.metrics.count_failure")
def count_failure(sender: Any, **kwargs: Any) -> None:
    # Sent once per final failure: by the pool process for an exception, by the parent
    # for a hard time limit, a lost worker or a rejection.
    _count_outcome(sender, sender.request, "failure")


@task_retry.connect(dispatch_uid="ops.metrics.count_retry")
def count_retry(sender: Any, request: Any = None, **kwargs: Any) -> None:
    _count_outcome(sender, request or sender.request, "retry")


def _count_message(message: Any, status: str, name: str | None = None) -> None:
    name = name or (getattr(message, "headers", None) or {}).get("task")
    # Names from a message the worker could not run are not trusted as label values.
    label = name if name in app.tasks else UNKNOWN
    routing_key = (getattr(message, "delivery_info", None) or {}).get("routing_key")
    TASKS.labels(label, _queue_label(routing_key), status).inc()


@task_rejected.connect(dispatch_uid="ops.metrics.count_rejected")
def count_rejected(message: Any = None, **kwargs: Any) -> None:
    _count_message(message, "rejected")


@task_unknown.connect(dispatch_uid="ops.metrics.count_unknown")
def count_unknown(message: Any = None, name: str | None = None, **kwargs: Any) -> None:
    _count_message(message, "unknown", name)


# --- Serving (the worker's parent process) ----------------------------------------


def worker_metrics_port(nodename: str) -> int | None:
    """The port a worker serves its metrics on: CELERY_METRICS_PORT, else the one for its node name's prefix."""
    if settings.WORKER_METRICS_PORT is not None:
        return settings.WORKER_METRICS_PORT or None
    return settings.WORKER_METRICS_PORTS.get(nodename.partition("@")[0])


@worker_init.connect(dispatch_uid="ops.metrics.serve_worker_metrics")
def serve_worker_metrics(sender: Any, **kwargs: Any) -> None:
    """Give this worker its own empty metrics directory and serve the sum of its processes' files.

    Runs in the parent process before the pool forks, so the pool processes inherit the directory.
    """
    port = worker_metrics_port(sender.hostname)
    if port is None:
        return
    if not multiprocess_mode():
        logger.error(
            "worker %s: PROMETHEUS_MULTIPROC_DIR was not set when the process started, so its pool "
            "processes cannot share metrics; not serving them on port %s",
            sender.hostname,
            port,
        )
        return
    directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]) / sender.hostname
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    _declare_task_series()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    start_http_server(port, addr=settings.WORKER_METRICS_ADDR, registry=registry)
    logger.info("worker %s serves metrics at http://%s:%s/metrics", sender.hostname, settings.WORKER_METRICS_ADDR, port)


def _declare_task_series() -> None:
    # Each task this worker consumes starts with its series at 0: a rate or increase() sees
    # the first failure, which a series that appears only with it would hide.
    consumed = set(app.amqp.queues.consume_from or app.amqp.queues)
    for name in app.tasks:
        if name.startswith("celery."):
            continue
        queue = app.amqp.router.route({}, name)["queue"].name
        if queue in consumed:
            for status in ("success", "failure", "retry"):
                TASKS.labels(name, queue, status)


@worker_process_shutdown.connect(dispatch_uid="ops.metrics.forget_pool_process")
def forget_pool_process(pid: int, **kwargs: Any) -> None:
    # Counters and histograms of a finished process stay in the sum; only its live gauges go.
    if multiprocess_mode():
        multiprocess.mark_process_dead(pid)


# --- Read at scrape time (web /metrics) -------------------------------------------


class QueueCollector(Collector):
    """celery_queue_depth from the broker and celery_dead_letters from the database, read at each scrape."""

    def collect(self) -> Iterator[Metric]:
        yield from self._queue_depth()
        yield from self._dead_letters()

    def _queue_depth(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "celery_queue_depth", "Messages waiting in each queue, priority sub-queues included.", labels=["queue"]
        )
        try:
            with app.connection_for_read() as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
                channel = connection.default_channel
                for queue in app.amqp.queues:
                    depth.add_metric([queue], _message_count(channel, queue))
        except (BrokerError, OSError) as exc:
            # No sample rather than a wrong one: the scrape still serves everything else.
            logger.warning("queue depth not read, broker unreachable: %r", exc)
            return
        yield depth

    def _dead_letters(self) -> Iterator[Metric]:
        try:
            # A savepoint: a failed query must not break a transaction the caller has open.
            with transaction.atomic():
                rows = list(
                    FailedTask.objects.filter(resolved=False)
                    .order_by()
                    .values_list("task_name")
                    .annotate(count=Count("pk"))
                )
        except DatabaseError as exc:
            logger.warning("dead letters not counted: %r", exc)
            return
        # Every task has a series, at 0 when it has none, so a first failure shows as an increase.
        tasks = _task_names()
        counts = dict.fromkeys(sorted(tasks), 0)
        for name, count in rows:
            # A refused message's name is whatever its producer wrote: not trusted as a label value.
            label = name if name in tasks else UNKNOWN
            counts[label] = counts.get(label, 0) + count
        dead_letters = GaugeMetricFamily(
            "celery_dead_letters", "Unresolved dead letters (FailedTask rows), by task.", labels=["name"]
        )
        for name, count in counts.items():
            dead_letters.add_metric([name], count)
        yield dead_letters


@functools.cache
def _task_names() -> frozenset[str]:
    # A web process imports task modules only as it uses them: import them all, once.
    app.autodiscover_tasks(force=True)
    # Plus the dead letters that are not a task's: a payment that needs attention (ops/deadletters.py).
    return frozenset(name for name in app.tasks if not name.startswith("celery.")) | {
        PAYMENT_NEEDS_ATTENTION,
        REFUND_FAILED,
    }


def _message_count(channel: Any, queue: str) -> int:
    # Redis: kombu's channel sums LLEN over the queue's list and its priority lists (`queue`,
    # `queue\x06\x163`, ...: Channel._size and _q_for_pri in kombu/transport/redis.py). RabbitMQ: the
    # ready count of a passive declare; a queue no worker has declared yet is a 404, which py-amqp
    # raises as a kombu ChannelError, and the channel answers the next queue's declare all the same
    # (tests/ops/test_metrics_view.py, on a new virtual host).
    try:
        return channel.queue_declare(queue=queue, passive=True).message_count
    except ChannelError:
        return 0  # Redis drops an empty list: no key, no messages; RabbitMQ: not declared yet


class ReconciliationCollector(Collector):
    """payments_reconciliation_mismatches from the database, read at each scrape (payments/reconciliation.py)."""

    def collect(self) -> Iterator[Metric]:
        try:
            # A savepoint, as for the dead letters.
            with transaction.atomic():
                rows = list(
                    PaymentMismatch.objects.filter(resolved=False)
                    .order_by()
                    .values_list("kind")
                    .annotate(count=Count("pk"))
                )
        except DatabaseError as exc:
            logger.warning("payment mismatches not counted: %r", exc)
            return
        # Every kind has a series, at 0 when it has none.
        counts = dict.fromkeys(PaymentMismatch.Kind.values, 0) | dict(rows)
        mismatches = GaugeMetricFamily(
            "payments_reconciliation_mismatches",
            "Unresolved mismatches between the shop's payments and the provider's ledger, by kind.",
            labels=["kind"],
        )
        for kind, count in counts.items():
            mismatches.add_metric([kind], count)
        yield mismatches


class _ThisProcess(Collector):
    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def web_registry() -> CollectorRegistry:
    """What web `/metrics` serves: every web process's metrics (or this process's), and the scrape-time gauges.

    The scrape-time gauges: queue depth, dead letters and unresolved payment mismatches.
    """
    registry = CollectorRegistry()
    if multiprocess_mode():
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_ThisProcess())
    registry.register(QueueCollector())
    registry.register(ReconciliationCollector())
    return registry
