"""Queue adapter for the outbox relay (routed to the default queue, run by beat)."""

from celery import shared_task

from . import outbox


@shared_task
def relay_outbox() -> dict[str, int]:
    return outbox.relay()
