"""Queue adapters for the order's steps (routed to the critical queue, under its time limits).

Each loads the order by id and calls the service of the same name. Only transient errors
(the provider, the warehouse or the database unreachable) are retried, with exponential
backoff and jitter; when the retries are spent the task fails for good, and the outbox
puts the order on hold (orders/pipeline.py: step_failed).
"""

from celery import shared_task

from core.task_base import retry_policy

from . import services


@shared_task(**retry_policy(retries=8, backoff_max=60))
def process_order(order_id: int) -> str | None:
    order = services.process_order(order_id=order_id)
    return order.status if order else None


@shared_task(**retry_policy(retries=8, backoff_max=60))
def charge_order(order_id: int) -> str | None:
    order = services.charge_order(order_id=order_id)
    return order.status if order else None


@shared_task(**retry_policy(retries=10, backoff_max=120))
def sync_to_fulfillment(order_id: int) -> str | None:
    # The seed's sync_to_external_api: backoff with jitter; a missing row returns without retrying.
    order = services.sync_to_fulfillment(order_id=order_id)
    return order.status if order else None


# Published by the outbox PAYMENT_EXPIRY_SECONDS after the order is confirmed (orders/pipeline.py DEADLINES).
@shared_task(**retry_policy(retries=8, backoff_max=60))
def expire_order(order_id: int) -> str | None:
    order = services.expire_order(order_id=order_id)
    return order.status if order else None
