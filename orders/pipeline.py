"""The order's life cycle: which status may follow which, what runs next, and the only place that dispatches it.

    pending -> confirmed -> paid -> fulfilled -> partially_refunded -> refunded
       |           |          |          +-> refunded
       |           |          +-> on_hold (hand-over to the warehouse keeps failing; resumes by itself)
       |           |          +-> cancelled (by the shopper before hand-over: refunded in full) -> refunded
       |           +-> payment_failed (stock released) | cancelled | on_hold (payment needs attention)
       |           +-> expired (not paid within PAYMENT_EXPIRY_SECONDS: stock released; a late charge is refunded)
       +-> rejected (out of stock) | cancelled

Every change goes through `set_status`, under the order's row lock, with an OrderEvent;
an illegal move raises. The step that follows a status is an outbox item written in the
same transaction (core/outbox.py), so it is published after commit or by the relay, once.
Collaborators (payments, the warehouse client) return outcomes and never call back here;
notifications follow `status_changed`.
"""

import logging
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connection
from django.dispatch import Signal, receiver
from django.utils import timezone

from core import outbox
from core.models import OutboxItem
from payments.models import Payment, Refund
from payments.refunds import refund_settled
from payments.services import payment_settled

from .models import Order, OrderEvent

logger = logging.getLogger(__name__)

S = Order.Status

TRANSITIONS: dict[str, frozenset[str]] = {
    S.PENDING: frozenset({S.CONFIRMED, S.REJECTED, S.CANCELLED, S.ON_HOLD}),
    S.CONFIRMED: frozenset({S.PAID, S.PAYMENT_FAILED, S.CANCELLED, S.ON_HOLD, S.EXPIRED}),
    # Cancelled once paid: by the shopper, or by a full refund, before the warehouse has it.
    S.PAID: frozenset({S.FULFILLED, S.ON_HOLD, S.CANCELLED}),
    # Out of a hold: the step that was stuck finishes (paid, fulfilled), staff retry it (back to
    # the status it was held from), or staff give up on the charge (payment_failed, stock released);
    # an order held on its way to payment expires, one held on its way to the warehouse is cancelled.
    S.ON_HOLD: frozenset({S.PENDING, S.CONFIRMED, S.PAID, S.PAYMENT_FAILED, S.FULFILLED, S.EXPIRED, S.CANCELLED}),
    # After the sale: a refund that succeeded gives back all of the charge or part of it.
    S.FULFILLED: frozenset({S.REFUNDED, S.PARTIALLY_REFUNDED}),
    S.PARTIALLY_REFUNDED: frozenset({S.REFUNDED, S.PARTIALLY_REFUNDED}),
    # A cancelled order that was paid ends refunded when its refund succeeds.
    S.CANCELLED: frozenset({S.REFUNDED}),
    S.REFUNDED: frozenset(),
    S.REJECTED: frozenset(),
    S.PAYMENT_FAILED: frozenset(),
    # Expired stays expired: a charge that succeeds after it is refunded, and the order says so in its events.
    S.EXPIRED: frozenset(),
}

# The task that moves an order on from each status; its name is its service's name.
NEXT_STEP: dict[str, str] = {
    S.PENDING: "orders.tasks.process_order",
    S.CONFIRMED: "orders.tasks.charge_order",
    S.PAID: "orders.tasks.sync_to_fulfillment",
}

# A deadline that starts with a status: its task is published that many seconds later through the
# outbox's next-attempt time, and finds out itself whether the order is still waiting.
DEADLINES: dict[str, tuple[str, str]] = {
    S.CONFIRMED: ("orders.tasks.expire_order", "PAYMENT_EXPIRY_SECONDS"),
}

# Sent inside the transaction of every status change (order=, from_status=, to_status=).
status_changed = Signal()


class IllegalTransition(Exception):
    def __init__(self, order: Order, to_status: str):
        super().__init__(f"order {order.pk}: {order.status} -> {to_status} is not allowed")


def start(order: Order) -> OrderEvent:
    """Record a new order's first event (returned) and dispatch its first step. Call in the transaction that
    created it."""
    event = OrderEvent.objects.create(order=order, to_status=order.status, note="placed")
    dispatch_next(order)
    return event


