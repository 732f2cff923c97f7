"""Issue 18: the database round trips of the charge and the hand-over, the two heaviest hops.

Each test counts what the hop sends to PostgreSQL (Django's CaptureQueriesContext, which logs BEGIN
and COMMIT too) and checks the outcome is the one the pipeline has always reached: fewer round trips,
the same rows.
"""

import threading
import time

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from config.celery import app
from orders import services
from orders.models import Order, Product, StockMovement
from payments.models import Payment
from tests.concurrency import run_concurrently
from tests.factories import ProductFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

CHARGE = "orders.tasks.charge_order"


@pytest.fixture(autouse=True)
def steps_are_published_not_run(monkeypatch):
    """Each hop is run here, by the test: what a hop dispatches goes to the (memory) broker and stays there."""
    monkeypatch.setitem(app.conf, "task_always_eager", False)


def confirmed_order() -> Order:
    ProductFactory(sku="HOP-1", stock=10)
    ProductFactory(sku="HOP-2", stock=10)
    order = services.place_order(owner=UserFactory(), items=[("HOP-1", 1), ("HOP-2", 2)], idempotency_key="hop")
    services.process_order(order_id=order.pk)
    order.refresh_from_db()
    assert order.status == Order.Status.CONFIRMED
    return order


def statements(captured: CaptureQueriesContext) -> list[str]:
    """The hop's statements to its last COMMIT: after it, the outbox marks what it published (on the memory
    broker of these tests; on Redis, the broker the bench measures, it writes nothing there)."""
    sqls = [query["sql"] for query in captured.captured_queries]
    return sqls[: len(sqls) - sqls[::-1].index("COMMIT")]


def listing(sqls: list[str]) -> str:
    return "\n".join(sql[:150] for sql in sqls)


def touching(sqls: list[str], verb: str, table: str) -> list[str]:
    return [sql for sql in sqls if sql.startswith(verb) and f'"{table}"' in sql.split(" WHERE ")[0]]


def test_a_reservation_locks_its_products_once_and_writes_their_stock_in_one_statement_without_a_savepoint():
    ProductFactory(sku="HOP-1", stock=10)
    ProductFactory(sku="HOP-2", stock=10)
    ProductFactory(sku="HOP-3", stock=10)
    order = services.place_order(owner=UserFactory(), items=[("HOP-1", 1), ("HOP-2", 2), ("HOP-3", 3)])
    with CaptureQueriesContext(connection) as captured:
        services.process_order(order_id=order.pk)
    sqls = statements(captured)

    assert not [sql for sql in sqls if "SAVEPOINT" in sql], listing(sqls)
    assert len(touching(sqls, "UPDATE", "orders_product")) == 1, listing(sqls)  # one a line before
    assert len(sqls) <= 15, listing(sqls)  # 18 before, for three lines

    order.refresh_from_db()
    assert order.status == Order.Status.CONFIRMED
    assert dict(Product.objects.values_list("sku", "stock")) == {"HOP-1": 9, "HOP-2": 8, "HOP-3": 7}


def test_a_charge_claims_then_records_and_moves_the_order_in_one_commit_reading_its_payment_once():
    order = confirmed_order()
    with CaptureQueriesContext(connection) as captured:
        services.charge_order(order_id=order.pk)
    sqls = statements(captured)

    # Two transactions: the claim (committed before the provider is called) and the outcome with the order's move.
    # Before: three, and the attempt count committed on its own between the first two.
    assert sqls.count("COMMIT") == 2, sqls
    # The payment is looked for once, under the order's lock; the claimed row is not read back before the call.
    assert len(touching(sqls, "SELECT", "payments_payment")) == 2, sqls  # the lookup, and _record's row lock
    # The call is counted with the claim (attempts=1 in its INSERT), not by an UPDATE of its own.
    assert not [sql for sql in touching(sqls, "UPDATE", "payments_payment") if '"attempts"' in sql], sqls
    assert len(sqls) <= 15, listing(sqls)  # 19 before

    order.refresh_from_db()
    payment = Payment.objects.get(order=order)
    assert (order.status, payment.status, payment.attempts) == (Order.Status.PAID, Payment.Status.SUCCEEDED, 1)
    assert list(order.events.values_list("to_status", flat=True)) == ["pending", "confirmed", "paid"]


def test_a_charge_delivered_again_after_its_claim_counts_its_second_call():
    order = confirmed_order()
    with pytest.MonkeyPatch.context() as patch:
        # The first delivery dies at the provider call, after its claim committed.
        patch.setattr("payments.services.provider.charge", lambda **kwargs: (_ for _ in ()).throw(SystemExit))
        with pytest.raises(SystemExit):
            services.charge_order(order_id=order.pk)
    assert Payment.objects.get(order=order).attempts == 1
    services.charge_order(order_id=order.pk)
    payment = Payment.objects.get(order=order)
    assert (payment.status, payment.attempts) == (Payment.Status.SUCCEEDED, 2)
    assert Order.objects.get(pk=order.pk).status == Order.Status.PAID


