"""Chaos: 500 orders through the real stack while workers are killed, the broker blips, and the provider, the
warehouse and the mail server go away. Once on Redis, once on RabbitMQ.

Real processes: gunicorn, a critical and a default worker, beat, the sandbox as the payment
provider, a second sandbox as the warehouse (the sandbox's faults hit every create it serves,
so a warehouse of its own fails shipments only), a mail server of the test's own, and a
broker of the test's own: a redis-server (AOF on, as in docker-compose.yml) or a RabbitMQ node
(tests/rabbitmq.py; its quorum queues keep what they confirmed across a kill), all on the pytest
PostgreSQL database. A broker blip kills it (SIGKILL) and starts it again: a second for Redis,
a few seconds for RabbitMQ, which takes longer to boot. Clients behave like real ones: on a
connection error or a 5xx they retry with the same Idempotency-Key.

Afterwards, first what must hold even if something is still unfinished: nothing is charged or
shipped twice (the sandboxes' ledgers), the stock adds up with its movements, no email went out
twice, there are no more dead letters than pieces of work that really failed, and no queue ever
held more than twice its open work. Then that everything finished within a stated bound: every
order in a final status or on hold with a reason for the shopper, every email sent, and no
answer but 503 among the 5xx.
"""

import json
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
from django.db import connections
from django.db.models import Count, Q, Sum

from accounts.services import issue_api_token
from core.models import OutboxItem
from notifications.models import Notification
from ops.models import FailedTask
from orders.models import Order, OrderEvent, OrderItem, Product, StockMovement
from payments.models import Payment
from tests.brokers import REDIS_PRIORITY_SUFFIXES, PrivateBroker
from tests.factories import ProductFactory, UserFactory
from tests.sandbox_fixtures import SandboxClient, SandboxProcess
from tests.stack import Processes, free_port, http_ok, wait_for

pytestmark = [
    pytest.mark.worker,
    pytest.mark.chaos,
    # Load and two rounds of failures (about 2 minutes), then up to SETTLED_WITHIN_SECONDS (340 s).
    pytest.mark.timeout(900),
    pytest.mark.django_db(transaction=True),
]

ORDERS = 500
SKUS = [f"CHAOS-{n}" for n in range(8)]
STOCK_EACH = 80  # 640 units for about 750 wanted: some orders are rightly rejected
CRITICAL_CONCURRENCY = 2
DEFAULT_CONCURRENCY = 1
# The recovery window, production's rule with shorter numbers: a killed worker's messages come
# back after the visibility timeout, which must stay above the longest retry countdown (120 s:
# sync_to_fulfillment, send_notification) plus the hard time limit, or a message waiting out its
# countdown is delivered a second time while the first copy still waits, and each copy retries
# on its own. Production: time limits 60/90 s (critical) and 30/60 s (default), 3600 s.
HARD_TIME_LIMIT = 30
VISIBILITY_TIMEOUT = 120 + HARD_TIME_LIMIT + 10
FAST_RECOVERY = {
    "OUTBOX_RELAY_SECONDS": "1",
    "OUTBOX_FAST_PATH_GRACE_SECONDS": "2",
    # A message a killed worker took off its queue but never recorded as unacknowledged is looked for
    # on the broker, and published again, this long after its publish.
    "OUTBOX_LOST_AFTER_SECONDS": "60",
    # Parked work (warehouse or mail down for all its retries) resumes within the test.
    "FULFILLMENT_RESUME_SECONDS": "20",
    "NOTIFICATION_RESUME_SECONDS": "20",
    "CELERY_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
    "CELERY_UNACKED_RESTORE_INTERVAL": "1",
    "CELERY_UNACKED_RESTORE_THROTTLE": "1",
    "CRITICAL_SOFT_TIME_LIMIT": "20",
    "CRITICAL_TIME_LIMIT": str(HARD_TIME_LIMIT),
    "DEFAULT_SOFT_TIME_LIMIT": "20",
    "DEFAULT_TIME_LIMIT": str(HARD_TIME_LIMIT),
    # Each call's deadline under the soft limit, as in production.
    "PROVIDER_CALL_DEADLINE": "10",
    "PROVIDER_READ_TIMEOUT": "5",
    "EMAIL_TIMEOUT": "5",
}
# After the failures stop: a killed worker's messages are back after the visibility timeout, and
# what they start may wait out a retry countdown at its cap (120 s); parked work resumes after
# 20 s, within that. Plus a minute for a loaded machine.
SETTLED_WITHIN_SECONDS = VISIBILITY_TIMEOUT + 120 + 60
# Each open outbox item has one message on the broker, two for a moment while a retry is handed over.
MESSAGES_PER_OPEN_ITEM = 2
QUEUES = {"critical": ("orders.", "payments."), "default": ("notifications.", "core."), "bulk": ("reports.",)}
PRIORITY_SUFFIXES = REDIS_PRIORITY_SUFFIXES
RELAY_TASK = "core.tasks.relay_outbox"
ORDER_STEPS = ("orders.tasks.process_order", "orders.tasks.charge_order", "orders.tasks.sync_to_fulfillment")
RESUMABLE = ("orders.tasks.sync_to_fulfillment", "notifications.tasks.send_notification")