def set_status(order: Order, to_status: str, *, note: str = "", hold_reason: str = "") -> Order:
    """Move the order to `to_status` and dispatch the step that follows it. Call while holding the order's row lock.

    Raises IllegalTransition for a move the table does not allow.
    """
    if to_status not in TRANSITIONS[order.status]:
        raise IllegalTransition(order, to_status)
    from_status = order.status
    order.status = to_status
    order.hold_reason = hold_reason[:255] if to_status == S.ON_HOLD else ""
    _write_move(order, from_status=from_status, note=note[:255])
    # The next step first: its message is published first after commit, ahead of the emails. All the items
    # the change writes (the step, a deadline, the emails' through status_changed) go in one INSERT.
    with outbox.batched():
        dispatch_next(order)
        status_changed.send(sender=Order, order=order, from_status=from_status, to_status=to_status)
    return order


def _write_move(order: Order, *, from_status: str, note: str) -> None:
    """Write the move's event and the order's new status (and hold reason).

    On PostgreSQL one statement, both rows stamped with one moment: the event's INSERT in a WITH of the order's
    UPDATE (a data-modifying statement in WITH runs exactly once, whatever the outer statement reads). Elsewhere
    (`make run`'s SQLite, which has no INSERT in WITH) the ORM's two statements.
    """
    now = timezone.now()
    order.updated_at = now
    if connection.vendor != "postgresql":
        OrderEvent.objects.create(order=order, from_status=from_status, to_status=order.status, note=note)
        order.save(update_fields=["status", "hold_reason", "updated_at"])
        return
    quote = connection.ops.quote_name
    event, orders = OrderEvent._meta, Order._meta

    def column(meta: Any, name: str) -> str:
        return quote(meta.get_field(name).column)

    event_columns = ", ".join(
        column(event, name) for name in ("order", "from_status", "to_status", "note", "created_at")
    )
    sql = (
        f"WITH event AS (INSERT INTO {quote(event.db_table)} ({event_columns}) "  # noqa: S608 (names from the models)
        "VALUES (%s, %s, %s, %s, %s)) "
        f"UPDATE {quote(orders.db_table)} SET {column(orders, 'status')} = %s, {column(orders, 'hold_reason')} = %s, "
        f"{column(orders, 'updated_at')} = %s WHERE {column(orders, 'id')} = %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(
            sql, [order.pk, from_status, order.status, note, now, order.status, order.hold_reason, now, order.pk]
        )
        if cursor.rowcount != 1:  # as save(update_fields=...) refuses a row that is gone
            raise DatabaseError(f"order {order.pk}: the move to {order.status} updated {cursor.rowcount} rows")


def dispatch_next(order: Order, *, delay: float = 0) -> OutboxItem | None:
    """Write the outbox item of the step that follows the order's status (none for a final status or a hold)."""
    if deadline := DEADLINES.get(order.status):
        outbox.enqueue(deadline[0], order.pk, delay=getattr(settings, deadline[1]))
    task_name = NEXT_STEP.get(order.status)
    if task_name is None:
        return None
    return outbox.enqueue(task_name, order.pk, delay=delay)


def was_paid(order: Order) -> bool:
    """Whether the order reached `paid` before (a hold on the way to the warehouse, not on the way to payment)."""
    return order.events.filter(to_status=S.PAID).exists()


# --- When a step fails for good -------------------------------------------------------

# The warehouse coming back is the only fix a failing hand-over needs: try again later, by itself.
outbox.resume_after_failure(NEXT_STEP[S.PAID], seconds=settings.FULFILLMENT_RESUME_SECONDS)


@receiver(outbox.work_failed, dispatch_uid="orders.pipeline.step_failed")
def step_failed(sender: Any, item: OutboxItem, reason: str, parked: bool, **kwargs: Any) -> None:
    """An order step that failed for good (retries spent, a permanent error) puts the order on hold, visibly."""
    if item.task_name not in NEXT_STEP.values() or not item.args:
        return
    from . import services

    services.hold_stuck_order(order_id=item.args[0], task_name=item.task_name, reason=reason, resumes=parked)


@receiver(payment_settled, dispatch_uid="orders.pipeline.payment_settled")
def payment_settled_elsewhere(sender: Any, payment: Payment, **kwargs: Any) -> None:
    """A webhook finished an order's payment: the charge step applies its outcome (it finds the payment final)."""
    if payment.order_id:
        outbox.enqueue(NEXT_STEP[S.CONFIRMED], payment.order_id)


@receiver(refund_settled, dispatch_uid="orders.pipeline.refund_settled")
def refund_settled_for_order(sender: Any, refund: Refund, **kwargs: Any) -> None:
    """A refund of an order's payment got its outcome: the order says what was given back (refunded, partially)."""
    if refund.payment.order_id:
        from . import services

        services.apply_refund(refund=refund)
