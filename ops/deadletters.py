"""Every final task failure and every refused message becomes a FailedTask, from Celery's signals.

Where each one fires (Celery 5.7):
- `task_failure`, in the pool process, when a task raises anything but Retry: a
  non-retryable error, or retries exhausted (`Task.retry` raises the original error
  or MaxRetriesExceededError once `max_retries` is reached). A retry sends
  `task_retry` instead and is not final. The task's own `atomic` blocks have
  already rolled back by then.
- `task_failure`, in the worker's parent process, for the hard time limit (sent by
  `Request.on_failure` and again by `Request.on_timeout`: recorded once) and for a
  lost pool process once ops.worker's bound stops requeueing it.
- `task_rejected` (disallowed content type such as pickle, invalid task, and, through
  ops.worker.DeadLetterConsumer, an undecodable body) and `task_unknown` (no task of
  that name), in the parent, after the message is logged and removed from the queue.
"""

import json
import logging
import uuid
from typing import Any

from celery import current_app as app
from celery import signals
from django.conf import settings
from django.dispatch import receiver
from django.utils import timezone
from kombu.message import Message
from kombu.utils.encoding import safe_repr

from core import outbox
from core.models import OutboxItem
from payments.models import Payment, Refund
from payments.refunds import refund_failed
from payments.services import needs_attention as payment_needs_attention

from .models import FailedTask
from .services import queue_for, record_failure

logger = logging.getLogger(__name__)

# A refused message's body is kept as its repr, cut to this length: enough to recognise its producer.
BODY_EXCERPT = 1024
# The task name of a refused message that never became a task call.
UNDECODABLE = "<undecodable>"
# The "task names" of dead letters that are not a task's, so there is none to replay: a payment that needs
# attention (staff use the order's hold actions) and a refund the provider refused (staff refund again).
PAYMENT_NEEDS_ATTENTION = "payments.needs_attention"
REFUND_FAILED = "payments.refund_failed"


def _known_queue(name: Any) -> str | None:
    return name if isinstance(name, str) and name in app.amqp.queues else None


def describe(exc: BaseException) -> str:
    """`Type: message`, without repeating a type that the message already names (TimeLimitExceeded(360,))."""
    name, text = type(exc).__name__, str(exc)
    if not text:
        return name
    return text if text.startswith(name) else f"{name}: {text}"


@signals.task_failure.connect(dispatch_uid="ops.deadletters.record_task_failure")
def record_task_failure(
    sender: Any = None,
    task_id: Any = None,
    exception: Any = None,
    args: Any = None,
    kwargs: Any = None,
    einfo: Any = None,
    **extra: Any,
) -> None:
    request = sender.request
    if request.is_eager:
        # Run in-process by apply() or eager mode: no message was lost and there is none to replay.
        return
    delivery_info = request.delivery_info or {}
    losses = getattr(exception, "losses", 1)  # ops.worker.WorkerLostTooOften: one attempt per lost delivery
    try:
        record_failure(
            task_id=task_id,
            task_name=sender.name,
            # A retry's routing key is the delayed-delivery one on RabbitMQ (`0.0...1.0.default`): the route's queue.
            queue=_known_queue(delivery_info.get("routing_key")) or queue_for(sender.name),
            args=args or (),
            kwargs=kwargs or {},
            exception=describe(exception),
            traceback=getattr(einfo, "traceback", "") or "",
            attempts=(request.retries or 0) + losses,
            worker=request.hostname or "",
        )
    except Exception:
        # The log line is the only record left: make it complete.
        logger.exception("dead letter not recorded: %s[%s] args=%r kwargs=%r", sender.name, task_id, args, kwargs)


