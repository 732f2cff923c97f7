"""After the sale, on real processes (issue 16): refunds, cancelling a paid order, and a reservation that expires.

A critical worker (two processes), a default worker (the relay, the emails) and beat run with the
Procfile's commands against the test database and broker; the session's sandbox process is the
provider and the warehouse; emails go to an SMTP server of the test's own. Staff and shoppers act
through the services, in this process, as the admin, the API and the pages do.
"""

import threading
from decimal import Decimal

import pytest

from notifications.models import Notification
from orders import services
from orders.models import Order, Product
from orders.services import place_order
from payments import refunds
from payments.models import Payment, Refund
from tests.factories import ProductFactory, UserFactory
from tests.stack import wait_for

pytestmark = [pytest.mark.worker, pytest.mark.timeout(240), pytest.mark.django_db(transaction=True)]

S = Order.Status
FAST_RELAY = {"OUTBOX_RELAY_SECONDS": "1", "OUTBOX_FAST_PATH_GRACE_SECONDS": "2", "EMAIL_TIMEOUT": "5"}


@pytest.fixture
def stack(start_worker, processes, worker_env, mail):
    """Start the workers and beat with `extra` settings; returns the environment they run with."""

    def start(**extra: str) -> dict[str, str]:
        env = {**worker_env, **FAST_RELAY, "EMAIL_URL": mail.url, **extra}
        processes.beat(env)
        start_worker("critical", concurrency=2, env=env)
        start_worker("default", env=env)
        return env

    return start


def _status(order: Order, status: str, timeout: float = 60) -> Order:
    return wait_for(
        lambda: (fresh := Order.objects.get(pk=order.pk)).status == status and fresh,
        timeout,
        f"order {order.pk} to be {status} (is {Order.objects.get(pk=order.pk).status})",
    )


def _emailed(kind: str, object_id: int) -> bool:
    return Notification.objects.filter(kind=kind, object_id=object_id, status=Notification.Status.SENT).count() == 1


def _refunds_at(sandbox, payment: Payment) -> list[dict]:
    return sandbox.get("/v1/refunds", charge=payment.provider_charge_id).json()["data"]


@pytest.fixture
def shopper(db):
    ProductFactory(sku="MUG", price="10.00", stock=10)
    ProductFactory(sku="TEE", price="5.00", stock=10)
    return UserFactory()


def _fulfilled(shopper) -> Order:
    return _status(place_order(owner=shopper, items=[("MUG", 2), ("TEE", 1)]), S.FULFILLED)


def test_a_full_refund_is_given_back_once_and_the_shopper_is_told_twice(stack, shopper, sandbox, mail):
    stack()
    order = _fulfilled(shopper)

    refund = services.refund_order(order_id=order.pk, note="damaged in transit")

    _status(order, S.REFUNDED)
    refund.refresh_from_db()
    payment = order.payments.get()
    assert (refund.status, refund.amount, refund.attempts) == (Refund.Status.SUCCEEDED, Decimal("25.00"), 1)
    [made] = _refunds_at(sandbox, payment)
    assert (made["id"], made["amount"], made["idempotency_key"]) == (
        refund.provider_refund_id,
        "25.00",
        refund.idempotency_key,
    )
    wait_for(lambda: _emailed("refund_requested", refund.pk) and _emailed("refund_succeeded", refund.pk), 30, "emails")
    subjects = [subject for subject in mail.subjects if "Refund" in subject]
    assert sorted(subjects) == sorted(
        [f"Refund of 25.00 EUR for order #{order.pk} is on its way", f"Refunded 25.00 EUR for order #{order.pk}"]
    ), mail.subjects