def test_a_hand_over_reads_the_order_under_its_lock_only_and_its_lines_with_what_was_released_at_once():
    order = confirmed_order()
    services.charge_order(order_id=order.pk)
    with CaptureQueriesContext(connection) as captured:
        services.sync_to_fulfillment(order_id=order.pk)
    sqls = statements(captured)

    order_reads = touching(sqls, "SELECT", "orders_order")
    assert len(order_reads) == 2 and all("FOR UPDATE" in sql for sql in order_reads), sqls
    lines = touching(sqls, "SELECT", "orders_orderitem")
    assert len(lines) == 1 and "orders_stockmovement" in lines[0], sqls
    assert [sql for sql in sqls if "orders_stockmovement" in sql] == lines, sqls  # only as the lines' subquery
    assert len(sqls) <= 13, listing(sqls)  # 15 before

    order.refresh_from_db()
    assert order.status == Order.Status.FULFILLED and order.fulfillment_key.startswith("ship_")


def test_a_hand_over_ships_what_was_not_released_and_each_line_once(sandbox):
    order = confirmed_order()
    services.charge_order(order_id=order.pk)
    # Two units of HOP-2 given back before the hand-over (as a line refund does), one at a time.
    hop2 = order.items.get(sku="HOP-2")
    for _ in range(2):
        StockMovement.objects.create(product_id=hop2.product_id, delta=1, kind=StockMovement.Kind.RELEASED, order=order)

    services.sync_to_fulfillment(order_id=order.pk)

    [shipment] = sandbox.get("/v1/shipments", order_id=order.pk).json()["data"]
    assert [(item["sku"], item["quantity"]) for item in shipment["items"]] == [("HOP-1", 1)]


