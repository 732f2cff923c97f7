"""Bench-only tasks, loaded by workers only during `make bench` (CELERY_EXTRA_IMPORTS=bench.tasks).

Each probe publishes `[sent_at, started_at, finished_at]` (wall-clock seconds) to a queue the bench
names, on the same broker (Redis or RabbitMQ: the default exchange routes by queue name on both), so
the bench reads queue wait (start - publish) and round trip (its own consumer: bench/brokers.py,
Replies) without results or events. The bench picks the task's queue with `apply_async(queue=...)`.
"""

import functools
import time

from celery import current_app, shared_task
from kombu import Connection, Producer


@functools.cache
def _producer() -> Producer:
    # Called first in a pool process, so each process has its own connection. A plain one: the reply is the
    # bench's measuring device, not the service's work, so no publisher confirms on RabbitMQ.
    return Connection(current_app.conf.broker_url).Producer(serializer="json")


@shared_task(ignore_result=True)
def noop(sent_at: float, reply_to: str) -> None:
    """Do nothing; record when it was published, started and finished."""
    started_at = time.time()
    _producer().publish([sent_at, started_at, time.time()], exchange="", routing_key=reply_to, retry=True)


@shared_task(ignore_result=True)
def hold(seconds: float) -> None:
    """Stand-in for a bulk task: occupy a pool process for `seconds` (reports mostly wait on the database)."""
    time.sleep(seconds)
