"""The broker a bench run measures, asked through kombu only, so every phase reads the same on both.

- Redis: a private redis-server (tests/stack.py), REDIS_URL in the processes' environment.
- RabbitMQ: a virtual host of the bench's own on the machine's node (BENCH_RABBITMQ_HOST, default
  127.0.0.1:5672; BENCH_RABBITMQ_CREDENTIALS, default guest:guest), made with `rabbitmqctl` and deleted
  at the end; CELERY_BROKER_URL in the processes' environment, so every one of them (the bench's own
  included) declares the queues alike (config/settings/celery.py: task_queues("rabbitmq")) and publishes
  with publisher confirms, as the service does.

`Replies` is how the bench's no-op tasks (bench/tasks.py) tell it when they ran: a queue of its own on the
same broker, read by a kombu consumer.
"""

import collections
import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from kombu import Connection, Consumer, Queue

BROKERS = ("redis", "rabbitmq")
LABELS = {"redis": "Redis", "rabbitmq": "RabbitMQ"}
RABBITMQ_HOST = os.environ.get("BENCH_RABBITMQ_HOST", "127.0.0.1:5672")
RABBITMQ_CREDENTIALS = os.environ.get("BENCH_RABBITMQ_CREDENTIALS", "guest:guest")


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    binary = shutil.which("rabbitmqctl")
    if binary is None:
        raise RuntimeError("rabbitmqctl not found: the RabbitMQ bench needs the machine's RabbitMQ")
    done = subprocess.run(  # noqa: S603 (a fixed command line)
        [binary, "-q", *args], capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} exited {done.returncode}: {done.stderr or done.stdout}")
    return done.stdout


class BenchBroker:
    """One broker for one run: started (or its virtual host made) by `start`, removed by `stop`."""

    def __init__(self, kind: str, workdir: Path):
        if kind not in BROKERS:
            raise ValueError(f"unknown broker {kind!r}: one of {', '.join(BROKERS)}")
        self.kind = kind
        self.workdir = workdir
        self.url = ""
        self.vhost = ""
        self.server: Any = None
        self._connection: Connection | None = None

    @property
    def label(self) -> str:
        return LABELS[self.kind]

    def start(self) -> str:
        if self.kind == "redis":
            from tests.stack import RedisServer

            self.server = RedisServer(self.workdir)
            self.server.start()
            self.url = self.server.url
        else:
            self.vhost = f"bench-{uuid.uuid4().hex[:10]}"
            rabbitmqctl("add_vhost", self.vhost)
            user = RABBITMQ_CREDENTIALS.split(":", 1)[0]
            rabbitmqctl("set_permissions", "-p", self.vhost, user, ".*", ".*", ".*")
            self.url = f"amqp://{RABBITMQ_CREDENTIALS}@{RABBITMQ_HOST}/{self.vhost}"
        return self.url

    def environment(self) -> dict[str, str]:
        """What selects this broker in a process's environment (config/settings/celery.py)."""
        return {"REDIS_URL": self.url} if self.kind == "redis" else {"CELERY_BROKER_URL": self.url}

    def stop(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.release()
            self._connection = None
        if self.server is not None:
            self.server.kill()
            self.server = None
        if self.vhost:
            # Its queues and messages go with it.
            with contextlib.suppress(Exception):
                rabbitmqctl("delete_vhost", self.vhost)
            self.vhost = ""

    def server_version(self) -> str:
        if self.kind == "redis":
            binary = shutil.which("redis-server") or "redis-server"
            out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout  # noqa: S603
            return out.split(" v=")[-1].split()[0] if " v=" in out else out.strip()
        properties = self.connection.connection.server_properties
        version = properties.get("version", "")
        return version.decode() if isinstance(version, bytes) else str(version)

    @property
    def connection(self) -> Connection:
        """The bench's own connection for questions about queues (plain: no publisher confirms needed)."""
        if self._connection is None:
            self._connection = Connection(self.url, connect_timeout=5)
            self._connection.ensure_connection(max_retries=3)
        return self._connection

    @contextlib.contextmanager
    def _channel(self):
        # A channel per question: on RabbitMQ a passive declare of a missing queue (404) closes its channel.
        channel = self.connection.channel()
        try:
            yield channel
        finally:
            with contextlib.suppress(Exception):
                channel.close()

    def depth(self, queue: str) -> int:
        """Messages ready in `queue` (not those delivered and unacknowledged); 0 for a queue not declared yet."""
        with self._channel() as channel:
            try:
                return int(channel.queue_declare(queue=queue, passive=True).message_count)
            except self.connection.channel_errors:
                return 0  # Redis: an empty list is no key; RabbitMQ: not declared yet

    def purge(self, queue: str) -> int:
        """Drop the messages ready in `queue`; returns how many (0 for a queue not declared yet)."""
        with self._channel() as channel:
            try:
                return int(channel.queue_purge(queue) or 0)
            except self.connection.channel_errors:
                return 0

    def replies(self, name: str) -> "Replies":
        return Replies(self.url, name)


class Replies:
    """The records bench.tasks.noop publishes ([sent_at, started_at, finished_at]) to the queue `name`."""

    def __init__(self, url: str, name: str):
        self.connection = Connection(url, connect_timeout=5)
        # The default exchange ("") routes by queue name on both brokers: the tasks publish without declaring.
        self.queue = Queue(name, durable=False, auto_delete=False)
        channel = self.connection.channel()
        self.queue(channel).declare()
        self.queue(channel).purge()
        self.records: collections.deque[list[float]] = collections.deque()
        self.consumer = Consumer(channel, queues=[self.queue], callbacks=[self._received], accept=["json"], no_ack=True)
        self.consumer.consume()

    def _received(self, body: list[float], message: Any) -> None:
        self.records.append(body)

    def _drain(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no reply from a no-op task in time")
        with contextlib.suppress(socket.timeout):
            self.connection.drain_events(timeout=min(remaining, 1.0))

    def next(self, timeout: float = 30) -> list[float]:
        """The next record, waiting up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.records:
            self._drain(deadline)
        return self.records.popleft()

    def collect(self, count: int, timeout: float) -> list[list[float]]:
        """`count` records (every one received so far, at least), waiting up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while len(self.records) < count:
            self._drain(deadline)
        records = list(self.records)
        self.records.clear()
        return records

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.consumer.cancel()
        with contextlib.suppress(Exception):
            self.connection.release()
