"""Queue adapters for order services (routed to the critical queue)."""

from celery import shared_task

from . import services


@shared_task
def process_order(order_id: int) -> str | None:
    order = services.process_order(order_id=order_id)
    return order.status if order else None


@shared_task
def redispatch_stale_orders() -> int:
    return len(services.redispatch_stale_orders())