@pytest.fixture(params=["redis", "rabbitmq"])
def chaos_broker(request, tmp_path):
    broker = PrivateBroker(request.param, tmp_path / request.param)
    yield broker
    broker.stop()


@pytest.fixture
def stack(tmp_path, worker_env, start_worker, mail, chaos_broker):
    processes = Processes(tmp_path)
    web_port, sandbox_port = free_port(), free_port()
    sandbox_env = {
        "SANDBOX_PORT": str(sandbox_port),
        "SHOP_WEBHOOK_URL": f"http://127.0.0.1:{web_port}/payments/webhooks/provider/",
        "SANDBOX_ERROR_RATE": "0.05",
        "SANDBOX_DECLINE_RATE": "0.03",
    }
    sandbox = SandboxProcess(db_path=tmp_path / "ledger.sqlite3", log_path=tmp_path / "sandbox.log", env=sandbox_env)
    warehouse = SandboxProcess(db_path=tmp_path / "warehouse.sqlite3", log_path=tmp_path / "warehouse.log")
    env = {
        **worker_env,
        **FAST_RECOVERY,
        **chaos_broker.env(),
        "PAYMENT_PROVIDER_URL": sandbox.url,
        "FULFILLMENT_API_URL": warehouse.url,
        "EMAIL_URL": mail.url,
    }
    base = processes.web(env, port=web_port)
    processes.beat(env)
    state = {
        "base": base,
        "env": env,
        "broker": chaos_broker,
        "sandbox": sandbox,
        "sandbox_env": sandbox_env,
        "warehouse": SandboxClient(warehouse.url),
        "mail": mail,
        "critical": start_worker(
            "critical", concurrency=CRITICAL_CONCURRENCY, env=env, name="critical-chaos", ready_timeout=60
        ),
        "default": start_worker(
            "default", concurrency=DEFAULT_CONCURRENCY, env=env, name="default-chaos", ready_timeout=60
        ),
        "tmp": tmp_path,
        "processes": processes,
    }
    yield state
    processes.stop_all()
    state["sandbox"].stop()
    warehouse.stop()


def place(base: str, token: str, key: str, items: list[dict], statuses: Counter) -> int:
    """POST like a real client: retry connection errors and 5xx answers with the same key.

    Any 5xx but 503 is still a failure: the test reports it once everything else is checked.
    """
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
        if response.status_code < 500:
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


# One round of failures, in this order, one step every 3 s or so. The warehouse and the mail
# server stay away for several steps (about half a minute); the broker only for a moment.
ACTIONS = [
    "kill worker",
    "broker blip",
    "warehouse down",
    "bounce sandbox",
    "mail down",
    "kill worker",
    "broker blip",
    "warehouse back",
    "mail back",
    "broker blip",
]


