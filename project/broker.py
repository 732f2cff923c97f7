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
"""

import logging

import redis as redis_py
from kombu.transport import redis

logger = logging.getLogger(__name__)


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
                "broker connection lost: %d unacknowledged message(s) not restored; their tasks finish and are "
                "acknowledged over a new connection (%r)",
                len(self._delivered),
                exc,
            )
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


class RedisTransport(redis.Transport):
    Channel = Channel
