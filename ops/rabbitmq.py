"""What only RabbitMQ needs (settings.BROKER_KIND == "rabbitmq"): its queues declared up front, and its dead letters.

- `declare_topology`: every task queue (quorum, with its delivery limit and dead-letter exchange) and the
  dead-letter exchange and queue, declared by each worker on each (re)connection (ops.worker's consumer),
  before Celery binds every queue in `task_queues` to its delayed-delivery exchanges: a worker that consumes
  only `critical` still binds `bulk`, and a queue whose exchange is not declared yet fails that step.
- `DeadLetterQueue`, a consumer bootstep in every worker: RabbitMQ moves a message to the dead-letter
  exchange when it was delivered more than the queue's delivery limit (its worker died, or lost its
  connection, each time) or was rejected. Each one becomes a FailedTask, and its outbox item ends failed
  as for any final failure (work_failed: the order goes on hold...). A message a worker refused (reason
  `rejected`: undecodable, unknown task, disallowed content) was recorded by that worker already
  (ops.deadletters, task_rejected/task_unknown) and is only acknowledged here, as is one whose TTL ran out
  (reason `expired`: Celery sets a task's `expires` as the message's TTL on RabbitMQ).
- `DelayedDeliveryOnThisNode`: Celery's delayed-delivery step, set up over the worker's own connection only
  (ops.worker's consumer puts it in place of Celery's).

On Redis, the delivery bound is ops.worker's count of lost workers per task id (kept in Redis); there is no
dead-letter exchange, so nothing here runs.
"""

import logging
from typing import Any

from celery import bootsteps
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer.delayed_delivery import DelayedDelivery
from django.conf import settings
from kombu import Connection, Consumer, Exchange, Queue
from kombu.message import Message
from kombu.utils.encoding import safe_repr

logger = logging.getLogger(__name__)

# Dead letters taken from the queue at a time by one worker.
PREFETCH = 10


def enabled() -> bool:
    return bool(settings.BROKER_KIND == "rabbitmq")


def dead_letter_queue() -> Queue:
    exchange = Exchange(settings.DEAD_LETTER_EXCHANGE, type="fanout", durable=True)
    return Queue(
        settings.DEAD_LETTER_QUEUE, exchange, routing_key="#", durable=True, queue_arguments={"x-queue-type": "quorum"}
    )


def declare_topology(connection: Connection, queues: Any) -> None:
    """Declare the dead-letter exchange and queue, then every task queue with its exchange (idempotent).

    A queue that exists with other arguments (a classic queue of an earlier deployment) fails loudly here
    (PRECONDITION_FAILED), at the worker's start, instead of in the middle of the work.
    """
    channel = connection.default_channel
    dead_letter_queue()(channel).declare()
    for queue in queues:
        queue(channel).declare()


class DelayedDeliveryOnThisNode(DelayedDelivery):
    """Celery's native delayed delivery, set up once, over the connection the worker consumes on.

    Celery's step sets it up for every URL of a failover list (`amqp://a;amqp://b;...`), each with three
    tries and sleeps of 1, 3 and 5 s, before the worker consumes again: with one node of the list down,
    every reconnect and every worker start waited 18 s (tests/e2e/test_rabbitmq_cluster.py). Its exchanges,
    queues and bindings belong to the cluster, not to a node, so the node the worker is connected to is
    enough.
    """

    def start(self, c: CeleryConsumer) -> None:
        connection = c.connection
        assert connection is not None  # this step runs after the Connection step
        try:
            # Not in celery-types (Celery 5.5+).
            self._setup_delayed_delivery(c, connection.as_uri(include_password=True))  # type: ignore[attr-defined]
        except connection.connection_errors:
            raise  # the consumer reconnects (to the next node of the list) and starts its steps again
        except Exception as exc:  # noqa: BLE001 (as Celery's own step: logged, and the worker consumes all the same)
            logger.critical("native delayed delivery not set up on %s: %r", connection.as_uri(), exc)


class DeadLetterQueue(bootsteps.ConsumerStep):
    """Consumes the dead-letter queue in the worker's main process (no pool slot) and records each message."""

    def include_if(self, c: CeleryConsumer) -> bool:
        return enabled()

    def get_consumers(self, channel: Any) -> list[Consumer]:
        return [
            Consumer(
                channel,
                queues=[dead_letter_queue()],
                on_message=self.on_dead_letter,
                prefetch_count=PREFETCH,
                # Never decoded by kombu: the body is whatever reached the queue, hostile bytes included.
                accept=[],
            )
        ]

    def on_dead_letter(self, message: Message) -> None:
        from .deadletters import record_dead_lettered

        try:
            record_dead_lettered(message)
        except Exception:
            # Acknowledged all the same: left on the queue it would come back each time this worker's channel
            # closes and jam the next one (a body the database refuses fails every time). The log line is its
            # record, as for a dead letter the database could not take (ops.deadletters.record_task_failure).
            logger.exception(
                "dead letter not recorded: headers=%r body=%s",
                message.headers,
                safe_repr(message.body)[:1024],
            )
        message.ack()
