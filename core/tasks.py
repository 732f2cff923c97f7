"""Queue adapter for the outbox relay (routed to the default queue, run by beat)."""

from celery import shared_task

from . import outbox


# No retries of its own: beat runs it again within OUTBOX_RELAY_SECONDS.
@shared_task(autoretry_for=(), max_retries=0)
def relay_outbox() -> dict[str, int]:
    return outbox.relay()


# No retries of its own: what one run leaves (its time budget spent) the next hour's run deletes.
@shared_task(autoretry_for=(), max_retries=0)
def prune_outbox() -> int:
    return outbox.prune()