def _record_refused(message: Message, reason: str, task_name: str) -> None:
    headers = message.headers if isinstance(message.headers, dict) else {}
    properties = message.properties or {}
    task_id = headers.get("id") or properties.get("correlation_id") or f"refused-{uuid.uuid4()}"
    body = safe_repr(message.body)  # the raw bytes, never decoded
    try:
        record_failure(
            task_id=str(task_id),
            task_name=str(task_name),
            kind=FailedTask.Kind.REFUSED,
            queue=(message.delivery_info or {}).get("routing_key") or "",
            headers=headers,
            exception=reason,
            traceback=(
                f"content-type: {message.content_type}\ncontent-encoding: {message.content_encoding}\n"
                f"body ({len(message.body or b'')} bytes): {body[:BODY_EXCERPT]}"
            ),
        )
    except Exception:
        logger.exception("refused message not recorded: %s headers=%r", reason, headers)


@signals.task_rejected.connect(dispatch_uid="ops.deadletters.record_rejected_message")
def record_rejected_message(sender: Any = None, message: Any = None, exc: Any = None, **extra: Any) -> None:
    # Not under the name the message claims (it is in the headers): a poison message must
    # not pass for a failure of a real task, in the admin or in the dead-letter metrics.
    reason = describe(exc) if exc is not None else "unknown message format"
    _record_refused(message, reason, task_name=UNDECODABLE)


@signals.task_unknown.connect(dispatch_uid="ops.deadletters.record_unknown_task")
def record_unknown_task(  # noqa: A002 (signal's name)
    sender: Any = None, message: Any = None, exc: Any = None, name: Any = None, id: Any = None, **extra: Any
) -> None:
    _record_refused(message, f"NotRegistered: no task named {name!r}", task_name=name)


# --- RabbitMQ's dead-letter queue (ops/rabbitmq.py) ---------------------------------


def _death(headers: dict[str, Any]) -> tuple[str, str, int]:
    """(reason, queue, deliveries) of a dead-lettered message, from RabbitMQ's x-death / x-first-death-* headers."""
    deaths = headers.get("x-death")
    death = deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
    reason = str(death.get("reason") or headers.get("x-first-death-reason") or "unknown")
    queue = str(death.get("queue") or headers.get("x-first-death-queue") or "")
    # The header counting redeliveries (x-delivery-count) does not survive the move to the dead-letter queue:
    # a message dead-lettered for its delivery limit was delivered that many times more than once.
    deliveries = settings.RABBITMQ_DELIVERY_LIMIT + 1 if reason == "delivery_limit" else 1
    return reason, queue, deliveries


def _call_of(message: Message) -> tuple[list[Any], dict[str, Any]]:
    """The args and kwargs of a task message's JSON body; empty when it is anything else (never raises)."""
    if message.content_type != "application/json":
        return [], {}
    try:
        body = json.loads(message.body or b"")
    except (TypeError, ValueError):
        return [], {}
    if isinstance(body, list) and len(body) == 3 and isinstance(body[0], list) and isinstance(body[1], dict):
        return body[0], body[1]
    return [], {}


