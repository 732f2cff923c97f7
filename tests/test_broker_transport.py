"""project/broker.py: a failed restore of unacked messages on connection loss is logged, not fatal."""

from unittest import mock

import pytest
from kombu import Connection

from project.broker import QoS, RedisTransport


def test_redis_urls_use_the_patched_transport():
    from project.celery import app

    connection = app.connection_for_write()
    assert isinstance(connection.transport, RedisTransport)
    assert connection.as_uri().startswith("redis://")  # Flower and others read the scheme


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


def test_ack_and_reject_on_a_channel_closed_by_a_lost_connection_are_skipped():
    from django.conf import settings

    with Connection(settings.CELERY_BROKER_URL, transport=RedisTransport) as connection:
        channel = connection.channel()
        qos = channel.qos
        channel.close()  # what a lost connection does: channel.connection becomes None
        assert channel.connection is None
        with (
            mock.patch("kombu.transport.redis.QoS.ack") as ack,
            mock.patch("kombu.transport.redis.QoS.reject") as reject,
        ):
            assert qos.ack("tag-1") is None
            assert qos.reject("tag-2", requeue=True) is None
        ack.assert_not_called()
        reject.assert_not_called()
