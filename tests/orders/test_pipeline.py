"""The order's life cycle (orders/pipeline.py) and the holds staff resolve (orders/services.py)."""

import html
import re
from decimal import Decimal

import pytest
from django.db import transaction

from core import outbox
from core.models import OutboxItem
from integrations.errors import ProviderUnavailable
from orders import pipeline
from orders.models import Order, StockMovement
from orders.pipeline import DEADLINES, NEXT_STEP, TRANSITIONS, IllegalTransition
from orders.services import (
    HOLD_MESSAGES,
    NotOnHold,
    charge_order,
    fail_held_order,
    hold_stuck_order,
    place_order,
    process_order,
    retry_held_order,
)
from payments.models import Payment
from tests.factories import OrderFactory, ProductFactory

pytestmark = pytest.mark.django_db

S = Order.Status
PROCESS = "orders.tasks.process_order"
CHARGE = "orders.tasks.charge_order"
SYNC = "orders.tasks.sync_to_fulfillment"

ILLEGAL = [(old, new) for old in S.values for new in S.values if new not in TRANSITIONS[old]]
LEGAL = [(old, new) for old in S.values for new in S.values if new in TRANSITIONS[old]]


def _pair_id(pair: tuple[str, str]) -> str:
    return f"{pair[0]}->{pair[1]}"


def locked(order: Order) -> Order:
    return Order.objects.select_for_update().get(pk=order.pk)


def set_status(order: Order, to_status: str, **kwargs) -> Order:
    with transaction.atomic():
        return pipeline.set_status(locked(order), to_status, **kwargs)


def order_steps(order: Order) -> list[str]:
    """The order's step items, oldest first (notifications and deadlines excluded)."""
    return list(
        OutboxItem.objects.filter(task_name__startswith="orders.", args=[order.pk])
        .exclude(task_name__in=[task for task, _ in DEADLINES.values()])
        .order_by("id")
        .values_list("task_name", flat=True)
    )


def hold_notice(client, order: Order) -> tuple[bool, str]:
    """Whether the order page's hold notice is shown, and its text."""
    page = html.unescape(client.get(f"/orders/{order.pk}/").content.decode())
    match = re.search(r'<p id="order-hold"([^>]*)>(.*?)</p>', page, re.DOTALL)
    assert match, "no hold notice on the order page"
    return "hidden" not in match.group(1), match.group(2).strip()


def movements(order: Order) -> list[tuple[str, int]]:
    return list(order.stock_movements.order_by("id").values_list("kind", "delta"))


# --- The transition table ----------------------------------------------------------


@pytest.mark.parametrize(("from_status", "to_status"), ILLEGAL, ids=map(_pair_id, ILLEGAL))
def test_illegal_transition_raises_and_changes_nothing(from_status, to_status):
    order = OrderFactory(status=from_status)
    row = locked(order)  # the test's transaction holds the lock; nothing rolls back what set_status might write

    with pytest.raises(IllegalTransition):
        pipeline.set_status(row, to_status, hold_reason="should not stick")

    assert row.status == from_status
    order.refresh_from_db()
    assert (order.status, order.hold_reason) == (from_status, "")
    assert not order.events.exists()
    assert not OutboxItem.objects.exists()


@pytest.mark.parametrize(("from_status", "to_status"), LEGAL, ids=map(_pair_id, LEGAL))
def test_legal_transition_records_an_event_and_enqueues_the_next_step(from_status, to_status):
    order = OrderFactory(status=from_status)

    set_status(order, to_status, note="by the test", hold_reason="Waiting for the warehouse.")

    order.refresh_from_db()
    assert order.status == to_status
    assert list(order.events.values_list("from_status", "to_status", "note")) == [
        (from_status, to_status, "by the test")
    ]
    # The reason sticks only to a hold; any other move clears it.
    assert order.hold_reason == ("Waiting for the warehouse." if to_status == S.ON_HOLD else "")
    assert order_steps(order) == ([NEXT_STEP[to_status]] if to_status in NEXT_STEP else [])


