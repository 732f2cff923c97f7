"""PostgreSQL restarting under load: web and workers recover by themselves, failed tasks are retried.

The test runs a PostgreSQL cluster of its own (tests/stack.py), so restarting it disturbs
nothing else. gunicorn, the critical and default workers and beat run with the Procfile's
commands against it; the provider is slowed down so that charges are in flight when the
database goes away and their outcome has to be written while it is down.
"""

import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.stack import REPO_ROOT, PostgresServer, wait_for

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

# Where an order stops moving by itself: a final status, or a hold that staff must look at.
SETTLED = {"fulfilled", "rejected", "payment_failed", "cancelled", "on_hold"}


@pytest.fixture
def private_postgres():
    server = PostgresServer()
    server.start()
    server.create_database("shop")
    yield server
    server.destroy()


def manage(env: dict, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


class Shopper:
    """Places orders like a real client: a 503 or a refused connection is retried with the same key."""

    def __init__(self, base: str, token: str):
        self.base = base
        self.headers = {"Authorization": f"Bearer {token}"}
        self.answers: list[int] = []

    def place(self, key: str) -> int:
        for _ in range(60):
            try:
                response = requests.post(
                    f"{self.base}/api/orders/",
                    json={"items": [{"sku": "NB-001", "quantity": 1}]},
                    headers={**self.headers, "Idempotency-Key": key},
                    timeout=15,
                )
            except requests.RequestException:
                self.answers.append(0)
                time.sleep(0.5)
                continue
            self.answers.append(response.status_code)
            if response.status_code == 201:
                return response.json()["id"]
            assert response.status_code == 503, response.text[:500]
            assert response.headers.get("Retry-After")
            time.sleep(0.5)
        raise AssertionError(f"order {key} was never accepted")

    def statuses(self) -> dict[int, str]:
        try:
            response = requests.get(f"{self.base}/api/orders/?limit=100", headers=self.headers, timeout=10)
        except requests.RequestException:
            return {}
        if response.status_code != 200:
            return {}
        return {order["id"]: order["status"] for order in response.json()["items"]}


def test_database_restart_under_load_recovers_and_retries_failed_tasks(
    private_postgres, processes, start_worker, worker_env, sandbox
):
    env = {
        **worker_env,
        "DATABASE_URL": private_postgres.url("shop"),
        "OUTBOX_RELAY_SECONDS": "1",
        "OUTBOX_FAST_PATH_GRACE_SECONDS": "2",
        "CONN_MAX_AGE": "60",
    }
    manage(env, "migrate", "--noinput")
    manage(env, "seed_demo")
    token = manage(env, "issue_api_token", "demo").strip()
    base = processes.web(env)
    processes.beat(env)
    critical = start_worker("critical", concurrency=2, env=env)
    start_worker("default", concurrency=1, env=env)  # emails and the outbox relay
    shopper = Shopper(base, token)
    sandbox.set_faults(latency_ms=2500)  # charges are in flight when the database goes away

    before = [shopper.place(f"before-{n}") for n in range(6)]
    wait_for(lambda: "confirmed" in shopper.statuses().values(), 20, "a charge to be in flight")

    private_postgres.stop("fast")  # disconnects every session, as a restart or failover does
    during: list[int] = []
    placing = threading.Thread(target=lambda: during.extend(shopper.place(f"during-{n}") for n in range(4)))
    placing.start()
    time.sleep(4)
    # A starved machine may take longer for the first answer during the outage: wait for one.
    wait_for(lambda: len(shopper.answers) > len(before), 30, "an answer while the database is down")
    outage_answers = list(shopper.answers[len(before) :])
    private_postgres.start()
    placing.join(60)
    sandbox.set_faults(latency_ms=0)

    ids = before + during
    assert len(set(ids)) == 10
    final = wait_for(
        lambda: (statuses := shopper.statuses()) and all(statuses.get(i) in SETTLED for i in ids) and statuses,
        120,
        "every order to settle after the restart",
        interval=1,
    )
    assert {final[i] for i in ids} == {"fulfilled"}
    # While the database was down the web answered 503 + Retry-After (or refused), never 500.
    assert 500 not in shopper.answers
    assert any(code in (503, 0) for code in outage_answers), outage_answers
    # Tasks caught by the outage failed with a database error and were retried, not lost.
    log = critical.log()
    assert "Retry in" in log and "OperationalError" in log, log[-3000:]