def record_dead_lettered(message: Message) -> None:
    """A message RabbitMQ dead-lettered: a FailedTask, and the task's outbox item ends failed (or parked).

    A message a worker refused (`rejected`) was recorded by that worker, and one that `expired` was sent to
    expire: nothing more is done for either. Raises when the dead letter cannot be written (the consumer logs
    the message and acknowledges it: ops/rabbitmq.py).
    """
    headers = message.headers if isinstance(message.headers, dict) else {}
    reason, queue, deliveries = _death(headers)
    if reason == "rejected":
        logger.info("dead-lettered message %s was refused by a worker and recorded there", headers.get("id"))
        return
    if reason == "expired":
        # Celery turns a task's `expires` into the message's TTL on RabbitMQ: it expired as its sender asked
        # (beat's relay messages; no outbox message expires), as a Redis worker discards it unrun.
        logger.info("message %s[%s] expired unrun, as its sender asked", headers.get("task"), headers.get("id"))
        return
    task_id = str(headers.get("id") or (message.properties or {}).get("correlation_id") or f"dead-{uuid.uuid4()}")
    claimed = str(headers.get("task") or "")
    exception = (
        f"{outbox.DELIVERY_LIMIT_EXCEEDED}: delivered {deliveries} times without an acknowledgement "
        f"(RABBITMQ_DELIVERY_LIMIT={settings.RABBITMQ_DELIVERY_LIMIT}; RabbitMQ's reason: {reason})"
    )
    if claimed not in app.tasks or reason != "delivery_limit" or queue not in app.amqp.queues:
        # Not the broker's verdict on a message of ours (anything else reached the dead-letter exchange: a
        # producer with access to it can publish there): kept as refused, under no name a replay could run,
        # and no work of ours is failed by it.
        _record_refused(message, exception, task_name=UNDECODABLE)
        return
    args, kwargs = _call_of(message)
    record_failure(
        task_id=task_id,
        task_name=claimed,
        queue=queue,
        args=args,
        kwargs=kwargs,
        exception=exception,
        attempts=deliveries,
        worker="rabbitmq",
    )
    # After the record, so that whichever comes first, this verdict or the success of a delivery it counted
    # that was still running, the item ends done and this dead letter resolved (core.outbox._finish_done).
    outbox.task_failed_for_good(task_id, exception)
    logger.error("task %s[%s] dead-lettered by the broker from %s: %s", claimed, task_id, queue, exception)


# --- Failures that are not a task's own: the outbox relay gave up, a payment needs attention ---


@receiver(outbox.work_failed, dispatch_uid="ops.deadletters.record_abandoned_item")
def record_abandoned_item(sender: Any, item: OutboxItem, reason: str, by_relay: bool, **extra: Any) -> None:
    """An outbox item the relay gave up on never ran to a task failure: its dead letter is written here."""
    if not by_relay:
        return  # the task's own failure: record_task_failure has it
    try:
        record_failure(
            task_id=str(item.task_id),
            task_name=item.task_name,
            queue=queue_for(item.task_name),
            args=item.args,
            kwargs=item.kwargs,
            exception=f"OutboxGaveUp: {reason}",
            attempts=item.attempts,
        )
    except Exception:
        logger.exception("dead letter not recorded for outbox item %s (%s)", item.pk, item.task_name)


@receiver(outbox.work_recovered, dispatch_uid="ops.deadletters.resolve_recovered_item")
def resolve_recovered_item(sender: Any, item_task_id: str, **extra: Any) -> None:
    """Parked work (the warehouse or the mail server was down) finished by itself: its dead letter is resolved."""
    FailedTask.objects.filter(task_id=item_task_id, resolved=False).update(resolved=True, resolved_at=timezone.now())


def _record_money_to_look_at(*, task_id: str, task_name: str, pk: int, exception: str) -> None:
    """A dead letter that is not a task's: a payment or a refund staff must look at (never raises)."""
    try:
        record_failure(task_id=task_id, task_name=task_name, queue="", args=[pk], exception=exception)
    except Exception:
        logger.exception("dead letter %s not recorded (%s)", task_id, exception)


@receiver(payment_needs_attention, dispatch_uid="ops.deadletters.record_payment_needing_attention")
def record_payment_needing_attention(sender: Any, payment: Payment, reason: str, **extra: Any) -> None:
    """A payment whose outcome cannot be recorded (mismatch, refusal, retries spent) is a dead letter."""
    _record_money_to_look_at(
        task_id=f"payment-{payment.pk}-needs-attention",
        task_name=PAYMENT_NEEDS_ATTENTION,
        pk=payment.pk,
        exception=f"PaymentNeedsAttention: {reason}",
    )


@receiver(refund_failed, dispatch_uid="ops.deadletters.record_refund_failed")
def record_refund_failed(sender: Any, refund: Refund, reason: str, **extra: Any) -> None:
    """A refund the provider refused (or answered with another refund) is a dead letter: the money is still owed."""
    _record_money_to_look_at(
        task_id=f"refund-{refund.pk}-failed", task_name=REFUND_FAILED, pk=refund.pk, exception=f"RefundFailed: {reason}"
    )