def test_the_step_after_each_status_is_its_task():
    assert NEXT_STEP == {S.PENDING: PROCESS, S.CONFIRMED: CHARGE, S.PAID: SYNC}


def test_final_statuses_have_no_step_and_no_way_out_but_a_refund():
    assert ILLEGAL, "the table allows every move"
    for status in Order.TERMINAL:
        assert status not in NEXT_STEP, status
        assert TRANSITIONS[status] <= {S.REFUNDED, S.PARTIALLY_REFUNDED}, status
    for status in (S.REFUNDED, S.REJECTED, S.PAYMENT_FAILED, S.EXPIRED):
        assert TRANSITIONS[status] == frozenset(), status


# --- Holds ---------------------------------------------------------------------------


@pytest.fixture
def paid_order(user, product):
    """An order whose stock is reserved and whose payment succeeded (set directly: no provider is called)."""
    order = place_order(owner=user, items=[("MUG-001", 3)])
    process_order(order_id=order.pk)
    return set_status(order, S.PAID, note="payment succeeded")


def test_order_on_hold_shows_its_hold_reason_on_its_page_and_in_the_api(client, user, paid_order):
    client.force_login(user)
    assert hold_notice(client, paid_order) == (False, "")
    assert client.get(f"/api/orders/{paid_order.pk}/").json()["hold_reason"] == ""

    hold_stuck_order(order_id=paid_order.pk, task_name=SYNC, reason="ProviderUnavailable: warehouse down", resumes=True)

    assert hold_notice(client, paid_order) == (True, HOLD_MESSAGES[S.PAID])
    body = client.get(f"/api/orders/{paid_order.pk}/").json()
    assert (body["status"], body["hold_reason"]) == (S.ON_HOLD, HOLD_MESSAGES[S.PAID])


def test_hold_stuck_order_leaves_an_order_that_has_moved_on_alone(user, product):
    order = place_order(owner=user, items=[("MUG-001", 1)])
    process_order(order_id=order.pk)

    # A late report that process_order failed: the order was confirmed meanwhile.
    held = hold_stuck_order(order_id=order.pk, task_name=PROCESS, reason="OperationalError: db restarting")

    assert held.status == S.CONFIRMED
    order.refresh_from_db()
    assert (order.status, order.hold_reason) == (S.CONFIRMED, "")
    assert not order.events.filter(to_status=S.ON_HOLD).exists()


@pytest.mark.parametrize(
    ("status", "task_name", "parked"),
    [(S.PENDING, PROCESS, False), (S.PAID, SYNC, True)],
    ids=["process-failed", "fulfilment-parked"],
)
def test_step_that_failed_for_good_puts_the_order_on_hold(user, product, status, task_name, parked):
    # Given an order waiting in `status` for its step's outbox item
    order = place_order(owner=user, items=[("MUG-001", 1)])
    if status == S.PAID:
        process_order(order_id=order.pk)
        set_status(order, S.PAID)
    item = OutboxItem.objects.get(task_name=task_name, args=[order.pk])

    # When the outbox reports the step's final failure (or its parking)
    outbox.work_failed.send(sender=OutboxItem, item=item, reason="ConnectionError: down", by_relay=False, parked=parked)

    # Then the order is on hold with the message for the status it was held at
    order.refresh_from_db()
    assert (order.status, order.hold_reason) == (S.ON_HOLD, HOLD_MESSAGES[status])
    note = order.events.get(to_status=S.ON_HOLD).note
    assert note.startswith(f"{task_name.rsplit('.', 1)[-1]} failed: ConnectionError: down")
    assert note.endswith("(tried again automatically)") == parked


