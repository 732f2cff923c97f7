"""Chaos: 500 orders through the real stack while workers are killed and Redis and the provider bounce.

Real processes: gunicorn, a critical and a default worker, beat, the sandbox provider,
and a redis-server of the test's own (AOF on, as in docker-compose.yml), all on the
pytest PostgreSQL database. Clients behave like real ones: on a connection error or a
503 they retry with the same Idempotency-Key. Afterwards every order must be in a
terminal state, nothing charged or shipped twice (the sandbox's ledger), and the stock
must add up.
"""

import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from django.db.models import Sum

from orders.models import Order, OrderItem, Product
from orders.services import issue_api_token
from tests.factories import ProductFactory, UserFactory
from tests.sandbox_fixtures import SandboxProcess
from tests.stack import Processes, RedisServer, free_port, http_ok, wait_for

pytestmark = [pytest.mark.worker, pytest.mark.chaos, pytest.mark.django_db(transaction=True)]

ORDERS = 500
SKUS = [f"CHAOS-{n}" for n in range(8)]
STOCK_EACH = 80  # 640 units for about 750 wanted: some orders are rightly rejected
FAST_RECOVERY = {
    "STALE_ORDER_SECONDS": "5",
    "STALE_ORDER_SWEEP_SECONDS": "2",
    "CHARGE_RETRY_WINDOW_SECONDS": "30",
    "CELERY_VISIBILITY_TIMEOUT": "10",
    "CELERY_UNACKED_RESTORE_INTERVAL": "1",
    "CELERY_UNACKED_RESTORE_THROTTLE": "1",
    "PROVIDER_READ_TIMEOUT": "5",
}


@pytest.fixture
def stack(tmp_path, worker_env, start_worker):
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    redis_server = RedisServer(redis_dir, aof=True)
    redis_server.start()
    processes = Processes(tmp_path)
    web_port, sandbox_port = free_port(), free_port()
    sandbox_env = {
        "SANDBOX_PORT": str(sandbox_port),
        "SHOP_WEBHOOK_URL": f"http://127.0.0.1:{web_port}/payments/webhooks/provider/",
        "SANDBOX_ERROR_RATE": "0.05",
        "SANDBOX_DECLINE_RATE": "0.03",
    }
    sandbox = SandboxProcess(db_path=tmp_path / "ledger.sqlite3", log_path=tmp_path / "sandbox.log", env=sandbox_env)
    env = {
        **worker_env,
        **FAST_RECOVERY,
        "REDIS_URL": redis_server.url,
        "PAYMENT_PROVIDER_URL": sandbox.url,
        "FULFILLMENT_API_URL": sandbox.url,
    }
    base = processes.web(env, port=web_port)
    processes.beat(env)
    state = {
        "base": base,
        "env": env,
        "redis": redis_server,
        "sandbox": sandbox,
        "sandbox_env": sandbox_env,
        "critical": start_worker("critical", concurrency=2, env=env, name="critical-chaos"),
        "default": start_worker("default", concurrency=1, env=env, name="default-chaos"),
        "tmp": tmp_path,
        "processes": processes,
    }
    yield state
    processes.stop_all()
    state["sandbox"].stop()
    redis_server.kill()


def place(base: str, token: str, key: str, items: list[dict], statuses: Counter) -> int:
    """POST like a real client: retry connection errors and 503s with the same key."""
    for _ in range(30):
        try:
            response = requests.post(
                f"{base}/api/orders/",
                json={"items": items},
                headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key},
                timeout=15,
            )
        except requests.RequestException:
            statuses["connection error"] += 1
            time.sleep(0.5)
            continue
        statuses[response.status_code] += 1
        if response.status_code == 201:
            return response.json()["id"]
        if response.status_code != 503:
            raise AssertionError(f"unexpected {response.status_code}: {response.text[:300]}")
        time.sleep(0.5)
    raise AssertionError(f"order {key} was never accepted")


def restart_sandbox(state: dict, name: str) -> None:
    tmp = state["tmp"]
    for attempt in range(3):
        try:
            state["sandbox"] = SandboxProcess(
                db_path=tmp / "ledger.sqlite3", log_path=tmp / f"sandbox-{name}-{attempt}.log", env=state["sandbox_env"]
            )
            return
        except RuntimeError:  # not healthy in time (the port still held a moment): try again
            time.sleep(1)
    raise RuntimeError("the sandbox did not come back")


def kill_sandbox(state: dict) -> None:
    # The gunicorn arbiter and its worker, which holds the listening socket.
    subprocess.run(["pkill", "-KILL", "-P", str(state["sandbox"].process.pid)], check=False)
    state["sandbox"].process.kill()
    state["sandbox"].process.wait(5)
    state["sandbox"].stop()


