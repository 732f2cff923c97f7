"""kombu's Redis transport, fixed so a worker survives losing Redis while it holds unacked messages.

When the broker connection drops, kombu 5.7 tries to push the worker's unacknowledged
messages back onto their queues through the connection that has just gone away
(`QoS.restore_unacked` -> `Channel._connparams`, where `self.connection.client` is
None), and the AttributeError stops the worker with "Unrecoverable error". Those
messages are not lost either way: with `acks_late` they sit in Redis's unacked index
until the visibility timeout, when any worker restores them. So the failed restore is
logged and the worker goes on reconnecting, as it does for every other broker error.

The same dead channel is used again when a task that was running across the outage
finishes: its late ack (or reject) goes to the closed channel and fails the same way,
after the worker has reconnected. That ack is skipped: the message stays in the unacked
index and is delivered again after the visibility timeout (tasks are idempotent).
"""

import logging

from kombu.transport import redis

logger = logging.getLogger(__name__)


class QoS(redis.QoS):
    def _channel_closed(self, what: str, delivery_tag) -> bool:
        if self.channel.connection is not None:
            return False
        logger.warning(
            "%s of message %s skipped: its channel closed with the lost broker connection; "
            "the message is delivered again after the visibility timeout",
            what,
            delivery_tag,
        )
        return True

    def ack(self, delivery_tag):
        if self._channel_closed("ack", delivery_tag):
            return None
        return super().ack(delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        if self._channel_closed("reject", delivery_tag):
            return None
        return super().reject(delivery_tag, requeue=requeue)

    def restore_unacked(self, client=None):
        try:
            return super().restore_unacked(client)
        except (AttributeError, *self.channel.connection_errors) as exc:
            logger.warning(
                "broker connection lost: %d unacknowledged message(s) stay in Redis's unacked index and are "
                "restored after the visibility timeout (%r)",
                len(self._delivered),
                exc,
            )
            self._delivered.clear()
            return None


class Channel(redis.Channel):
    QoS = QoS


class RedisTransport(redis.Transport):
    Channel = Channel
