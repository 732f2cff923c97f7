"""The brokers a test runs on: the test Redis database, or a virtual host of its own on the machine's RabbitMQ.

`TestBroker` asks either one the same questions (messages waiting in a queue, messages delivered and not
acknowledged), so a test of delivery guarantees reads the same on both.
"""

import contextlib
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from amqp.exceptions import AMQPError
from django.conf import settings
from django.test import override_settings
from kombu import Connection
from kombu.exceptions import KombuError

from tests.rabbitmq import RabbitCluster
from tests.stack import RedisServer

# The machine's RabbitMQ (started before the session, and by .ci/run); tests make virtual hosts on it.
RABBITMQ_HOST = os.environ.get("TEST_RABBITMQ_HOST", "127.0.0.1:5672")
RABBITMQ_CREDENTIALS = os.environ.get("TEST_RABBITMQ_CREDENTIALS", "guest:guest")


def broker_kind(url: str) -> str:
    return "rabbitmq" if url.startswith(("amqp://", "pyamqp://")) else "redis" if url.startswith("redis") else "memory"


@contextmanager
def celery_broker(url: str):
    """Settings and the Celery app on another broker URL. The app forgets its pools both ways (kombu keeps them,
    one per URL, in `kombu.pools`: the next test on Redis gets its connections back). To or from RabbitMQ it
    also takes that broker's queues (quorum, topic exchanges: config/settings/celery.py) and transport options."""
    from config.celery import app
    from config.settings.celery import task_queues

    kind = broker_kind(url)
    switch_queues = "rabbitmq" in (kind, settings.BROKER_KIND)
    overrides: dict = {"CELERY_BROKER_URL": url}
    conf: dict = {"broker_url": url}
    if switch_queues:
        options = {"confirm_publish": True} if kind == "rabbitmq" else settings.CELERY_BROKER_TRANSPORT_OPTIONS
        queues = task_queues(kind)
        overrides |= {"BROKER_KIND": kind, "CELERY_TASK_QUEUES": queues, "CELERY_BROKER_TRANSPORT_OPTIONS": options}
        conf |= {"task_queues": queues, "broker_transport_options": options}

    def drop_pools():
        app._pool = None
        if switch_queues:
            app.__dict__.pop("amqp", None)  # rebuilt from the conf: queues, router, producer pool
        elif "amqp" in app.__dict__:
            app.amqp._producer_pool = None

    previous = {key: app.conf[key] for key in conf}
    with override_settings(**overrides):
        drop_pools()
        app.conf.update(conf)
        try:
            yield
        finally:
            drop_pools()
            app.conf.update(previous)


@contextmanager
def rabbitmq_queues_with_delivery_limit(limit: int):
    """This process declares the task queues with another delivery limit, as workers started with
    RABBITMQ_DELIVERY_LIMIT=<limit> do (a queue's arguments must be the same in every process that declares it)."""
    from config.celery import app
    from config.settings.celery import task_queues

    saved = app.conf.task_queues
    app.conf.task_queues = task_queues("rabbitmq", delivery_limit=limit)
    app.__dict__.pop("amqp", None)
    try:
        yield
    finally:
        app.conf.task_queues = saved
        app.__dict__.pop("amqp", None)


# Delivery guarantees are tested on both brokers: `@on_both_brokers` runs a test once on Redis and once on
# RabbitMQ (a virtual host of its own: the `broker` fixture, tests/conftest.py); the workers it starts follow
# (tests/e2e/conftest.py: worker_env).
on_both_brokers = pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """`rabbitmqctl ...` against the machine's node; fails the test, loudly, when it does not answer."""
    try:
        done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"rabbitmqctl {' '.join(args)}: {exc!r} (is RabbitMQ running? .ci/run starts it)")
    if done.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)} exited {done.returncode}: {done.stderr or done.stdout}")
    return done.stdout


# Virtual hosts are deleted in the background (a second per call); the session waits for them at its end.
_deletions: list[threading.Thread] = []


@dataclass
class RabbitVhost:
    name: str

    @property
    def url(self) -> str:
        return f"amqp://{RABBITMQ_CREDENTIALS}@{RABBITMQ_HOST}/{self.name}"

    @classmethod
    @contextlib.contextmanager
    def made(cls) -> Iterator["RabbitVhost"]:
        """A new virtual host that guest may use, deleted (with its queues) afterwards."""
        vhost = cls(f"test-{uuid.uuid4().hex[:12]}")
        rabbitmqctl("add_vhost", vhost.name)
        try:
            user = RABBITMQ_CREDENTIALS.split(":", 1)[0]
            rabbitmqctl("set_permissions", "-p", vhost.name, user, ".*", ".*", ".*")
            yield vhost
        finally:
            deletion = threading.Thread(
                target=subprocess.run,
                args=(["rabbitmqctl", "-q", "delete_vhost", vhost.name],),
                kwargs={"capture_output": True, "timeout": 60},
                daemon=True,
            )
            deletion.start()
            _deletions.append(deletion)


