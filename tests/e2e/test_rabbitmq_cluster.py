"""A RabbitMQ node lost mid-run: a three-node cluster of the test's own, the leader of `critical` killed.

The shop runs on RabbitMQ (CELERY_BROKER_URL: the three nodes' URLs joined by ";", kombu's failover) with
its quorum queues replicated on every node. Orders are placed while the node leading the `critical` queue is
killed (SIGKILL: a crash, not a shutdown); the workers, beat and this process lose their connections (they
all connect to the first URL, and by default a quorum queue's leader is placed on the node its declaring
client is connected to) and fail over to another node while the two survivors elect a new leader. Every
order must end fulfilled, charged and shipped once (the sandbox's ledger is the referee), every email sent
once, with no dead letter of the work and no outbox item left open; then the node is started again and
rejoins: three running nodes, and `critical` with a member online on each. The timings are printed (-s).

Real processes: three RabbitMQ nodes (tests/rabbitmq.py), a critical and a default worker and beat (the
Procfile's commands, production settings), the sandbox. The outbox relay runs every second (beat sends it to
the default queue): it publishes whatever a publish during the election could not.
"""

import re
import threading
import time
from collections import Counter
from datetime import datetime

import pytest
from django.conf import settings
from django.db import connection
from django.test import override_settings

from core.models import OutboxItem
from notifications.models import Notification
from ops.models import FailedTask
from orders.models import Order
from orders.services import place_order
from payments.models import Payment
from tests.brokers import celery_broker
from tests.factories import ProductFactory, UserFactory
from tests.rabbitmq import RabbitCluster
from tests.stack import wait_for, worker_command

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.worker,
    pytest.mark.django_db(transaction=True),
    # About a minute on two cores (pytest's own start included): the cluster ~10 s, the workers ~10 s, the run and
    # the recovery ~25 s, the restart ~6 s. The bound leaves room for a busy machine (2.5 minutes at a load of 19).
    pytest.mark.timeout(240),
]

VHOST = "shop"
ORDERS = 60
SPACING_SECONDS = 0.1  # the run lasts about ORDERS x SPACING_SECONDS plus the time to place each
KILL_AFTER = ORDERS // 3
# Work committed while a publish could not be confirmed is published by the relay this soon.
RELAY_ENV = {"OUTBOX_RELAY_SECONDS": "1", "OUTBOX_FAST_PATH_GRACE_SECONDS": "2"}
# The order's deadline (PAYMENT_EXPIRY_SECONDS, 30 minutes) is an outbox item that stays pending: not work to wait for.
DEADLINE_TASK = "orders.tasks.expire_order"


@pytest.fixture
def cluster(tmp_path, request):
    """Three nodes of the test's own; every node and its epmd stopped at teardown, whatever happened.

    On a failure their logs are printed first (the folder goes with them)."""
    nodes = RabbitCluster(tmp_path / "rabbitmq", nodes=3)
    nodes.start()  # prints its timings
    failed_before = request.session.testsfailed
    try:
        nodes.add_vhost(VHOST)
        yield nodes
    finally:
        if request.session.testsfailed > failed_before:
            print(nodes.logs())
        nodes.destroy()


def place_run(owner, errors: list, placed: list) -> None:
    """ORDERS orders, one every SPACING_SECONDS, each committed then published (the fast path after commit)."""
    try:
        for n in range(ORDERS):
            try:
                placed.append((place_order(owner=owner, items=[("RMQ", 1)]).pk, time.monotonic()))
            except Exception as exc:  # noqa: BLE001 (the run goes on; the test reports each error)
                errors.append((n, repr(exc)))
            time.sleep(SPACING_SECONDS)
    finally:
        connection.close()


def log_lines(text: str, pattern: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(pattern, line)]


def logged_at(line: str) -> datetime:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


