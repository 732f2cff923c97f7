"""Bench-only tasks, loaded by workers only during `make bench` (CELERY_EXTRA_IMPORTS=bench.tasks).

Each probe appends `[sent_at, started_at, finished_at]` (wall-clock seconds) to a Redis list
the bench names, so the bench reads queue wait (start - publish) and round trip (its own
BLPOP) without results or events. The bench picks the queue with `apply_async(queue=...)`.
"""

import functools
import json
import time

import redis
from celery import shared_task
from django.conf import settings


@functools.cache
def _broker() -> redis.Redis:
    # Called first in a pool process, so each process has its own connection pool.
    return redis.Redis.from_url(settings.CELERY_BROKER_URL)


@shared_task(ignore_result=True)
def noop(sent_at: float, reply_to: str) -> None:
    """Do nothing; record when it was published, started and finished."""
    started_at = time.time()
    _broker().rpush(reply_to, json.dumps([sent_at, started_at, time.time()]))


@shared_task(ignore_result=True)
def hold(seconds: float) -> None:
    """Stand-in for a bulk task: occupy a pool process for `seconds` (reports mostly wait on the database)."""
    time.sleep(seconds)