def chaos(state: dict, start_worker, stop: threading.Event, log: list[str]) -> None:
    """Run ACTIONS in turn until told to stop.

    A step that fails is logged and the next one goes on: `heal` brings everything back at the end.
    """
    step = 0
    while not stop.wait(3):
        action = ACTIONS[step % len(ACTIONS)]
        step += 1
        log.append(f"{time.strftime('%H:%M:%S')} {action}")
        try:
            if action == "kill worker":
                os.killpg(state["critical"].process.pid, signal.SIGKILL)
                state["critical"].process.wait(5)
                state["critical"] = start_worker(
                    "critical",
                    concurrency=CRITICAL_CONCURRENCY,
                    env=state["env"],
                    name="critical-chaos",
                    ready_timeout=60,
                )
            elif action == "broker blip":
                state["broker"].blip()
            elif action == "bounce sandbox":
                kill_sandbox(state)
                time.sleep(1)
                restart_sandbox(state, str(step))
            elif action == "warehouse down":
                state["warehouse"].set_faults(error_rate=1.0)
            elif action == "warehouse back":
                state["warehouse"].set_faults(error_rate=0.0)
            elif action == "mail down":
                state["mail"].stop()
            elif action == "mail back":
                state["mail"].start()
        except Exception as exc:  # a chaos step that did not complete is itself chaos; heal() repairs it
            log.append(f"{time.strftime('%H:%M:%S')} {action} did not complete: {exc!r}"[:300])


def supervise(state: dict, start_worker) -> None:
    """Start again a worker that exited, or that Celery declared broken, as an operator's supervisor would.

    Seen twice under this test's load (a local run beside other e2e tests, and a CI run): a time-limit
    signal reached a pool process after its task had ended, while it read its next job from billiard's
    pipe; the main process then read garbage ("Unrecoverable error: UnpicklingError: invalid load key")
    and stopped consuming. In the CI run it hung in its shutdown with the process alive, which compose's
    `restart: unless-stopped` alone would not catch (README, When things fail).
    """
    for queue, concurrency in (("critical", CRITICAL_CONCURRENCY), ("default", DEFAULT_CONCURRENCY)):
        worker = state[queue]
        broken = "Unrecoverable error" in worker.log()
        if broken and worker.process.poll() is None:
            os.killpg(worker.process.pid, signal.SIGKILL)  # the worker's session: it and its pool processes
            worker.process.wait(10)
        if worker.process.poll() is not None:
            print(f"{queue} worker exited with {worker.process.returncode} (broken: {broken}): started again")
            state[queue] = start_worker(
                queue, concurrency=concurrency, env=state["env"], name=f"{queue}-chaos", ready_timeout=60
            )


def heal(state: dict, start_worker) -> None:
    """After the failures: the broker, the provider, the warehouse, the mail server and the workers are up."""
    state["broker"].heal()
    if state["sandbox"].process.poll() is not None or not http_ok(f"{state['sandbox'].url}/healthz"):
        kill_sandbox(state)
        restart_sandbox(state, "heal")
    state["warehouse"].set_faults(error_rate=0.0)
    if not state["mail"].answers():
        state["mail"].stop()
        state["mail"].start()
    supervise(state, start_worker)


