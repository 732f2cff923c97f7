"""A broker outage with real processes: orders placed while Redis is down are kept and processed once it is back.

The test runs its own redis-server on a free port, so stopping it disturbs nothing else.
gunicorn, a critical worker and beat run with the Procfile's commands against it.
"""

import shutil
import socket
import subprocess
import sys
import time

import pytest
import requests

from orders.models import Order
from orders.services import issue_api_token
from tests.e2e.conftest import REPO_ROOT
from tests.factories import ProductFactory, UserFactory

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

# The README states this bound: about STALE_ORDER_SECONDS + STALE_ORDER_SWEEP_SECONDS after
# the broker is back (60 + 30 s by default). The test runs the sweep with 3 s + 1 s.
SWEEP_ENV = {"STALE_ORDER_SECONDS": "3", "STALE_ORDER_SWEEP_SECONDS": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


class Redis:
    def __init__(self, port: int):
        self.port = port
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is required for this test"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self.answers, 10, "redis-server to start")

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


@pytest.fixture
def private_redis():
    server = Redis(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def processes(tmp_path):
    started: list[tuple[subprocess.Popen, object]] = []

    def spawn(name: str, command: list[str], env: dict) -> subprocess.Popen:
        log = (tmp_path / f"{name}.log").open("wb")
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        started.append((process, log))
        return process

    yield spawn
    for process, log in reversed(started):
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


def test_orders_placed_while_redis_is_down_are_kept_and_processed_when_it_returns(
    private_redis, processes, start_worker, worker_env, tmp_path
):
    ProductFactory(sku="OUTAGE", stock=50)
    shopper = UserFactory()
    token = issue_api_token(user=shopper)
    env = {**worker_env, **SWEEP_ENV, "REDIS_URL": f"redis://127.0.0.1:{private_redis.port}/0"}
    port = free_port()
    processes(
        "web",
        [sys.executable, "-m", "gunicorn", "project.wsgi", "-c", "project/gunicorn.conf.py"],
        {**env, "GUNICORN_BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": "2"},
    )
    processes(
        "beat",
        [sys.executable, "-m", "celery", "-A", "project", "beat", "-s", str(tmp_path / "beat-schedule")],
        env,
    )
    start_worker("critical", concurrency=2, env=env)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _get_ok(f"{base}/healthz"), 20, "gunicorn to answer")

    private_redis.stop()
    assert requests.get(f"{base}/readyz", timeout=10).status_code == 503

    answers = []
    for n in range(5):
        started = time.monotonic()
        response = requests.post(
            f"{base}/api/orders/",
            json={"items": [{"sku": "OUTAGE", "quantity": 1}]},
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": f"outage-{n}"},
            timeout=30,
        )
        answers.append((response.status_code, time.monotonic() - started))
    # Committed now, dispatched later: every request answers 201, quickly, and never 500.
    assert [status for status, _ in answers] == [201] * 5
    assert max(seconds for _, seconds in answers) < 5
    placed = Order.objects.filter(owner=shopper)
    assert placed.count() == 5
    assert set(placed.values_list("status", flat=True)) == {"pending"}

    private_redis.start()  # an empty Redis: the messages that failed to publish are gone for good
    wait_for(
        lambda: set(placed.values_list("status", flat=True)) == {"fulfilled"},
        60,
        "every order placed during the outage to be fulfilled",
    )
    assert requests.get(f"{base}/readyz", timeout=10).status_code == 200


def _get_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.ConnectionError:
        return False