def test_two_partial_refunds_racing_never_give_back_more_than_was_charged(stack, shopper, sandbox):
    stack()
    order = _fulfilled(shopper)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def staff(i: int) -> None:
        barrier.wait()
        try:
            services.refund_order(order_id=order.pk, amount="15.00", submission=f"form-{i}")
            outcomes.append("claimed")
        except refunds.RefundTooLarge:
            outcomes.append("refused")

    threads = [threading.Thread(target=staff, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(outcomes) == ["claimed", "refused"]
    _status(order, S.PARTIALLY_REFUNDED)
    payment = order.payments.get()
    assert sandbox.get(f"/v1/charges/{payment.provider_charge_id}").json()["amount_refunded"] == "15.00"
    # The other 10.00 can still be refunded, and then no more.
    services.refund_order(order_id=order.pk, amount="10.00")
    _status(order, S.REFUNDED)
    with pytest.raises(refunds.RefundError):
        services.refund_order(order_id=order.pk, amount="0.01")
    assert sum(Decimal(r["amount"]) for r in _refunds_at(sandbox, payment)) == Decimal("25.00")


def test_a_refund_while_the_provider_fails_then_recovers_is_made_once(stack, shopper, sandbox):
    stack()
    order = _fulfilled(shopper)
    # Two answers refused before anything is done, then one refund made whose answer is lost.
    sandbox.set_faults(fail_next=2, fail_after_refund_next=1)

    refund = services.refund_order(order_id=order.pk, amount="7.50")

    _status(order, S.PARTIALLY_REFUNDED)
    refund.refresh_from_db()
    assert (refund.status, refund.attempts) == (Refund.Status.SUCCEEDED, 4)
    [made] = _refunds_at(sandbox, order.payments.get())
    assert (made["id"], made["amount"]) == (refund.provider_refund_id, "7.50")


def test_the_shopper_cancels_a_paid_order_before_hand_over_and_is_refunded_in_full(stack, shopper, sandbox):
    # Paid with no worker running: its hand-over waits in the critical queue.
    order = place_order(owner=shopper, items=[("MUG", 2), ("TEE", 1)])
    services.process_order(order_id=order.pk)
    services.charge_order(order_id=order.pk)
    assert Order.objects.get(pk=order.pk).status == S.PAID

    services.cancel_order(order_id=order.pk, owner=shopper)
    assert dict(Product.objects.values_list("sku", "stock")) == {"MUG": 10, "TEE": 10}
    stack()  # the waiting hand-over is delivered now, and finds the order cancelled

    order = _status(order, S.REFUNDED)
    [refund] = Refund.objects.all()
    assert (refund.reason, refund.amount, refund.status) == ("cancelled_by_shopper", Decimal("25.00"), "succeeded")
    assert [e.to_status for e in order.events.all()] == ["pending", "confirmed", "paid", "cancelled", "refunded"]
    assert not order.fulfillment_key
    assert sandbox.get("/v1/shipments", order_id=order.pk).json()["data"] == []
    wait_for(lambda: _emailed("refund_succeeded", refund.pk), 30, "the refunded email")


def test_a_reservation_expires_and_a_late_success_is_refunded_with_stock_right(stack, shopper, sandbox):
    # The provider answers after 8 s; the reservation lasts 2 s (slack for a starved machine on both sides).
    sandbox.set_faults(latency_ms=8000)
    stack(PAYMENT_EXPIRY_SECONDS="2")

    order = place_order(owner=shopper, items=[("MUG", 3)])

    _status(order, S.EXPIRED, timeout=30)
    assert Product.objects.get(sku="MUG").stock == 10
    # The charge was on its way: it succeeds late, and is given back by itself.
    payment = wait_for(
        lambda: Payment.objects.filter(order=order, status=Payment.Status.SUCCEEDED).first(), 30, "the late charge"
    )
    refund = wait_for(
        lambda: Refund.objects.filter(payment=payment, status=Refund.Status.SUCCEEDED).first(), 60, "its refund"
    )
    assert (refund.reason, refund.amount) == (Refund.Reason.PAID_AFTER_EXPIRY, payment.amount)
    order.refresh_from_db()
    assert order.status == S.EXPIRED
    assert [e.to_status for e in order.events.all()] == ["pending", "confirmed", "expired"]
    assert Product.objects.get(sku="MUG").stock == 10
    [made] = _refunds_at(sandbox, payment)
    assert made["amount"] == str(payment.amount)
    assert sandbox.get("/v1/shipments", order_id=order.pk).json()["data"] == []
    wait_for(lambda: _emailed("order_expired", order.pk) and _emailed("refund_succeeded", refund.pk), 30, "the emails")
