"""Regression tests for the findings of issue 11, with real worker, beat, web, Redis and sandbox processes.

Each test names the finding it guards. The outside world fails through stand-ins the test
controls: a `Gate` in front of the sandbox (the provider or the warehouse answering 422), a
private redis-server that is stopped and started, a mail server that is not listening and then
is (`MailServer`), and the sandbox's own latency fault. Finding 4 (a Redis blip) and the
three-minute warehouse outage have files of their own (test_redis_blip.py, test_warehouse_outage.py).
"""

import json
import re
import socket
import socketserver
import threading
import time
from collections import Counter
from decimal import Decimal
from urllib.parse import urlsplit

import pytest
import requests
from django.db import transaction

from accounts.services import issue_api_token
from config.celery import app
from core.models import OutboxItem
from notifications.models import Notification
from notifications.services import notify
from ops.deadletters import PAYMENT_NEEDS_ATTENTION
from ops.models import FailedTask
from orders.models import Order, Product
from orders.services import HOLD_MESSAGES, place_order
from payments.models import Payment, WebhookEvent
from reports.models import Report
from tests.factories import OrderFactory, PaymentFactory, ProductFactory, UserFactory
from tests.stack import MailServer, RedisServer, task_lines, wait_for

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

SYNC_TO_FULFILLMENT = "orders.tasks.sync_to_fulfillment"
CHARGE_ORDER = "orders.tasks.charge_order"
# The relay every second, and a new item left to the fast path for two seconds first.
FAST_RELAY = {"OUTBOX_RELAY_SECONDS": "1", "OUTBOX_FAST_PATH_GRACE_SECONDS": "2"}


# --- Stand-ins for the outside world ----------------------------------------------------