class QueueSampler(threading.Thread):
    """Every half second: each queue's length on the broker, and the open outbox items whose messages go to it.

    A sample whose queue is longer than MESSAGES_PER_OPEN_ITEM x its open items is looked at
    message by message, to leave out beat's relay messages (not outbox items: one a second,
    piling up while the default worker is busy, and dropped unrun once expired).
    """

    def __init__(self, broker: PrivateBroker):
        super().__init__(daemon=True)
        self.broker = broker
        self.stopped = threading.Event()
        # (queue, waiting, relay messages among them or 0, open items)
        self.samples: list[tuple[str, int, int, int]] = []
        self.errors: list[str] = []

    def open_items(self) -> dict[str, int]:
        counts = dict.fromkeys(QUEUES, 0)
        rows = OutboxItem.objects.filter(state__in=OutboxItem.OPEN).values("task_name").annotate(n=Count("id"))
        for row in rows:
            queue = next((q for q, prefixes in QUEUES.items() if row["task_name"].startswith(prefixes)), "default")
            counts[queue] += row["n"]
        return counts

    def relay_messages(self, queue: str) -> int | None:
        """Beat's relay messages waiting in `queue`; None on RabbitMQ, whose queues cannot be read without taking
        the messages (a sample over the bound there is then left out: see over_bound)."""
        if self.broker.kind != "redis":
            return None
        client = self.broker.client
        bodies = [raw for suffix in PRIORITY_SUFFIXES for raw in client.lrange(queue + suffix, 0, -1)]
        return sum(json.loads(raw)["headers"].get("task") == RELAY_TASK for raw in bodies)

    def sample(self) -> None:
        before = self.open_items()
        waiting = {q: self.broker.depth(q) for q in QUEUES}
        after = self.open_items()
        for queue, length in waiting.items():
            open_items = max(before[queue], after[queue])
            relay = self.relay_messages(queue) if length > MESSAGES_PER_OPEN_ITEM * open_items else 0
            self.samples.append((queue, length, relay, open_items))

    def run(self) -> None:
        try:
            while not self.stopped.wait(0.5):
                try:
                    self.sample()
                except PrivateBroker.ERRORS:
                    pass  # the broker is blipping: no sample this time
                except Exception as exc:  # reported by the test: a sampler that stopped would prove nothing
                    self.errors.append(repr(exc))
        finally:
            connections.close_all()

    def stop(self) -> None:
        self.stopped.set()
        self.join(10)

    def peaks(self) -> dict[str, int]:
        return {q: max((s[1] for s in self.samples if s[0] == q), default=0) for q in QUEUES}

    def over_bound(self, slack: dict[str, int]) -> list[tuple[str, int, int | None, int]]:
        """Samples with more messages than open work allows. On RabbitMQ the default queue's relay messages cannot
        be counted out (relay_messages), so its samples over the bound are not held against it; critical and
        bulk carry no relay messages and are checked as on Redis."""
        return [
            s for s in self.samples if s[2] is not None and s[1] - s[2] > MESSAGES_PER_OPEN_ITEM * s[3] + slack[s[0]]
        ]


def settled() -> bool:
    """Nothing moves any more: no order waits for a step, and no order step or email is still open."""
    if Order.objects.filter(status__in=[Order.Status.PENDING, Order.Status.CONFIRMED, Order.Status.PAID]).exists():
        return False
    open_items = OutboxItem.objects.filter(state__in=OutboxItem.OPEN)
    return not open_items.filter(Q(task_name__in=ORDER_STEPS) | Q(task_name__startswith="notifications.")).exists()


def unsettled(stack: dict) -> str:
    """What keeps the run from settling, for the failure message: orders waiting, open items, and where their
    messages are (each Redis key that holds one, and every log line that names it)."""
    waiting = Order.objects.filter(status__in=[Order.Status.PENDING, Order.Status.CONFIRMED, Order.Status.PAID])
    items = list(OutboxItem.objects.filter(state__in=OutboxItem.OPEN).order_by("id")[:20])
    lines = [
        f"orders waiting: {list(waiting.values_list('id', 'status')[:20])}",
        f"notifications: {dict(Counter(Notification.objects.values_list('status', flat=True)))}",
    ]
    broker = stack["broker"]
    client = broker.client if broker.kind == "redis" else None
    keys = {key.decode(errors="replace"): client.type(key).decode() for key in client.keys("*")} if client else {}
    lines.append(f"redis keys: {keys}" if client else f"queues: { {q: broker.depth(q) for q in QUEUES} }")
    logs = {path.name: path.read_text(errors="replace") for path in stack["tmp"].glob("*.log")}
    for item in items:
        task_id = str(item.task_id)
        lines.append(f"open: {item} attempts={item.attempts} published_at={item.published_at} task_id={task_id}")
        for key, kind in keys.items():
            values = {"list": lambda k: client.lrange(k, 0, -1), "hash": lambda k: client.hvals(k)}.get(kind)
            if values and any(task_id.encode() in raw for raw in values(key)):
                lines.append(f"  message in redis {key!r} ({kind})")
        for name, text in logs.items():
            lines += [f"  {name}: {line[:300]}" for line in text.splitlines() if task_id in line]
    return "\n".join(lines)


