"""Queue adapters for order services (routed to the critical queue)."""

from celery import shared_task

from project.celery import TRANSIENT_ERRORS

from . import services


@shared_task
def process_order(order_id: int) -> str | None:
    order = services.process_order(order_id=order_id)
    return order.status if order else None


@shared_task
def redispatch_stale_orders() -> int:
    return len(services.redispatch_stale_orders())


@shared_task(
    bind=True,
    autoretry_for=TRANSIENT_ERRORS,
    max_retries=5,
    retry_backoff=True,
    retry_backoff_max=600,
    retry_jitter=True,
)
def sync_to_fulfillment(self, order_id: int) -> str | None:
    # The seed's sync_to_external_api: backoff with jitter; a missing row returns without retrying.
    order = services.sync_to_fulfillment(order_id=order_id)
    return order.status if order else None
