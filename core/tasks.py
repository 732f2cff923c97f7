"""Queue adapter for the outbox relay (routed to the default queue, run by beat)."""

from celery import shared_task

from . import outbox


# No retries of its own: beat runs it again within OUTBOX_RELAY_SECONDS.
@shared_task(autoretry_for=(), max_retries=0)
def relay_outbox() -> dict[str, int]:
    return outbox.relay()
