"""core/broker.py: a failed restore of unacked messages on connection loss is logged, not fatal."""

from unittest import mock

import pytest
from kombu import Connection

from core.broker import QoS, RedisTransport


@pytest.mark.redis  # the broker URL is Redis's (the unit tier's is memory://)
def test_redis_urls_use_the_patched_transport():
    from config.celery import app

    connection = app.connection_for_write()
    assert isinstance(connection.transport, RedisTransport)
    assert connection.as_uri().startswith("redis://")  # Flower and others read the scheme


@pytest.mark.redis  # a channel of the Redis transport on the broker's URL
@pytest.mark.parametrize("error", [AttributeError("'NoneType' object has no attribute 'hostname'"), ConnectionError()])
def test_restore_unacked_that_fails_on_a_dead_connection_does_not_raise(error):
    from django.conf import settings

    with Connection(settings.CELERY_BROKER_URL, transport=RedisTransport) as connection:
        channel = connection.channel()
        qos = channel.qos
        assert isinstance(qos, QoS)
        qos._delivered["tag-1"] = object()
        with mock.patch("kombu.transport.redis.QoS.restore_unacked", side_effect=error):
            assert qos.restore_unacked() is None
        assert not qos._delivered
        channel.close()


def _unacked_message(connection, queue_name: str):
    """A message delivered to this channel and not yet acknowledged: it sits in Redis's unacked index."""
    from kombu import Exchange, Queue

    queue = Queue(queue_name, Exchange(queue_name, type="direct"), routing_key=queue_name)
    producer = connection.Producer()
    producer.publish({"n": 1}, exchange=queue.exchange, routing_key=queue_name, declare=[queue], serializer="json")
    channel = connection.channel()
    message = queue(channel).get(no_ack=False)
    assert message is not None
    return channel, message


def test_late_ack_on_a_channel_closed_by_a_lost_connection_is_made_over_a_new_connection(broker):
    """The Redis blip: the task finished after its channel closed; its ack still removes the message at once."""
    from django.conf import settings

    with Connection(settings.CELERY_BROKER_URL, transport=RedisTransport) as connection:
        channel, message = _unacked_message(connection, "blip-ack")
        qos = channel.qos
        assert broker.hexists(qos.unacked_key, message.delivery_tag)
        # What a lost connection does: channel.connection becomes None, and nothing is restored
        # (a graceful close would push the message back; a lost connection cannot reach Redis).
        qos.restore_at_shutdown = False
        channel.close()
        assert channel.connection is None
        qos.ack(message.delivery_tag)
        assert not broker.hexists(qos.unacked_key, message.delivery_tag)
        assert broker.zscore(qos.unacked_index_key, message.delivery_tag) is None
        assert broker.llen("blip-ack") == 0  # acknowledged, not requeued


def test_reject_on_a_closed_channel_removes_the_message_and_a_requeue_is_left_to_the_visibility_timeout(broker):
    from django.conf import settings

    with Connection(settings.CELERY_BROKER_URL, transport=RedisTransport) as connection:
        channel, dropped = _unacked_message(connection, "blip-reject")
        channel2, kept = _unacked_message(connection, "blip-reject")
        for each in (channel, channel2):
            each.qos.restore_at_shutdown = False
            each.close()
        channel.qos.reject(dropped.delivery_tag, requeue=False)
        channel2.qos.reject(kept.delivery_tag, requeue=True)
        assert not broker.hexists(channel.qos.unacked_key, dropped.delivery_tag)
        assert broker.hexists(channel2.qos.unacked_key, kept.delivery_tag)
        assert broker.llen("blip-reject") == 0


def test_messages_held_but_not_running_when_the_connection_was_lost_are_restored_on_reconnect(broker):
    """Prefetched or waiting for a countdown: the worker dropped them; they go back to the queue at once."""
    from django.conf import settings

    from core import broker as transport

    with Connection(settings.CELERY_BROKER_URL, transport=RedisTransport) as connection:
        lost = [_unacked_message(connection, "blip-orphans") for _ in range(2)]
        (_, running), (_, held) = lost
        for channel, _ in lost:
            # The connection is lost: Redis cannot be reached to push them back.
            with mock.patch("kombu.transport.redis.QoS.restore_unacked", side_effect=ConnectionError()):
                channel.qos.restore_unacked()
            channel.qos.restore_at_shutdown = False
            channel.close()
        assert broker.llen("blip-orphans") == 0

        with mock.patch.object(transport, "_running_delivery_tags", return_value={running.delivery_tag}):
            fresh = connection.channel()
            fresh.basic_consume("blip-orphans", no_ack=False, callback=lambda message: None, consumer_tag="t")
        unacked_key = fresh.qos.unacked_key
        assert broker.llen("blip-orphans") == 1  # the held one is back on its queue
        assert not broker.hexists(unacked_key, held.delivery_tag)
        assert broker.hexists(unacked_key, running.delivery_tag)  # the running one acks when it finishes
        assert not transport._orphaned
        fresh.close()


def _filesystem_connection(folder, transport):
    return Connection(
        "filesystem://localhost/",
        transport=transport,
        transport_options={"data_folder_in": str(folder), "data_folder_out": str(folder)},
    )


@pytest.mark.parametrize("transport_name", ["kombu", "ours"])
def test_a_consumer_never_takes_a_message_file_before_it_is_written_whole(tmp_path, transport_name):
    """kombu's filesystem transport writes a message under its final name: a consumer polling then reads it empty."""
    from queue import Empty

    from kombu.transport import filesystem

    from core import broker

    module, transport = (broker, broker.FilesystemTransport) if transport_name == "ours" else (filesystem, None)
    encode = module.str_to_bytes
    taken = []
    with _filesystem_connection(tmp_path, transport or filesystem.Transport) as connection:
        channel = connection.channel()

        def encode_while_a_consumer_polls(data):
            # What a worker polling the folder takes at this moment: nothing yet, or the message whole.
            try:
                taken.append(channel._get("critical"))
            except Empty:
                taken.append(None)
            except ValueError as exc:  # the file taken before its bytes were in
                taken.append(exc)
            return encode(data)

        with mock.patch.object(module, "str_to_bytes", side_effect=encode_while_a_consumer_polls):
            channel._put("critical", {"n": 1})

        if transport_name == "kombu":
            assert isinstance(taken[0], ValueError), (
                "kombu writes files whole now: drop core.broker.FilesystemTransport"
            )
        else:
            assert taken == [None]
            assert channel._get("critical") == {"n": 1}
        channel.close()


def test_filesystem_urls_use_the_patched_transport(settings):
    from kombu import Connection as KombuConnection

    from core.broker import FilesystemTransport

    with KombuConnection("filesystem://localhost/") as connection:
        assert isinstance(connection.transport, FilesystemTransport)
