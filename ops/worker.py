"""Worker classes plugged into Celery: both run in a worker's parent (consumer) process.

- WorkerLostBoundRequest (set as `BaseTask.Request`): with `task_acks_late` and
  `task_reject_on_worker_lost`, Celery requeues a message whose pool process died
  (`Request.on_failure`: `self.reject(requeue=True)`), with no bound and without sending
  `task_failure`. This request counts the losses per task id and, at
  `TASK_MAX_WORKER_LOST`, fails the task instead of requeueing it: the message is
  acknowledged and `task_failure` fires, so the dead-letter handler records it.
- DeadLetterConsumer (set as `CELERY_WORKER_CONSUMER`): Celery sends `task_rejected` for
  a disallowed content type or an invalid task and `task_unknown` for an unknown name,
  but only logs and acknowledges a body that fails to decode; this consumer sends
  `task_rejected` for that case too, so every refused message reaches one handler.
  It also refuses two poison messages that would otherwise stop the worker with
  "Unrecoverable error" (and, requeued at shutdown, again at each restart): a content
  type kombu trusts without decoding (application/data, application/text: kombu's
  `loads` skips the accept list for them), and a body that decodes to anything but
  [args, kwargs, embed] (Request.__init__ unpacks it unchecked). On RabbitMQ it declares the
  queues, exchanges and dead-letter queue on each (re)connection first (ops/rabbitmq.py).
"""

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis
from billiard.einfo import ExceptionInfo, ExceptionWithTraceback  # type: ignore[attr-defined]  # not in celery-types
from celery import signals
from celery.exceptions import InvalidTaskError, WorkerLostError
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from django.conf import settings
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.message import Message
from kombu.serialization import TRUSTED_CONTENT, prepare_accept_content  # type: ignore[attr-defined]  # not in celery-types
from kombu.utils.encoding import safe_repr

from . import rabbitmq

logger = logging.getLogger(__name__)

# A task lost this many times within a day is failed for good; a loss a day ago is forgotten.
LOSS_MEMORY_SECONDS = 24 * 3600


class WorkerLostTooOften(Exception):
    """The pool process running the task died on each of its last `losses` deliveries."""

    def __init__(self, message: str, losses: int):
        super().__init__(message, losses)
        self.losses = losses

    def __str__(self) -> str:
        return self.args[0]


class LossCounter:
    """Worker losses per task id, shared by every worker on the broker's Redis.

    Without Redis (the filesystem broker of `make run`, and RabbitMQ) the count lives in this
    worker's parent process, which outlives its pool processes: still a bound, per worker. On
    RabbitMQ the bound shared by every worker is the broker's: the queues' delivery limit
    (RABBITMQ_DELIVERY_LIMIT), whose dead-lettered messages ops/rabbitmq.py records.
    """

    def __init__(self) -> None:
        self._client: redis.Redis | None = None
        self._local: Counter[str] = Counter()

    def _redis(self) -> redis.Redis | None:
        url = settings.CELERY_BROKER_URL
        if not url.startswith(("redis://", "rediss://", "unix://")):
            return None
        if self._client is None:
            self._client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        return self._client

    def add(self, task_id: str) -> int:
        """Count one more loss of the task; returns its losses so far."""
        client = self._redis()
        if client is None:
            self._local[task_id] += 1
            return self._local[task_id]
        key = f"ops:worker-lost:{task_id}"
        with client.pipeline() as pipe:
            # A pipeline's command returns the pipeline; redis types it as the client's answer.
            losses, _ = pipe.incr(key).expire(key, LOSS_MEMORY_SECONDS).execute()  # type: ignore[attr-defined]
        return int(losses)

    def forget(self, task_id: str) -> None:
        client = self._redis()
        if client is None:
            self._local.pop(task_id, None)
            return
        try:
            client.delete(f"ops:worker-lost:{task_id}")
        except redis.RedisError:
            logger.warning("worker losses of %s not forgotten; they expire in a day", task_id)


losses = LossCounter()


