"""Test-only tasks for tests/attack/test_rabbitmq_attacks.py.

Loaded by a worker with CELERY_EXTRA_IMPORTS=tests.attack.rabbitmq_tasks; no production process imports this
module. Unrouted: default queue.
"""

import time
from pathlib import Path

from celery import shared_task


@shared_task
def sleep_then_note(path: str, seconds: float) -> None:
    """Note the start, sleep, note the end: a long task that succeeds."""
    with Path(path).open("a") as file:
        file.write("start\n")
    time.sleep(seconds)
    with Path(path).open("a") as file:
        file.write("done\n")


@shared_task(bind=True, max_retries=2)
def retry_with_countdown(self, path: str, countdown: float) -> None:
    """Note each run with the queue it came from, then retry after `countdown` seconds (fails for good on run 3)."""
    with Path(path).open("a") as file:
        file.write(f"run {self.request.retries} {self.request.delivery_info.get('routing_key')}\n")
    raise self.retry(exc=ConnectionError("still unreachable"), countdown=countdown)
