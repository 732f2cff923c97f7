"""kombu's Redis transport, with one fix: a worker survives losing Redis while it holds unacked messages.

When the broker connection drops, kombu 5.7 tries to push the worker's unacknowledged
messages back onto their queues through the connection that has just gone away
(`QoS.restore_unacked` -> `Channel._connparams`, where `self.connection.client` is
None), and the AttributeError stops the worker with "Unrecoverable error". Those
messages are not lost either way: with `acks_late` they sit in Redis's unacked index
until the visibility timeout, when any worker restores them. So the failed restore is
logged and the worker goes on reconnecting, as it does for every other broker error.
"""

import logging

from kombu.transport import redis

logger = logging.getLogger(__name__)


class QoS(redis.QoS):
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
