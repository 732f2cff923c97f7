"""Test-only tasks for test_dead_letters.py.

A worker imports this module only when started with
`CELERY_EXTRA_IMPORTS=tests.e2e.deadletter_tasks`; no production process loads it.
Unrouted, so they go to the default queue.
"""

import os
import signal
import time
from decimal import Decimal
from pathlib import Path

from celery import shared_task
from django.db import transaction

from orders.models import Product


@shared_task(autoretry_for=(ConnectionError,), max_retries=2, retry_backoff=False, default_retry_delay=0)
def always_unreachable() -> None:
    raise ConnectionError("provider unreachable")


@shared_task
def write_then_fail(sku: str) -> None:
    """Not retryable; its write is rolled back with it."""
    with transaction.atomic():
        Product.objects.create(sku=sku, name="rolled back", price=Decimal("1.00"), stock=1)
        raise ValueError(f"invalid: {sku}")


@shared_task(time_limit=1)
def outlive_time_limit() -> None:
    time.sleep(30)


@shared_task
def append_line(path: str, text: str) -> None:
    with Path(path).open("a") as file:
        file.write(text + "\n")


@shared_task
def kill_own_process(path: str, kills: int | None = None) -> None:
    """Note the run in `path`, then SIGKILL this pool process: on the first `kills` runs, or on every run."""
    with Path(path).open("a") as file:
        file.write(f"start {os.getpid()}\n")
    runs = Path(path).read_text().count("start")
    if kills is None or runs <= kills:
        os.kill(os.getpid(), signal.SIGKILL)
    with Path(path).open("a") as file:
        file.write("done\n")