class WorkerLostBoundRequest(Request):
    # Celery's Request sets these on revoke and cancel; not in celery-types.
    _already_cancelled: bool
    _already_revoked: bool

    def on_failure(self, exc_info: ExceptionInfo, send_failed_event: bool = True, return_ok: bool = False) -> None:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if self._will_requeue_as_worker_lost(exc):
            try:
                count = losses.add(self.id)
            except redis.RedisError:
                # Redis down: the requeue below fails too; keep Celery's own behaviour.
                logger.exception("worker losses of %s[%s] not counted", self.name, self.id)
            else:
                limit = settings.TASK_MAX_WORKER_LOST
                if count >= limit:
                    exc_info = self._gave_up_info(exc, count, limit)
                    losses.forget(self.id)
                else:
                    logger.warning("Task %s[%s]: worker lost (%d of %d), requeued", self.name, self.id, count, limit)
        # With an exception that is not a worker loss, Celery's handler takes its ordinary
        # failure path: acknowledge (acks_on_failure), mark failed, send task_failure.
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def _will_requeue_as_worker_lost(self, exc: BaseException | None) -> bool:
        """True where Celery's on_failure would put the message back because the pool process died."""
        task = self.task
        # retry_on_worker_lost is new in Celery 5.6, not yet in celery-types.
        if not (task.acks_late and task.reject_on_worker_lost) or task.retry_on_worker_lost:  # type: ignore[attr-defined]
            return False
        if worker_state.should_terminate:
            return False  # a cold shutdown killed the pool: not the task's doing
        if isinstance(exc, WorkerLostError):
            return True
        # Billiard reports some deaths as the child's SystemExit; Celery treats those as a
        # worker loss too, unless the child was terminated on purpose (revoke, cancel).
        return isinstance(exc, SystemExit | KeyboardInterrupt) and not (
            self._already_cancelled or self._already_revoked
        )

    def _gave_up_info(self, exc: BaseException | None, count: int, limit: int) -> ExceptionInfo:
        message = f"{exc!r} on {count} deliveries; not requeued again (TASK_MAX_WORKER_LOST={limit})"
        try:
            raise WorkerLostTooOften(message, count) from exc
        except WorkerLostTooOften:
            return ExceptionInfo()


def malformed_task_message(message: Message, accept: set[str]) -> Exception | None:
    """Why a protocol 2 task message can never become a task call, or None to leave it to Celery's own checks."""
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        return None  # protocol 1 or no task at all: Celery refuses those itself
    # Other content types outside the accept list are refused by kombu's loads (ContentDisallowed).
    content_type = message.content_type or "application/data"
    if content_type in TRUSTED_CONTENT and content_type not in accept:
        return ContentDisallowed(f"Refusing content of type {content_type!r}: accepted: {sorted(accept)}")
    try:
        body = message.decode()
    except (DecodeError, ContentDisallowed):
        return None  # Celery refuses it (on_decode_error, on_invalid_task)
    if isinstance(body, dict) and "args" in body:
        return None  # a protocol 1 body under protocol 2 headers: Celery converts it (hybrid_to_proto2)
    if not (
        isinstance(body, list | tuple)
        and len(body) == 3
        and isinstance(body[0], list | tuple)
        and isinstance(body[1], dict)
        and isinstance(body[2], dict | None)
    ):
        return InvalidTaskError(f"task message body is not [args, kwargs, embed]: {safe_repr(body)[:200]}")
    return None


class DeadLetterConsumer(Consumer):
    class Blueprint(Consumer.Blueprint):  # type: ignore[valid-type,misc]  # celery-types has it as a variable
        # Celery's delayed-delivery step waits for every node of a failover URL list (ops/rabbitmq.py).
        default_steps = [
            "ops.rabbitmq:DelayedDeliveryOnThisNode" if step.endswith(":DelayedDelivery") else step
            for step in Consumer.Blueprint.default_steps
        ]

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Message], Any]:
        handle_task_message = super().create_task_handler(*args, **kwargs)
        accept = prepare_accept_content(self.app.conf.accept_content)
        assert accept is not None  # None only for no accept_content, and Celery always has one

        def on_task_received(message: Message) -> Any:
            if (reason := malformed_task_message(message, accept)) is not None:
                # Logged at ERROR, removed from the queue, task_rejected sent.
                return self.on_invalid_task(None, message, reason)
            return handle_task_message(message)

        return on_task_received

    def connect(self) -> Any:
        connection = super().connect()
        if rabbitmq.enabled():
            rabbitmq.declare_topology(connection, self.app.amqp.queues.values())
        return connection

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        super().on_decode_error(message, exc)  # logs at CRITICAL and acknowledges
        signals.task_rejected.send(sender=self, message=message, exc=exc)