def test_a_hold_taken_while_the_charge_step_records_its_outcome_waits_its_turn_no_deadlock():
    """The charge step records its payment and moves its order in one transaction: the order's lock first, then
    the payment's, as every path that takes both does. Here the step's final failure (another delivery's) holds
    the order meanwhile (hold_stuck_order: the order's lock, then the payment's): it waits for the step and then
    finds the order paid. (The payment's lock first would deadlock: the step holding the payment and waiting on
    the order, the hold the other way round.)"""
    order = confirmed_order()
    locks, step_locked = [], threading.Event()

    def charge_step(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        if "FOR UPDATE" in sql:
            locks.append(sql)
        if len(locks) == 2 and not step_locked.is_set():
            # The claim's lock was the first. The provider has charged; the step holds the first lock of the
            # transaction that records the outcome.
            step_locked.set()
            time.sleep(1.5)  # the hold now asks for its locks (PostgreSQL's deadlock check runs after 1 s)
        return result

    def work(i: int) -> str:
        if i == 0:
            with connection.execute_wrapper(charge_step):
                return services.charge_order(order_id=order.pk).status
        assert step_locked.wait(10)
        return services.hold_stuck_order(order_id=order.pk, task_name=CHARGE, reason="redelivered: gave up").status

    assert run_concurrently(2, work, timeout=30) == [Order.Status.PAID, Order.Status.PAID]
    payment = Payment.objects.get(order=order)
    assert (payment.status, payment.attempts) == (Payment.Status.SUCCEEDED, 1)
    assert list(order.events.values_list("to_status", flat=True)) == ["pending", "confirmed", "paid"]


def test_a_status_change_writes_all_its_outbox_items_in_one_insert():
    """Confirming an order dispatches the charge, the payment's deadline and the email: one INSERT for the three,
    published after commit with the charge first (before: one INSERT each). Payment writes two (the hand-over,
    the email) in one too."""
    ProductFactory(sku="HOP-1", stock=10)
    order = services.place_order(owner=UserFactory(), items=[("HOP-1", 1)])
    with CaptureQueriesContext(connection) as captured:
        services.process_order(order_id=order.pk)
    sqls = statements(captured)
    [insert] = touching(sqls, "INSERT", "core_outboxitem")
    assert insert.count("orders.tasks.charge_order") == 1 and insert.count("orders.tasks.expire_order") == 1, insert
    assert "notifications.tasks.send_notification" in insert
    assert len(sqls) <= 12, listing(sqls)  # 14 before

    with CaptureQueriesContext(connection) as captured:
        services.charge_order(order_id=order.pk)
    sqls = statements(captured)
    [insert] = touching(sqls, "INSERT", "core_outboxitem")
    assert "orders.tasks.sync_to_fulfillment" in insert and "notifications.tasks.send_notification" in insert
    assert len(sqls) <= 14, listing(sqls)  # 15 before

    order.refresh_from_db()
    assert order.status == Order.Status.PAID
    tasks = list(order_items(order))
    assert tasks.index("orders.tasks.charge_order") < tasks.index("notifications.tasks.send_notification")
    assert tasks.count("notifications.tasks.send_notification") == 2


def order_items(order: Order) -> list[str]:
    """The order's outbox items' tasks, oldest first (the emails' items name their notification, not the order)."""
    from core.models import OutboxItem
    from notifications.models import Notification

    emails = [str(pk) for pk in Notification.objects.filter(object_id=order.pk).values_list("pk", flat=True)]
    items = OutboxItem.objects.order_by("pk").values_list("task_name", "args")
    return [name for name, args in items if args and (args[0] == order.pk or str(args[0]) in emails)]


def test_a_status_change_writes_its_event_and_the_orders_new_status_in_one_statement():
    """The event's INSERT rides in the order's UPDATE (a data-modifying WITH): one round trip where it was two,
    on each of an order's moves; the rows are the ones two statements wrote."""
    from django.db import transaction

    from orders import pipeline

    ProductFactory(sku="HOP-1", stock=10)
    order = services.place_order(owner=UserFactory(), items=[("HOP-1", 1)])
    with CaptureQueriesContext(connection) as captured:
        services.process_order(order_id=order.pk)
    sqls = statements(captured)
    [move] = [sql for sql in sqls if "orders_orderevent" in sql]
    assert move.startswith("WITH") and 'UPDATE "orders_order"' in move, move
    assert len(sqls) <= 11, listing(sqls)  # 12 before

    order.refresh_from_db()
    event = order.events.get(to_status=Order.Status.CONFIRMED)
    assert (order.status, order.hold_reason, event.from_status, event.note) == (
        "confirmed",
        "",
        "pending",
        "stock reserved",
    )
    assert event.created_at == order.updated_at  # one moment for both rows
    services.charge_order(order_id=order.pk)
    order.refresh_from_db()
    assert [e.to_status for e in order.events.all()] == ["pending", "confirmed", "paid"]
    # A hold keeps its reason, and leaving the hold clears it, as before.
    for to_status, reason in ((Order.Status.ON_HOLD, "warehouse down"), (Order.Status.PAID, "")):
        with transaction.atomic():
            locked = Order.objects.select_for_update().get(pk=order.pk)
            pipeline.set_status(locked, to_status, note=f"to {to_status}", hold_reason="warehouse down")
        order.refresh_from_db()
        assert (order.status, order.hold_reason) == (to_status, reason)
    assert [e.to_status for e in order.events.all()] == ["pending", "confirmed", "paid", "on_hold", "paid"]


def test_a_move_of_an_order_that_is_gone_is_refused_as_the_orms_save_refused_it():
    from django.db import DatabaseError, transaction

    from orders import pipeline

    ProductFactory(sku="HOP-1", stock=10)
    order = services.place_order(owner=UserFactory(), items=[("HOP-1", 1)])
    with pytest.raises(DatabaseError, match="updated 0 rows"), transaction.atomic():
        Order.objects.filter(pk=order.pk).delete()
        pipeline.set_status(order, Order.Status.CONFIRMED, note="stale")
    assert Order.objects.filter(pk=order.pk).exists()  # rolled back with it


def test_two_deliveries_of_the_same_step_at_once_write_one_move_and_one_set_of_items():
    """A duplicate delivery racing the first: the second waits on the order's lock, finds it moved, and writes
    no event, no status and no outbox item of its own (the move and its items are written in one statement each)."""
    from core.models import OutboxItem

    ProductFactory(sku="HOP-1", stock=10)
    order = services.place_order(owner=UserFactory(), items=[("HOP-1", 1)])
    statuses = run_concurrently(2, lambda i: services.process_order(order_id=order.pk).status, timeout=30)
    assert statuses == [Order.Status.CONFIRMED, Order.Status.CONFIRMED]
    assert list(order.events.values_list("to_status", flat=True)) == ["pending", "confirmed"]
    names = sorted(
        OutboxItem.objects.exclude(task_name="orders.tasks.process_order").values_list("task_name", flat=True)
    )
    assert names == ["notifications.tasks.send_notification", "orders.tasks.charge_order", "orders.tasks.expire_order"]
    assert Product.objects.get(sku="HOP-1").stock == 9


def test_an_order_email_reads_the_order_with_its_lines_in_one_statement():
    """send_notification (three an order) read the order, then its lines: one SELECT of the lines joined to their
    order now. The email lists the same lines."""
    from django.core import mail

    from notifications import services as notifications
    from notifications.models import Notification

    order = confirmed_order()
    notification = Notification.objects.get(kind=Notification.Kind.ORDER_CONFIRMED, object_id=order.pk)
    with CaptureQueriesContext(connection) as captured:
        notifications.send_notification(notification_id=notification.pk)
    sqls = statements(captured)

    reads = [
        sql for sql in sqls if sql.startswith("SELECT") and ('"orders_order"' in sql or '"orders_orderitem"' in sql)
    ]
    assert len(reads) == 1, listing(sqls)
    assert len(sqls) <= 5, listing(sqls)  # BEGIN, the notification locked, the order with its lines, UPDATE, COMMIT
    [email] = mail.outbox
    lines = [line.strip() for line in email.body.splitlines() if " x " in line]
    assert lines == [
        f"{item.quantity} x {item.name} ({item.sku}) at {item.unit_price} {order.currency}"
        for item in order.items.all()
    ]
    assert f"Total: {order.total} {order.currency}" in email.body