def chaos(state: dict, start_worker, stop: threading.Event, log: list[str]) -> None:
    """Kill the critical worker, bounce Redis, bounce the provider, in turn, until told to stop.

    A step that fails is logged and the next one goes on: `heal` brings everything back at the end.
    """
    actions = ["kill worker", "bounce redis", "kill worker", "bounce sandbox"]
    step = 0
    while not stop.wait(3):
        action = actions[step % len(actions)]
        step += 1
        log.append(f"{time.strftime('%H:%M:%S')} {action}")
        try:
            if action == "kill worker":
                os.killpg(state["critical"].process.pid, signal.SIGKILL)
                state["critical"].process.wait(5)
                state["critical"] = start_worker(
                    "critical", concurrency=2, env=state["env"], name="critical-chaos", ready_timeout=60
                )
            elif action == "bounce redis":
                state["redis"].kill()
                time.sleep(2)
                state["redis"].start()
            else:
                kill_sandbox(state)
                time.sleep(1)
                restart_sandbox(state, str(step))
        except Exception as exc:  # a chaos step that did not complete is itself chaos; heal() repairs it
            log.append(f"{time.strftime('%H:%M:%S')} {action} did not complete: {exc!r}"[:300])


def heal(state: dict, start_worker) -> None:
    """After the failures: Redis, the provider and a critical worker are up again."""
    if not state["redis"].answers():
        state["redis"].start()
    if state["sandbox"].process.poll() is not None or not http_ok(f"{state['sandbox'].url}/healthz"):
        kill_sandbox(state)
        restart_sandbox(state, "heal")
    if state["critical"].process.poll() is not None:
        state["critical"] = start_worker("critical", concurrency=2, env=state["env"], name="critical-chaos")


def test_500_orders_under_chaos_end_terminal_charged_once_and_stock_adds_up(stack, start_worker):
    try:
        run_chaos(stack, start_worker)
    except BaseException:
        print(stack["processes"].logs())
        raise


def run_chaos(stack, start_worker):
    products = {sku: ProductFactory(sku=sku, stock=STOCK_EACH, price="5.00") for sku in SKUS}
    shoppers = [UserFactory() for _ in range(10)]
    tokens = [issue_api_token(user=shopper) for shopper in shoppers]
    rng = random.Random(20261124)
    plans = [
        (tokens[n % len(tokens)], f"chaos-{n}", [{"sku": rng.choice(SKUS), "quantity": rng.choice([1, 1, 2])}])
        for n in range(ORDERS)
    ]
    statuses: Counter = Counter()
    stop, chaos_log = threading.Event(), []
    chaos_thread = threading.Thread(target=chaos, args=(stack, start_worker, stop, chaos_log), daemon=True)
    chaos_thread.start()

    def paced(plan):
        time.sleep(0.2)  # about 30 orders a second: the load and the failures overlap
        return place(stack["base"], *plan, statuses)

    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            ids = list(pool.map(paced, plans))
        # Keep failing while the pipeline works through the backlog: two rounds of every failure.
        wait_for(lambda: len(chaos_log) >= 8, 180, "two rounds of failures", interval=1)
    finally:
        stop.set()
        chaos_thread.join(120)
    heal(stack, start_worker)
    print("chaos:", chaos_log, "answers:", dict(statuses))
    assert not chaos_thread.is_alive()
    assert sum("did not complete" not in entry for entry in chaos_log) >= 8, chaos_log
    assert not any(isinstance(code, int) and code >= 500 and code != 503 for code in statuses), statuses
    assert len(set(ids)) == ORDERS == Order.objects.count()  # retried requests made no duplicates

    terminal = {status.value for status in Order.TERMINAL}
    wait_for(
        lambda: not Order.objects.exclude(status__in=terminal).exists(),
        240,
        "every order to reach a terminal state",
        interval=1,
    )
    by_status = Counter(Order.objects.values_list("status", flat=True))
    print("final:", dict(by_status))
    assert by_status["fulfilled"] > 0 and by_status["rejected"] > 0

    ledger = stack["sandbox"]
    summary = requests.get(f"{ledger.url}/v1/ledger/summary", timeout=10).json()
    assert summary["charges"]["references_charged_more_than_once"] == []
    assert summary["shipments"]["orders_shipped_more_than_once"] == []
    by_reference = summary["charges"]["by_reference"]
    for order_id, status in Order.objects.values_list("id", "status"):
        charged = by_reference.get(f"order-{order_id}", {"succeeded": 0, "declined": 0})
        if status == "fulfilled":
            assert charged["succeeded"] == 1, (order_id, charged)
        elif status == "payment_failed":
            assert (charged["succeeded"], charged["declined"]) == (0, 1), (order_id, charged)
        else:  # rejected or cancelled: never charged
            assert charged["succeeded"] == 0, (order_id, status, charged)
    assert summary["shipments"]["total"] == by_status["fulfilled"]

    for sku, product in products.items():
        sold = (
            OrderItem.objects.filter(sku=sku, order__status="fulfilled").aggregate(total=Sum("quantity"))["total"] or 0
        )
        left = Product.objects.get(pk=product.pk).stock
        assert left + sold == STOCK_EACH, (sku, left, sold)