@pytest.mark.parametrize(("origin", "task_name"), [(S.PENDING, PROCESS), (S.PAID, SYNC)], ids=["pending", "paid"])
def test_retry_held_order_returns_it_to_its_step(user, product, origin, task_name):
    order = place_order(owner=user, items=[("MUG-001", 2)])
    if origin == S.PAID:
        process_order(order_id=order.pk)
        set_status(order, S.PAID)
    hold_stuck_order(order_id=order.pk, task_name=task_name, reason="ConnectionError: down")
    items_before = OutboxItem.objects.filter(task_name=task_name, args=[order.pk]).count()
    stock_before = movements(order)

    retried = retry_held_order(order_id=order.pk)

    assert retried.status == origin
    order.refresh_from_db()
    assert (order.status, order.hold_reason) == (origin, "")
    assert order.events.last().note == "retried by staff"
    # The stuck step runs again: one new item of its task.
    assert OutboxItem.objects.filter(task_name=task_name, args=[order.pk]).count() == items_before + 1
    assert movements(order) == stock_before


def test_retry_held_order_refuses_an_order_that_is_not_on_hold(paid_order):
    with pytest.raises(NotOnHold):
        retry_held_order(order_id=paid_order.pk)

    paid_order.refresh_from_db()
    assert paid_order.status == S.PAID
    assert order_steps(paid_order) == [PROCESS, CHARGE, SYNC]


def test_fail_held_order_refuses_an_order_held_on_its_way_to_the_warehouse(paid_order, product):
    hold_stuck_order(order_id=paid_order.pk, task_name=SYNC, reason="ProviderRejected: 422")

    with pytest.raises(NotOnHold):
        fail_held_order(order_id=paid_order.pk)

    paid_order.refresh_from_db()
    assert paid_order.status == S.ON_HOLD
    product.refresh_from_db()
    assert product.stock == 7
    assert movements(paid_order) == [(StockMovement.Kind.RESERVED, -3)]


# A charge that fails for good writes its payment's dead letter (ops) on a connection of its own:
# these tests commit for real, so the database is emptied after each. Their commits publish to
# the real broker (eager mode off), where messages wait: the tests run the steps themselves.
held_charge = pytest.mark.django_db(transaction=True)


@pytest.fixture
def order_held_at_charge(user, product, broker, sandbox):
    """A confirmed order (3 of 10 mugs reserved) whose charge never reached the provider: retries spent, on hold."""
    order = place_order(owner=user, items=[("MUG-001", 3)])
    process_order(order_id=order.pk)
    sandbox.set_faults(error_rate=1.0)
    with pytest.raises(ProviderUnavailable):
        charge_order(order_id=order.pk)
    sandbox.set_faults(error_rate=0.0)
    assert Payment.objects.get(order=order).status == Payment.Status.PROCESSING
    hold_stuck_order(order_id=order.pk, task_name=CHARGE, reason="ProviderUnavailable: HTTP 503")
    order.refresh_from_db()
    return order


@held_charge
def test_hold_stuck_order_holds_a_confirmed_order_and_its_payment_needs_attention_once(order_held_at_charge):
    order = order_held_at_charge
    payment = Payment.objects.get(order=order)
    assert (order.status, order.hold_reason) == (S.ON_HOLD, HOLD_MESSAGES[S.CONFIRMED])
    assert (payment.status, payment.failure_reason) == (
        Payment.Status.NEEDS_ATTENTION,
        "unfinished: ProviderUnavailable: HTTP 503",
    )
    events = list(order.events.values_list("from_status", "to_status"))

    again = hold_stuck_order(order_id=order.pk, task_name=CHARGE, reason="ProviderUnavailable: HTTP 503 (again)")

    assert again.status == S.ON_HOLD
    order.refresh_from_db()
    assert (order.status, order.hold_reason) == (S.ON_HOLD, HOLD_MESSAGES[S.CONFIRMED])
    assert list(order.events.values_list("from_status", "to_status")) == events
    assert events[-1] == (S.CONFIRMED, S.ON_HOLD)
    payment.refresh_from_db()
    assert payment.failure_reason == "unfinished: ProviderUnavailable: HTTP 503"
    # A hold is not a step: nothing more is enqueued for the order.
    assert order_steps(order) == [PROCESS, CHARGE]