class Gate:
    """A switch in front of the sandbox on a port of its own, for one service (the provider or the warehouse).

    "up" passes each request through; "reject" answers 422 `idempotency_key_reused`, as the
    sandbox does, without asking it (a permanent refusal). Each request is noted with the mode it
    met, and each gets a connection of its own (`Connection: close`), so a switch applies from the
    next request on.
    """

    UP, REJECT = "up", "reject"

    def __init__(self, upstream_url: str, mode: str = UP):
        target = urlsplit(upstream_url)
        self.upstream = (target.hostname, target.port)
        self.mode = mode
        self.seen: list[tuple[str, str, bytes]] = []  # (mode, "POST /v1/shipments", body)
        self.lock = threading.Lock()
        gate = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                gate._handle(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def bodies(self, request_line: str, mode: str) -> list[dict]:
        with self.lock:
            return [
                json.loads(body) for seen_mode, line, body in self.seen if line == request_line and seen_mode == mode
            ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handle(self, client: socket.socket) -> None:
        request = _read_http_request(client)
        if request is None:
            return
        head, body = request
        mode = self.mode
        method, path = head.split(b" ", 2)[:2]
        with self.lock:
            self.seen.append((mode, f"{method.decode()} {urlsplit(path.decode()).path}", body))
        if mode == self.REJECT:
            error = {
                "type": "idempotency_error",
                "code": "idempotency_key_reused",
                "message": "This Idempotency-Key was already used with different parameters.",
                "field": "Idempotency-Key",
            }
            payload = json.dumps({"error": error}).encode()
            client.sendall(
                b"HTTP/1.1 422 Unprocessable Entity\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
        else:
            self._forward(head, body, client)

    def _forward(self, head: bytes, body: bytes, client: socket.socket) -> None:
        lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
        with socket.create_connection(self.upstream, timeout=60) as upstream:
            upstream.sendall(b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body)
            try:
                while chunk := upstream.recv(65536):
                    client.sendall(chunk)
            except OSError:
                pass  # the caller gave up (its deadline): nothing more to pass on


def _read_http_request(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """The head and body of one HTTP request (Content-Length framing), or None when the peer closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length and len(body) < int(length.group(1)):
        chunk = sock.recv(65536)
        if not chunk:
            return None
        body += chunk
    return head, body


@pytest.fixture
def gate(sandbox):
    """Factory: a Gate in front of the session's sandbox, closed at teardown."""
    gates: list[Gate] = []

    def make(mode: str = Gate.UP) -> Gate:
        gates.append(Gate(sandbox.url, mode))
        return gates[-1]

    yield make
    for each in gates:
        each.close()


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of the test's own, stopped at teardown."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    yield server
    server.kill()


# --- Helpers ------------------------------------------------------------------------------


def sync_dead_letters(order_ids) -> Counter:
    """How many dead letters of sync_to_fulfillment each order has."""
    rows = FailedTask.objects.filter(task_name=SYNC_TO_FULFILLMENT).values_list("args", flat=True)
    return Counter(args[0] for args in rows if args and args[0] in order_ids)


def items_of(task_name: str, order_id: int) -> list[OutboxItem]:
    return list(OutboxItem.objects.filter(task_name=task_name, args=[order_id]).order_by("id"))


def statuses(order_ids) -> dict[int, str]:
    return dict(Order.objects.filter(pk__in=order_ids).values_list("pk", "status"))


# --- Finding 1: the re-dispatch storm -----------------------------------------------------


def test_a_warehouse_refusing_hand_overs_makes_one_dead_letter_per_order_and_a_visible_hold_that_resumes(
    start_worker, processes, worker_env, sandbox, gate, broker
):
    """Issue 11, finding 1: a 422 from the warehouse gave a new dead letter every sweep, for as long as it lasted."""
    # Given a warehouse that refuses every hand-over, and resumes every 5 s with the relay every second
    warehouse = gate(Gate.REJECT)
    env = {
        **worker_env,
        **FAST_RELAY,
        "FULFILLMENT_API_URL": warehouse.url,
        "FULFILLMENT_RESUME_SECONDS": "5",
        # Enough rounds for the watch below; the default (10) would end the items failed within it.
        "OUTBOX_MAX_ATTEMPTS": "30",
    }
    start_worker("critical", concurrency=2, env=env)
    start_worker("default", env=env)  # the relay, and emails to the console
    processes.beat(env)
    ProductFactory(sku="STORM", stock=10)
    orders = [place_order(owner=UserFactory(), items=[("STORM", 1)]) for _ in range(3)]
    ids = {order.pk for order in orders}

    # When the orders are paid and their hand-over keeps being refused for 40 s
    wait_for(lambda: set(statuses(ids).values()) == {"on_hold"}, 30, "the orders to be held")
    held_at = time.monotonic()
    peak_queue = 0
    while time.monotonic() - held_at < 40:
        peak_queue = max(peak_queue, broker.llen("critical"))
        assert max(sync_dead_letters(ids).values(), default=0) <= 1
        time.sleep(0.5)

    # Then each order has one dead letter, however often it was tried, and stays visibly on hold
    assert sync_dead_letters(ids) == Counter(dict.fromkeys(ids, 1))
    refused = Counter(body["order_id"] for body in warehouse.bodies("POST /v1/shipments", Gate.REJECT))
    assert set(refused) == ids and min(refused.values()) >= 4, refused  # tried again and again, by itself
    for order in Order.objects.filter(pk__in=ids):
        assert (order.status, order.hold_reason) == ("on_hold", HOLD_MESSAGES[Order.Status.PAID])
        [item] = items_of(SYNC_TO_FULFILLMENT, order.pk)  # one item per order, published once per round
        assert item.attempts >= 4
    dead = FailedTask.objects.filter(task_name=SYNC_TO_FULFILLMENT)
    assert all("ProviderRejected" in row.exception and "422" in row.exception for row in dead)
    assert not dead.filter(resolved=True).exists()
    assert peak_queue <= len(ids), peak_queue  # nothing piles up behind the failing work

    # When the warehouse takes hand-overs again
    warehouse.mode = Gate.UP
    wait_for(lambda: set(statuses(ids).values()) == {"fulfilled"}, 30, "the held orders to be fulfilled")

    # Then each order is shipped once, and its dead letter is resolved (the work recovered by itself)
    assert sandbox.summary()["shipments"]["by_order_id"] == {str(pk): 1 for pk in ids}
    wait_for(lambda: dead.filter(resolved=True).count() == len(ids), 10, "the dead letters to be resolved")
    assert dead.count() == len(ids)
    assert {item.state for pk in ids for item in items_of(SYNC_TO_FULFILLMENT, pk)} == {OutboxItem.State.DONE}


# --- Finding 2: work lost while the broker is down --------------------------------------


def test_a_webhook_and_a_report_accepted_while_redis_is_down_are_processed_when_it_returns(
    private_redis, processes, start_worker, worker_env, sandbox, webhook_receiver, tmp_path
):
    """Issue 11, finding 2: such a webhook stayed `received` and such a report `pending`, for good."""
    # Given the whole stack on a Redis of its own, and a charge the provider made whose outcome we never recorded
    env = {**worker_env, **FAST_RELAY, "REDIS_URL": private_redis.url, "MEDIA_ROOT": str(tmp_path / "media")}
    base = processes.web(env)
    processes.beat(env)
    start_worker("critical", env=env)
    start_worker("default", "bulk", concurrency=2, env=env)  # the relay, emails and reports
    shopper = UserFactory()
    token = issue_api_token(user=shopper)
    order = OrderFactory(owner=shopper)  # confirmed, its charge in flight when our task died
    payment = PaymentFactory(order=order, status=Payment.Status.PROCESSING)
    charge = sandbox.charge(key=payment.idempotency_key, reference=payment.idempotency_key, amount=str(order.total))
    assert charge.status_code == 201, charge.text
    [delivery] = webhook_receiver.wait_for(lambda event: event["data"]["charge"]["id"] == charge.json()["id"])
    signature = {name: value for name, value in delivery.headers.items() if name.lower() == "sandbox-signature"}

    # When the provider's webhook and a report request arrive while Redis is down
    private_redis.kill()
    started = time.monotonic()
    answer = requests.post(
        f"{base}/payments/webhooks/provider/",
        data=delivery.body,
        headers={"Content-Type": "application/json", **signature},
        timeout=30,
    )
    assert (answer.status_code, answer.json()["duplicate"]) == (200, False)
    requested = requests.post(
        f"{base}/api/reports/",
        json={"kind": "sales", "format": "csv"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert requested.status_code == 201, requested.text
    assert time.monotonic() - started < 10  # both answered, quickly, with nothing published
    event = WebhookEvent.objects.get(provider_event_id=delivery.event["id"])
    report = Report.objects.get(pk=requested.json()["id"])
    assert (event.status, report.status) == ("received", "pending")

    # Then once Redis is back (empty: the publishes that failed left nothing there), both are done
    private_redis.start()
    wait_for(
        lambda: WebhookEvent.objects.get(pk=event.pk).status == WebhookEvent.Status.PROCESSED,
        60,
        "the webhook to be processed",
    )
    wait_for(lambda: Report.objects.get(pk=report.pk).status == Report.Status.DONE, 60, "the report to be done")
    payment.refresh_from_db()
    assert (payment.status, payment.provider_charge_id) == ("succeeded", charge.json()["id"])
    # The order follows its payment: paid, then handed to the warehouse.
    wait_for(lambda: Order.objects.get(pk=order.pk).status == "fulfilled", 30, "the order to be fulfilled")
    assert len(sandbox.charges(reference=payment.idempotency_key)) == 1
    # The provider's own redelivery is a no-op.
    again = requests.post(
        f"{base}/payments/webhooks/provider/",
        data=delivery.body,
        headers={"Content-Type": "application/json", **signature},
        timeout=30,
    )
    assert (again.status_code, again.json()["duplicate"]) == (200, True)


# --- Finding 3: a permanent provider answer is final --------------------------------------


def test_a_permanent_provider_refusal_holds_the_order_and_flags_the_payment_within_seconds(
    start_worker, worker_env, sandbox, gate, client
):
    """Issue 11, finding 3: a 422 left the payment `processing` and the order `confirmed`, for good."""
    # Given a provider that answers 422 to every charge
    provider = gate(Gate.REJECT)
    worker = start_worker("critical", env={"PAYMENT_PROVIDER_URL": provider.url})
    product = ProductFactory(sku="REFUSED", stock=5)
    shopper = UserFactory()

    # When an order is placed
    started = time.monotonic()
    order = place_order(owner=shopper, items=[("REFUSED", 2)])

    # Then within seconds the order is on hold with a plain message, and the payment needs attention
    wait_for(lambda: Order.objects.get(pk=order.pk).status == "on_hold", 15, "the order to be held")
    print(f"held {time.monotonic() - started:.1f} s after it was placed")
    order.refresh_from_db()
    assert order.hold_reason == HOLD_MESSAGES[Order.Status.CONFIRMED]
    payment = Payment.objects.get(order=order)
    assert payment.status == Payment.Status.NEEDS_ATTENTION
    assert payment.failure_reason.startswith("rejected:") and "idempotency_key_reused" in payment.failure_reason
    assert payment.attempts == 1
    # Asked once, not retried: a refusal is an outcome, and the charge step ended normally.
    assert len(provider.bodies("POST /v1/charges", Gate.REJECT)) == 1

    # The order is held inside the step's transaction; the step's end is logged after its commit, so wait for it.
    log = worker.wait_for_task_line(CHARGE_ORDER, "succeeded in", timeout=10)
    assert task_lines(log, CHARGE_ORDER, "retry: ") == [], log
    assert len(task_lines(log, CHARGE_ORDER, "succeeded in")) == 1, log
    # Staff see it among the dead letters; the shopper sees the hold, not a spinner.
    flagged = wait_for(
        lambda: FailedTask.objects.filter(task_name=PAYMENT_NEEDS_ATTENTION, args=[payment.pk]).first(),
        10,
        "the payment's dead letter",
    )
    assert "idempotency_key_reused" in flagged.exception
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {issue_api_token(user=shopper)}"
    shown = client.get(f"/api/orders/{order.pk}/").json()
    assert (shown["status"], shown["hold_reason"]) == ("on_hold", HOLD_MESSAGES[Order.Status.CONFIRMED])
    # The stock stays reserved for the staff's decision (retry, or fail and release).
    assert Product.objects.get(pk=product.pk).stock == 3
    assert sandbox.summary()["charges"]["total"] == 0


# --- Finding 5: retry budgets that are true ----------------------------------------------


@pytest.mark.timeout(420)
def test_a_notification_that_failed_during_a_mail_outage_is_sent_once_when_the_mail_server_returns(
    start_worker, processes, worker_env, broker
):
    """Issue 11, finding 5: five retries spent within about 31 s, then nothing resent it.

    The mail server is a small SMTP server in this process (MailServer): first nothing listens on
    its port (every send is refused), then it starts there and keeps what it is sent.
    """
    # Given a mail server that is down
    mail = MailServer()
    env = {**worker_env, **FAST_RELAY, "EMAIL_URL": mail.url, "NOTIFICATION_RESUME_SECONDS": "5"}
    worker = start_worker("default", concurrency=2, env=env)
    processes.beat(env)
    order = OrderFactory()

    # When a notification is due, and the mail server stays down for 40 s (longer than the old retry budget)
    with transaction.atomic():
        notification = notify(
            kind="order_confirmed", object_type="order", object_id=order.pk, recipient_id=order.owner_id
        )
    down_since = time.monotonic()
    wait_for(
        lambda: "ConnectionRefusedError" in Notification.objects.get(pk=notification.pk).error,
        20,
        "the first send to be refused",
    )
    time.sleep(max(0.0, 40 - (time.monotonic() - down_since)))
    refusals = len(task_lines(worker.log(), "notifications.tasks.send_notification", "retry: "))
    assert refusals >= 3, worker.log()[-3000:]
    assert mail.messages == []
    mail.start()
    try:
        # Then it is sent once the mail server is back: exactly one email
        wait_for(
            lambda: Notification.objects.get(pk=notification.pk).status == Notification.Status.SENT,
            150,
            "the notification to be sent",
            interval=1,
        )
        time.sleep(3)
        assert len(mail.messages) == 1
        assert order.owner.email.encode() in mail.messages[0]
        notification.refresh_from_db()
        assert (notification.error, notification.sent_at is not None) == ("", True)
        [item] = OutboxItem.objects.filter(task_name="notifications.tasks.send_notification", args=[notification.pk])
        assert item.state == OutboxItem.State.DONE
        assert not FailedTask.objects.filter(task_name="notifications.tasks.send_notification", resolved=False).exists()
    finally:
        mail.stop()


# --- Finding 6: time limits and the provider call's deadline ------------------------------

DEADLINE = 2
PROJECT_APPS = ("core", "orders", "payments", "notifications", "reports")
# The soft limit well above the deadline, so a starved machine's slower attempt never reaches it first.
LIMITS = {"CRITICAL_SOFT_TIME_LIMIT": "6", "CRITICAL_TIME_LIMIT": "8", "PROVIDER_CALL_DEADLINE": str(DEADLINE)}


def test_a_provider_slower_than_the_soft_limit_costs_a_retry_not_the_pool_process(start_worker, sandbox):
    """Issue 11, finding 6: no time limit on charge_order, and a per-read timeout that never bounded the call."""
    # Given a worker whose critical tasks have a 6 s soft and 8 s hard limit, and a 2 s deadline on provider calls
    worker = start_worker("critical", env=LIMITS, name="limits")
    registered = app.control.inspect([worker.nodename], timeout=15).registered("soft_time_limit", "time_limit")
    assert f"{CHARGE_ORDER} [soft_time_limit=6 time_limit=8]" in registered[worker.nodename], registered
    # Every task of the project has limits (its queue's, unless it sets its own), not only reports.
    ours = [line for line in registered[worker.nodename] if line.split(".")[0] in PROJECT_APPS]
    assert len(ours) >= 8 and all("[soft_time_limit=" in line and " time_limit=" in line for line in ours), ours
    ProductFactory(sku="SLOW", stock=5)
    sandbox.set_faults(latency_ms=10_000)  # the provider answers after 10 s

    # When an order's charge meets it
    order = place_order(owner=UserFactory(), items=[("SLOW", 1)])
    wait_for(
        lambda: len(task_lines(worker.log(), CHARGE_ORDER, "retry: ")) >= 2,
        30,
        "the charge to be retried twice",
    )
    sandbox.set_faults(latency_ms=0)
    wait_for(lambda: Order.objects.get(pk=order.pk).status == "fulfilled", 120, "the order to be fulfilled")

    # Then each attempt gave up at the deadline, before the soft limit, and was retried as ProviderUnavailable
    log = worker.log()
    received = task_lines(log, CHARGE_ORDER, "received")
    retries = task_lines(log, CHARGE_ORDER, "retry: ")
    assert all("ProviderUnavailable" in line.text for line in retries), log
    assert f"no reply within the {float(DEADLINE)}s deadline" in retries[0].text, retries[0].text
    # Attempt n+1 ends X_n (its countdown) plus its own run time after attempt n ended.
    ends = [line.at.timestamp() for line in retries]
    countdowns = [int(re.search(r"Retry in (\d+)s", line.text).group(1)) for line in retries]
    durations = [ends[0] - received[0].at.timestamp()]
    durations += [b - a - x for a, b, x in zip(ends, ends[1:], countdowns, strict=False)]
    print(f"charge attempts took {[round(d, 2) for d in durations]} s; countdowns {countdowns}")
    assert max(durations) <= DEADLINE + 3, durations  # and below the soft limit (6 s)
    assert "Soft time limit" not in log and "Hard time limit" not in log, log
    assert not FailedTask.objects.filter(exception__contains="TimeLimitExceeded").exists()
    assert not FailedTask.objects.exists()
    # The slow first request charged; the retries with its key got that charge back.
    payment = Payment.objects.get(order=order)
    assert payment.status == Payment.Status.SUCCEEDED
    assert len(sandbox.charges(reference=payment.idempotency_key)) == 1
    assert Decimal(sandbox.charges(reference=payment.idempotency_key)[0]["amount"]) == payment.amount
