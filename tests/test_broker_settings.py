"""The broker is chosen by URL: CELERY_BROKER_URL=amqp://... is RabbitMQ with its quorum queues; else Redis at
REDIS_URL; else the filesystem broker. Each case is a fresh interpreter on the production settings."""

import json

import pytest

from tests.security.test_settings import PRODUCTION, run_django

SHOW = (
    "import json, django; django.setup(); from django.conf import settings; from config.celery import app;"
    "print(json.dumps({'kind': settings.BROKER_KIND, 'url': app.conf.broker_url,"
    " 'options': app.conf.broker_transport_options,"
    " 'queues': {q.name: [q.exchange.type, q.queue_arguments] for q in app.conf.task_queues}}))"
)


def settings_with(tmp_path, **env) -> dict:
    result = run_django(tmp_path, ["-c", SHOW], {**PRODUCTION, **env})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.process
def test_an_amqp_url_runs_on_rabbitmq_quorum_queues_with_confirms_a_delivery_limit_and_dead_letters(tmp_path):
    shown = settings_with(
        tmp_path, CELERY_BROKER_URL="amqp://shop:secret@rabbit:5672/shop", REDIS_URL="redis://r:6379/0"
    )
    assert shown["kind"] == "rabbitmq"
    assert shown["url"] == "amqp://shop:secret@rabbit:5672/shop"  # wins over REDIS_URL
    assert shown["options"] == {"confirm_publish": True}
    assert set(shown["queues"]) == {"critical", "bulk", "default"}
    for exchange_type, arguments in shown["queues"].values():
        assert exchange_type == "topic"  # native delayed delivery (countdowns in the broker) needs topic
        assert arguments == {
            "x-queue-type": "quorum",
            "x-delivery-limit": 5,
            "x-dead-letter-exchange": "shop.dead-letter",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }


@pytest.mark.process
def test_without_an_amqp_url_the_queues_are_plain_ones_on_redis(tmp_path):
    shown = settings_with(tmp_path, REDIS_URL="redis://r:6379/0")
    assert (shown["kind"], shown["url"]) == ("redis", "redis://r:6379/0")
    assert shown["options"]["visibility_timeout"] == 3600
    assert {name: queue for name, queue in shown["queues"].items()} == {
        name: ["direct", None] for name in ("critical", "bulk", "default")
    }


@pytest.mark.process
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CELERY_BROKER_URL": "redis://r:6379/0"}, "CELERY_BROKER_URL must be an amqp:// URL"),
        (
            {"CELERY_BROKER_URL": "amqp://rabbit//", "RABBITMQ_CONSUMER_TIMEOUT_SECONDS": "360"},
            "must exceed every queue's hard time limit",
        ),
    ],
    ids=["redis-url-as-broker-url", "consumer-timeout-below-the-report-hard-limit"],
)
def test_a_broker_setting_that_cannot_work_stops_the_site_from_starting(tmp_path, env, message):
    result = run_django(tmp_path, ["-c", "import django; django.setup()"], {**PRODUCTION, **env})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and message in result.stderr
