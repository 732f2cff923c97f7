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

Redis only. On RabbitMQ (CELERY_BROKER_URL=amqp://...) none of this is needed: the broker itself gives a
consumer's unacknowledged messages back to their queues the moment its connection closes, there is no
visibility timeout, and an ack over a dead connection is simply redone by the next delivery (tasks are
idempotent). Its guards are in the queues' arguments instead (config/settings/celery.py: task_queues).

The filesystem transport (`make run` without REDIS_URL) gets one fix too: kombu writes a
message file under its final name and a consumer polling the folder can take it before the
bytes are in (an empty or partial read: a JSON error, the message lost). Here the file is
written under a name no consumer matches and renamed into place, which is atomic.
"""

import logging
import os
import uuid
from collections import OrderedDict
from time import monotonic
from typing import Any, cast

import redis as redis_py
from kombu.exceptions import ChannelError
from kombu.transport import filesystem, redis
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

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
    # Narrower than kombu-stubs says: this transport's channel, and `_delivered` is set in __init__.
    channel: "Channel"
    _delivered: OrderedDict[str, Any]

    def _channel_closed(self) -> bool:
        return self.channel.connection is None

    def _fresh_client(self) -> redis_py.Redis:
        return redis_py.Redis(**self.channel.fresh_connection_params, socket_timeout=5, socket_connect_timeout=5)

    def _settle_on_fresh_connection(self, what: str, delivery_tag: str) -> None:
        try:
            client = self._fresh_client()
            try:
                # kombu-stubs leave out this method of kombu's Redis QoS.
                self._remove_from_indices(delivery_tag, pipe=client.pipeline()).execute()  # type: ignore[attr-defined]
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

    def ack(self, delivery_tag: str) -> None:
        if self._channel_closed():
            return self._settle_on_fresh_connection("ack", delivery_tag)
        return super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if self._channel_closed():
            if requeue:
                # Putting it back needs the closed channel's exchange table: leave it in the unacked
                # index, from which any worker restores it after the visibility timeout.
                logger.warning("requeue of message %s left to the visibility timeout (channel closed)", delivery_tag)
                self._delivered.pop(delivery_tag, None)
                return None
            return self._settle_on_fresh_connection("reject", delivery_tag)
        return super().reject(delivery_tag, requeue=requeue)

    def restore_unacked(self, client: Any | None = None) -> None:
        lost: tuple[type[BaseException], ...] = (AttributeError, *self.channel.connection_errors)
        try:
            return super().restore_unacked(client)
        except lost as exc:
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
    connection_errors: tuple[type[BaseException], ...]  # set by kombu's Channel.__init__; not in kombu-stubs

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Kept while the connection is alive: a late ack after the connection is gone needs it.
        conninfo = self.connection.client
        assert conninfo is not None  # a channel is opened on a live connection
        self.fresh_connection_params = {
            "host": conninfo.hostname or "127.0.0.1",
            "port": conninfo.port or self.connection.default_port,
            "db": self._prepare_virtual_host(conninfo.virtual_host),  # type: ignore[attr-defined]  # not in kombu-stubs
            "username": conninfo.userid,
            "password": conninfo.password,
        }

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
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
            cast(QoS, self.qos).restore_by_tag(tag, leftmost=True)
        if held:
            logger.info("restored %d message(s) held when the broker connection was lost", len(held))


class RedisTransport(redis.Transport):
    Channel = Channel


class FilesystemChannel(filesystem.Channel):
    def _put(self, queue: str, payload: dict[str, Any], **kwargs: Any) -> None:  # type: ignore[override]  # as kombu's own
        """Put a message on `queue` whole: written under a `.part` name (no consumer matches it), then renamed."""
        # kombu's own name, which orders the folder by time of writing.
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = f"{final}.part"
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class FilesystemTransport(filesystem.Transport):
    Channel = FilesystemChannel