def wait_for_vhost_deletions() -> None:
    for deletion in _deletions:
        deletion.join(60)


@dataclass
class TestBroker:
    """The broker of one test: `kind` ("redis" or "rabbitmq") and `url`; on Redis, also the client's commands."""

    __test__ = False  # not a test class, whatever its name

    kind: str
    url: str
    vhost: RabbitVhost | None = None
    _client: Any = field(default=None, repr=False)

    @property
    def client(self) -> redis.Redis:
        assert self.kind == "redis", "a Redis command on RabbitMQ: ask depth() or unacked() instead"
        if self._client is None:
            self._client = redis.Redis.from_url(self.url)
        return self._client

    def __getattr__(self, name: str) -> Any:
        # `broker.llen("critical")` and the other Redis commands of the tests written for Redis.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.client, name)

    def flush(self) -> None:
        self.client.flushdb()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def depth(self, queue: str) -> int:
        """Messages waiting in `queue` (not those delivered to a worker); 0 for a queue not declared yet."""
        if self.kind == "redis":
            return int(self.client.llen(queue))
        with Connection(self.url, connect_timeout=5) as connection:
            channel = connection.channel()
            try:
                return int(channel.queue_declare(queue=queue, passive=True).message_count)
            except connection.channel_errors:
                return 0

    def task_names(self, queue: str) -> list[str]:
        """The task names of the messages waiting in `queue`, oldest first. On RabbitMQ they are taken and given
        back unacknowledged (each counts one more delivery): for the end of a test."""
        if self.kind == "redis":
            # kombu pushes on the left and pops on the right: the oldest is last.
            return [json.loads(raw)["headers"]["task"] for raw in reversed(self.client.lrange(queue, 0, -1))]
        names = []
        with Connection(self.url, connect_timeout=5) as connection:
            channel = connection.channel()
            while (message := channel.basic_get(queue, no_ack=False)) is not None:
                names.append(message.headers["task"])
        return names

    def unacked(self) -> int:
        """Messages delivered to a worker and not acknowledged yet, over every queue."""
        if self.kind == "redis":
            return int(self.client.hlen("unacked"))
        assert self.vhost is not None
        lines = rabbitmqctl("list_queues", "-p", self.vhost.name, "--no-table-headers", "messages_unacknowledged")
        return sum(int(line) for line in lines.split() if line.strip().isdigit())


# kombu's Redis transport keeps a list per priority step next to the queue's own.
REDIS_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


class PrivateBroker:
    """A broker process of the test's own, Redis (AOF on, as in compose) or a one-node RabbitMQ (tests/rabbitmq.py),
    so stopping it disturbs nothing else: for the outage and chaos tests, on either broker."""

    # What asking a broker that is down raises.
    ERRORS = (redis.RedisError, OSError, KombuError, AMQPError)

    def __init__(self, kind: str, directory):
        self.kind = kind
        directory.mkdir()
        if kind == "redis":
            self.redis = RedisServer(directory, aof=True)
            self.redis.start()
            self.url = self.redis.url
        else:
            self.rabbit = RabbitCluster(directory, nodes=1).start()
            self.url = self.rabbit.url("/")
        self._connection: Connection | None = None

    def env(self) -> dict[str, str]:
        """What points every process at this broker (settings: REDIS_URL, or CELERY_BROKER_URL for RabbitMQ)."""
        return {"REDIS_URL": self.url} if self.kind == "redis" else {"CELERY_BROKER_URL": self.url}

    def kill(self) -> None:
        if self.kind == "redis":
            self.redis.kill()
        else:
            self.rabbit.stop_node(0, kill=True)

    def start(self) -> None:
        """Start it again, with the data it had (AOF; RabbitMQ's quorum queues on disk)."""
        if self.kind == "redis":
            self.redis.start()
        else:
            self.rabbit.start_node(0)

    def blip(self) -> None:
        self.kill()
        time.sleep(1)
        self.start()

    def heal(self) -> None:
        if self.kind == "redis":
            if not self.redis.answers():
                self.redis.start()
        elif not self.rabbit.node_running(0):
            self.rabbit.stop_node(0, kill=True)  # reaps what is left of it
            self.rabbit.start_node(0)

    def depth(self, queue: str) -> int:
        """Messages waiting in `queue`, its priority lists included on Redis. Raises ERRORS while it is down."""
        if self.kind == "redis":
            return sum(self.client.llen(queue + suffix) for suffix in REDIS_PRIORITY_SUFFIXES)
        if self._connection is None:
            self._connection = Connection(self.url, connect_timeout=2)
        try:
            channel = self._connection.channel()
            try:
                return channel.queue_declare(queue=queue, passive=True).message_count
            finally:
                channel.close()
        except BaseException:
            self._connection.release()
            self._connection = None
            raise

    @property
    def client(self) -> redis.Redis:
        if not hasattr(self, "_client"):
            self._client = redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
        return self._client

    def stop(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.release()
        if self.kind == "redis":
            self.redis.kill()
        else:
            self.rabbit.destroy()