def test_500_orders_under_chaos_end_settled_charged_and_shipped_once_with_bounded_queues_and_dead_letters(
    stack, start_worker
):
    sampler = QueueSampler(stack["broker"])
    sampler.start()
    try:
        run_chaos(stack, start_worker, sampler)
    except BaseException:
        print(stack["processes"].logs())
        raise
    finally:
        sampler.stop()


def run_chaos(stack, start_worker, sampler: QueueSampler):
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
        # Rounds of completed failures: a step that did not complete under load is tried again, not counted.
        wait_for(
            lambda: sum("did not complete" not in entry for entry in chaos_log) >= 2 * len(ACTIONS),
            300,
            "two rounds of failures",
            interval=1,
        )
    finally:
        stop.set()
        chaos_thread.join(120)
    heal(stack, start_worker)
    healed = time.monotonic()
    print("chaos:", chaos_log, "answers:", dict(statuses))
    assert not chaos_thread.is_alive()
    assert sum("did not complete" not in entry for entry in chaos_log) >= 2 * len(ACTIONS), chaos_log
    assert len(set(ids)) == ORDERS == Order.objects.count()  # retried requests made no duplicates

    # Safety first, whether or not everything has finished; then liveness: everything finished.
    not_settled = ""
    try:
        wait_for(
            lambda: supervise(stack, start_worker) or settled(),
            SETTLED_WITHIN_SECONDS,
            "every order and email to settle",
            interval=2,
        )
        print(f"settled {time.monotonic() - healed:.0f} s after the failures stopped")
    except pytest.fail.Exception:
        not_settled = unsettled(stack)
        print("not settled:", not_settled)
    finally:
        sampler.stop()
    by_status = Counter(Order.objects.values_list("status", flat=True))
    print("final:", dict(by_status))
    held_from = dict(
        OrderEvent.objects.filter(order__status=Order.Status.ON_HOLD, to_status=Order.Status.ON_HOLD)
        .order_by("created_at", "id")
        .values_list("order_id", "from_status")
    )  # the last hold of each order on hold wins

    # Nothing charged twice, and every charge belongs to its order's payment
    summary = requests.get(f"{stack['sandbox'].url}/v1/ledger/summary", timeout=10).json()
    assert summary["charges"]["references_charged_more_than_once"] == []
    by_reference = summary["charges"]["by_reference"]
    keys = dict(Payment.objects.filter(order__isnull=False).values_list("order_id", "idempotency_key"))
    assert set(by_reference) <= set(keys.values()), set(by_reference) - set(keys.values())
    for order_id, status in Order.objects.values_list("id", "status"):
        charged = by_reference.get(keys.get(order_id, ""), {"succeeded": 0, "declined": 0})
        if status in ("paid", "fulfilled") or held_from.get(order_id) == "paid":
            assert charged["succeeded"] == 1, (order_id, status, charged)
        elif status == "payment_failed":
            assert (charged["succeeded"], charged["declined"]) == (0, 1), (order_id, charged)
        elif status in ("confirmed", "on_hold"):  # on its way to payment, or held there: never charged twice
            assert charged["succeeded"] <= 1, (order_id, status, charged)
        else:  # pending, rejected or cancelled: never charged
            assert charged["succeeded"] == 0, (order_id, status, charged)

    # Nothing shipped twice, and only fulfilled orders shipped
    shipments = stack["warehouse"].summary()["shipments"]
    fulfilled = set(Order.objects.filter(status=Order.Status.FULFILLED).values_list("id", flat=True))
    assert shipments["orders_shipped_more_than_once"] == []
    assert {int(order_id) for order_id in shipments["by_order_id"]} == fulfilled

    # The stock adds up: each product's stock is its start plus its movements, and each order holds
    # what its status says (from confirmed on, and on hold after that, its items; otherwise nothing)
    net = dict(
        StockMovement.objects.filter(order__isnull=False)
        .values("order_id")
        .annotate(net=Sum("delta"))
        .values_list("order_id", "net")
    )
    holding = set()
    for order_id, status in Order.objects.values_list("id", "status"):
        wanted = OrderItem.objects.filter(order_id=order_id).aggregate(total=Sum("quantity"))["total"]
        if status in ("confirmed", "paid", "fulfilled") or held_from.get(order_id) in ("confirmed", "paid"):
            holding.add(order_id)
        assert net.get(order_id, 0) == (-wanted if order_id in holding else 0), (order_id, status, net.get(order_id))
    for sku, product in products.items():
        left = Product.objects.get(pk=product.pk).stock
        moved = StockMovement.objects.filter(product=product).aggregate(total=Sum("delta"))["total"] or 0
        assert left == STOCK_EACH + moved, (sku, left, moved)
        taken = OrderItem.objects.filter(sku=sku, order_id__in=holding).aggregate(total=Sum("quantity"))["total"]
        assert left + (taken or 0) == STOCK_EACH, (sku, left, taken)

    # No email went out twice, and every one the shop counts as sent reached the mail server
    notifications = Notification.objects.all()
    sent_subjects = Counter(stack["mail"].subjects)
    assert [subject for subject, n in sent_subjects.items() if n > 1] == []
    assert set(sent_subjects) == set(
        notifications.filter(status=Notification.Status.SENT).values_list("subject", flat=True)
    )

    # No more dead letters than pieces of work that really failed: items that ended failed, parked
    # items that had failed (the warehouse or the mail server away), and payments needing attention
    failed_items = OutboxItem.objects.filter(state=OutboxItem.State.FAILED)
    parked = OutboxItem.objects.filter(task_name__in=RESUMABLE).exclude(last_error="")
    held_on_the_way_out = set(
        OrderEvent.objects.filter(from_status="paid", to_status="on_hold").values_list("order_id", flat=True)
    )
    held_shipments = [
        item
        for item in OutboxItem.objects.filter(task_name="orders.tasks.sync_to_fulfillment")
        if item.args[0] in held_on_the_way_out
    ]
    really_failed = {str(item.task_id) for item in (*failed_items, *parked, *held_shipments)}
    really_failed |= {
        f"payment-{pk}-needs-attention"
        for pk in Payment.objects.filter(status=Payment.Status.NEEDS_ATTENTION).values_list("pk", flat=True)
    }
    dead_letters = dict(FailedTask.objects.values_list("task_id", "task_name"))
    print(
        f"dead letters: {len(dead_letters)} ({dict(Counter(dead_letters.values()))}); work that really failed: "
        f"{len(really_failed)} ({failed_items.count()} items failed, {parked.count()} parked)"
    )
    assert len(dead_letters) <= len(really_failed)
    assert {task_id: name for task_id, name in dead_letters.items() if task_id not in really_failed} == {}

    # No queue ever held more than twice its open work (beat's relay messages counted out). Slack: one
    # message per pool process whose task finished while Redis was away, so that its ack was skipped and
    # the message comes back after the visibility timeout with its item done; on critical, one
    # bill-due-subscriptions message from beat, which is no outbox item.
    peaks = sampler.peaks()
    print(f"peak queue lengths: {peaks} ({len(sampler.samples)} samples)")
    assert not sampler.errors, sampler.errors[:5]
    assert len(sampler.samples) > 100
    slack = {"critical": CRITICAL_CONCURRENCY + 1, "default": DEFAULT_CONCURRENCY, "bulk": 0}
    assert sampler.over_bound(slack) == []

    # Everything finished within the bound: every order is final, or on hold with a message for the
    # shopper, and every email went out, the ones that failed while the mail server was away included
    assert not not_settled, not_settled
    assert set(by_status) <= {*Order.TERMINAL, Order.Status.ON_HOLD}, by_status
    assert by_status["fulfilled"] > 0 and by_status["rejected"] > 0
    assert not Order.objects.filter(status=Order.Status.ON_HOLD, hold_reason="").exists()
    assert not notifications.exclude(status=Notification.Status.SENT).exists()

    # Every request was answered; a refusal under load is a 503 with Retry-After, never another 5xx
    assert not any(isinstance(code, int) and code >= 500 and code != 503 for code in statuses), statuses