def stalls(log: str) -> list[float]:
    """Seconds from each lost connection to the first task the worker received after it.

    Celery's own delayed-delivery step set itself up on every URL of the list, the dead node's too (three tries
    each, 1 + 3 + 5 s), before the worker consumed again: 18 s each time. ops.rabbitmq.DelayedDeliveryOnThisNode
    sets it up on the node the worker reconnected to.
    """
    lines = log.splitlines()
    gaps = []
    for n, line in enumerate(lines):
        if "Connection to broker lost" in line:
            after = next((later for later in lines[n + 1 :] if re.search(r"Task \S+ received", later)), None)
            if after is not None:
                gaps.append((logged_at(after) - logged_at(line)).total_seconds())
    return gaps


def test_losing_the_leader_node_of_critical_mid_run_loses_nothing_and_does_nothing_twice(
    cluster, start_worker, processes, worker_env, sandbox, request
):
    test_started = time.monotonic()
    url = cluster.failover_url(VHOST)
    env = {**worker_env, **RELAY_ENV, "CELERY_BROKER_URL": url}
    ProductFactory(sku="RMQ", stock=ORDERS + 10)
    owner = UserFactory()

    # Work whose publish failed is the relay's after this long (as in the workers: RELAY_ENV).
    grace = float(RELAY_ENV["OUTBOX_FAST_PATH_GRACE_SECONDS"])
    with celery_broker(url), override_settings(OUTBOX_FAST_PATH_GRACE_SECONDS=grace):
        # Each worker declares the quorum queues and the dead-letter queue as it connects.
        # Both start at once (two cores: each takes seconds to import Django); `default` runs the emails and the
        # relay beat sends every second, and is stopped with `processes` at teardown.
        default = processes.spawn_worker(
            "worker-default", worker_command("default", name="default-test"), env, node="default-test"
        )
        critical = start_worker("critical", concurrency=2, env=env)
        failed_before = request.session.testsfailed

        def show_default_log_on_failure():  # start_worker's workers have theirs in the report already
            if request.session.testsfailed > failed_before:
                print(f"--- default worker log\n{default.log()[-6000:]}")

        request.addfinalizer(show_default_log_on_failure)
        default.wait_ready(30)
        processes.beat(env)
        leader = cluster.quorum_leader("critical", VHOST)
        assert cluster.quorum_members_online("critical", VHOST) == sorted(cluster.names)
        workers_ready = time.monotonic()

        errors: list = []
        placed: list = []
        placing = threading.Thread(target=place_run, args=(owner, errors, placed), daemon=True)
        run_started = time.monotonic()
        placing.start()
        wait_for(lambda: len(placed) + len(errors) >= KILL_AFTER, 30, f"{KILL_AFTER} orders to be placed")
        cluster.sample_memory()
        cluster.stop_node(leader, kill=True)
        killed_at = time.monotonic()
        placing.join(60)
        assert not placing.is_alive(), "placing the orders got stuck"
        run_ended = time.monotonic()
        placed_after_kill = sum(1 for _, at in placed if at > killed_at)
        # Mid-election the queue has no leader yet (""): wait for one of the nodes.
        new_leader = cluster.names.index(
            wait_for(
                lambda: (
                    (found := cluster.list_queues(VHOST, "leader")["critical"]["leader"]) in cluster.names and found
                ),
                30,
                "a new leader of critical",
            )
        )

        orders = Order.objects.filter(owner=owner)
        try:
            wait_for(lambda: orders.filter(status=Order.Status.FULFILLED).count() == ORDERS, 75, "the orders")
        except pytest.fail.Exception:
            pytest.fail(f"not all {ORDERS} orders fulfilled: {Counter(orders.values_list('status', flat=True))}")
        fulfilled_at = time.monotonic()
        # Nothing left open: every step and every email finished (the 30-minute deadlines aside).
        open_work = OutboxItem.objects.exclude(task_name=DEADLINE_TASK).exclude(state=OutboxItem.State.DONE)
        wait_for(lambda: not open_work.exists(), 30, "every outbox item but the deadlines to be done")
        settled_at = time.monotonic()
        cluster.sample_memory()

        # Placing never failed: a publish the election refused left the order to the relay.
        assert errors == []
        assert orders.count() == ORDERS
        # Charged once and shipped once each: the provider's and the warehouse's ledgers.
        summary = sandbox.summary()
        keys = list(Payment.objects.filter(order__owner=owner).values_list("idempotency_key", flat=True))
        assert len(keys) == ORDERS
        by_reference = summary["charges"]["by_reference"]
        assert {key: by_reference.get(key, {}).get("total") for key in keys} == {key: 1 for key in keys}
        assert summary["charges"]["total"] == ORDERS
        assert summary["shipments"]["by_order_id"] == {str(pk): 1 for pk in orders.values_list("pk", flat=True)}
        assert summary["shipments"]["orders_shipped_more_than_once"] == []
        # Each email once: three per order (confirmed, paid, fulfilled), each sent.
        notifications = Notification.objects.filter(recipient=owner)
        assert notifications.count() == 3 * ORDERS
        assert set(notifications.values_list("status", flat=True)) == {Notification.Status.SENT}
        # No dead letters: none recorded, none waiting in the broker. (Beat's relay messages that expired unrun while
        # the workers consumed nothing are dead-lettered by RabbitMQ, reason `expired`: no failure, ops/deadletters.py.)
        assert list(FailedTask.objects.values_list("task_name", "exception")) == []
        # A relay message that expires just now passes through the dead-letter queue: wait for it to drain.
        wait_for(lambda: cluster.depth(settings.DEAD_LETTER_QUEUE, VHOST) == 0, 15, "the dead-letter queue to drain")

    # The node comes back and rejoins: three running nodes, and `critical` has its three members online.
    restarted = cluster.start_node(leader)
    assert cluster.running_nodes(0) == sorted(cluster.names)
    wait_for(
        lambda: cluster.quorum_members_online("critical", VHOST) == sorted(cluster.names),
        30,
        "the restarted node's member of critical to be online",
    )
    cluster.sample_memory()
    print(cluster.queues(0, "quorum_status", "critical", "-p", VHOST))

    # What the run looked like, for the README.
    logs = critical.log() + default.log()
    stalled = [round(seconds, 1) for worker in (critical, default) for seconds in stalls(worker.log())]
    received = Counter(re.findall(r"Task (\S+\[[0-9a-f-]+\]) received", logs))
    again = {task: count for task, count in received.items() if count > 1}
    # A publish the broker could not confirm (nacked during the election, or its node gone) leaves its reason on the
    # item, which the relay publishes; the fast path's publish is the item's only one otherwise.
    relayed = OutboxItem.objects.exclude(last_error="").count()
    delayed_failures = log_lines(logs, r"Failed to setup delayed delivery|Retrying delayed delivery setup")
    lost = log_lines(logs, r"[Cc]onnection to broker lost|Connected to amqp|Couldn't ack")
    print(
        f"\n[rabbitmq] cluster start {cluster.timings['start']:.1f} s; workers and beat ready "
        f"{workers_ready - test_started:.1f} s into the test; node {leader} (leader of critical) killed "
        f"{killed_at - run_started:.1f} s into a {run_ended - run_started:.1f} s run of {ORDERS} orders "
        f"({placed_after_kill} placed after the kill); new leader: node {new_leader}\n"
        f"[rabbitmq] from a lost connection to the next task received: {stalled} s; all fulfilled "
        f"{fulfilled_at - killed_at:.1f} s after the kill, every step and "
        f"email done after "
        f"{settled_at - killed_at:.1f} s; node restarted and rejoined in {restarted:.1f} s; "
        f"test {time.monotonic() - test_started:.1f} s\n"
        f"[rabbitmq] peak RSS per node {[kb // 1024 for kb in cluster.peak_rss_kb]} MB; tasks received more than once: "
        f"{len(again)}; publishes refused and left to the relay: {relayed}; "
        f"connection-loss lines: {len(lost)}; "
        f"delayed-delivery setup failures: {len(delayed_failures)}"
    )
    for line in delayed_failures + lost:
        print(f"[rabbitmq]   {line[:220]}")
    # The workers never waited for the dead node's delayed-delivery setup (18 s a reconnect with Celery's step).
    assert delayed_failures == []
