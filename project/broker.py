"""kombu's Redis transport, fixed so a Redis blip neither stops a worker nor parks its work.

When the broker connection drops, kombu 5.7 tries to push the worker's unacknowledged
messages back onto their queues through the connection that has just gone away
(`QoS.restore_unacked` -> `Channel._connparams`, where `self.connection.client` is
None), and the AttributeError stops the worker with "Unrecoverable error". Redis is
usually down at that moment anyway. So the failed restore is logged and the worker goes
on reconnecting; the tasks running for those messages are not cancelled
(CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False) and finish.

Their late ack (or reject) then goes to the channel closed with the lost connection, and
fails the same way. Left undone, the message would stay in Redis's unacked index and run
again only after the visibility timeout (an hour). So the ack is made over a new
connection to the same Redis, as soon as the task finishes: the work is done once and
nothing is left behind. If Redis is still unreachable then, the ack is skipped and the
message is delivered again after the visibility timeout (tasks are idempotent).

The worker drops the messages it held but was not running (prefetched, or waiting for a
retry's countdown) when the connection went (celery.worker.consumer.Consumer.on_close).
Those are put back on their queues as soon as the worker consumes again over the new
connection, instead of waiting for the visibility timeout.
"""

import logging

import redis as redis_py
from kombu.transport import redis

logger = logging.getLogger(__name__)

# Delivery tags this process held unacknowledged when its broker connection was lost.
_orphaned: set[str] = set()


def _running_delivery_tags() -> set[str]:
    """Delivery tags of the tasks this worker is running now (they finish and ack by themselves)."""
    from celery.worker import state

    tags = set()
    for request in tuple(state.active_requests):
        tag = getattr(getattr(request, "_message", None), "delivery_tag", None)
        if tag is not None:
            tags.add(tag)
    return tags


class QoS(redis.QoS):
    def _channel_closed(self) -> bool:
        return self.channel.connection is None

    def _fresh_client(self) -> redis_py.Redis:
        return redis_py.Redis(**self.channel.fresh_connection_params, socket_timeout=5, socket_connect_timeout=5)

    def _settle_on_fresh_connection(self, what: str, delivery_tag) -> None:
        try:
            client = self._fresh_client()
            try:
                self._remove_from_indices(delivery_tag, pipe=client.pipeline()).execute()
            finally:
                client.close()
        except redis_py.RedisError as exc:
            logger.warning(
                "%s of message %s skipped: its channel closed with the lost broker connection and Redis is still "
                "unreachable (%r); the message is delivered again after the visibility timeout",
                what,
                delivery_tag,
                exc,
            )
        else:
            logger.info(
                "%s of message %s made over a new connection (its channel closed with the old one)", what, delivery_tag
            )
        self._delivered.pop(delivery_tag, None)

    def ack(self, delivery_tag):
        if self._channel_closed():
            return self._settle_on_fresh_connection("ack", delivery_tag)
        return super().ack(delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        if self._channel_closed():
            if requeue:
                # Putting it back needs the closed channel's exchange table: leave it in the unacked
                # index, from which any worker restores it after the visibility timeout.
                logger.warning("requeue of message %s left to the visibility timeout (channel closed)", delivery_tag)
                self._delivered.pop(delivery_tag, None)
                return None
            return self._settle_on_fresh_connection("reject", delivery_tag)
        return super().reject(delivery_tag, requeue=requeue)

    def restore_unacked(self, client=None):
        try:
            return super().restore_unacked(client)
        except (AttributeError, *self.channel.connection_errors) as exc:
            logger.warning(
                "broker connection lost: %d unacknowledged message(s) not restored now; running tasks finish and "
                "are acknowledged over a new connection, the others are restored once the worker reconnects (%r)",
                len(self._delivered),
                exc,
            )
            _orphaned.update(self._delivered)
            self._delivered.clear()
            return None


class Channel(redis.Channel):
    QoS = QoS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Kept while the connection is alive: a late ack after the connection is gone needs it.
        conninfo = self.connection.client
        self.fresh_connection_params = {
            "host": conninfo.hostname or "127.0.0.1",
            "port": conninfo.port or self.connection.default_port,
            "db": self._prepare_virtual_host(conninfo.virtual_host),
            "username": conninfo.userid,
            "password": conninfo.password,
        }

    def basic_consume(self, queue, *args, **kwargs):
        result = super().basic_consume(queue, *args, **kwargs)
        # Consuming again after a lost connection: the exchanges are declared by now, so a restored
        # message reaches its queue (not kombu's dead-letter queue for unroutable messages).
        if _orphaned:
            self._restore_orphans()
        return result

    def _restore_orphans(self) -> None:
        held = _orphaned - _running_delivery_tags()
        _orphaned.clear()
        for tag in held:
            self.qos.restore_by_tag(tag, leftmost=True)
        if held:
            logger.info("restored %d message(s) held when the broker connection was lost", len(held))


class RedisTransport(redis.Transport):
    Channel = Channel