@held_charge
def test_retry_held_charge_charges_once_with_the_same_key_and_keeps_the_stock(order_held_at_charge, product, sandbox):
    order = order_held_at_charge
    key = Payment.objects.get(order=order).idempotency_key

    # When staff retry
    retry_held_order(order_id=order.pk)

    # Then the order is back at confirmed, its payment processing again with the same key, its charge enqueued
    order.refresh_from_db()
    assert (order.status, order.hold_reason) == (S.CONFIRMED, "")
    payment = Payment.objects.get(order=order)
    assert (payment.status, payment.failure_reason, payment.idempotency_key) == (Payment.Status.PROCESSING, "", key)
    assert order_steps(order) == [PROCESS, CHARGE, CHARGE]
    product.refresh_from_db()
    assert product.stock == 7
    assert movements(order) == [(StockMovement.Kind.RESERVED, -3)]

    # And the charge, run again, charges once
    charge_order(order_id=order.pk)
    order.refresh_from_db()
    assert order.status == S.PAID
    payment.refresh_from_db()
    assert payment.status == Payment.Status.SUCCEEDED
    assert [charge["id"] for charge in sandbox.charges(reference=key)] == [payment.provider_charge_id]


@held_charge
def test_fail_held_order_fails_the_payment_and_releases_the_stock_once(order_held_at_charge, product):
    order = order_held_at_charge
    product.refresh_from_db()
    assert product.stock == 7

    failed = fail_held_order(order_id=order.pk)

    assert failed.status == S.PAYMENT_FAILED
    order.refresh_from_db()
    assert (order.status, order.hold_reason) == (S.PAYMENT_FAILED, "")
    product.refresh_from_db()
    assert product.stock == 10
    assert movements(order) == [(StockMovement.Kind.RESERVED, -3), (StockMovement.Kind.RELEASED, 3)]

    # A second resolution of the same hold is refused and releases nothing more.
    for resolve in (fail_held_order, retry_held_order):
        with pytest.raises(NotOnHold):
            resolve(order_id=order.pk)
    product.refresh_from_db()
    assert product.stock == 10
    assert movements(order) == [(StockMovement.Kind.RESERVED, -3), (StockMovement.Kind.RELEASED, 3)]


# --- Nothing to charge ---------------------------------------------------------------


def test_zero_total_order_is_paid_without_a_payment(user, sandbox, django_capture_on_commit_callbacks):
    ProductFactory(sku="FREE-SAMPLE", price=Decimal("0.00"), stock=5)

    with django_capture_on_commit_callbacks(execute=True):
        order = place_order(owner=user, items=[("FREE-SAMPLE", 1)])

    order.refresh_from_db()
    assert order.total == Decimal("0.00")
    assert order.status == S.FULFILLED
    assert list(order.events.values_list("to_status", flat=True)) == [S.PENDING, S.CONFIRMED, S.PAID, S.FULFILLED]
    assert order.events.get(to_status=S.PAID).note == "nothing to charge: total is zero"
    assert not Payment.objects.filter(order=order).exists()
    assert sandbox.charges() == []

    # A second delivery of the charge step changes nothing.
    charge_order(order_id=order.pk)
    assert order.events.count() == 4
    assert not Payment.objects.filter(order=order).exists()


@pytest.mark.parametrize("action", ["retry_held_order", "fail_held_order"])
def test_staff_actions_on_a_missing_order_say_so(action):
    from orders import services

    with pytest.raises(services.NotOnHold, match="does not exist"):
        getattr(services, action)(order_id=987654)


def test_a_confirmed_order_gets_its_payment_deadline_with_its_charge_step(product, user):
    order = place_order(owner=user, items=[("MUG-001", 1)])
    set_status(order, S.CONFIRMED, note="stock reserved")
    assert list(
        OutboxItem.objects.filter(args=[order.pk], task_name__startswith="orders.")
        .order_by("id")
        .values_list("task_name", flat=True)
    ) == [PROCESS, "orders.tasks.expire_order", CHARGE]
