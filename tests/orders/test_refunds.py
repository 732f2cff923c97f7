"""After the sale: refunds, cancelling a paid order, and reservations that expire (against the sandbox, eager tasks).

Each test runs the order's outbox items after commit in this process (`django_capture_on_commit_callbacks`),
so the provider's refunds endpoint, its idempotency and its faults are the real sandbox's.
"""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import transaction
from django.utils import timezone

from core.models import OutboxItem
from integrations.errors import ProviderUnavailable
from notifications.models import Notification
from ops.deadletters import REFUND_FAILED
from ops.models import FailedTask
from orders import services
from orders.models import Order, OrderItem, StockMovement
from orders.services import place_order
from payments import refunds
from payments.models import Payment, Refund, WebhookEvent
from tests.after_sale import refund_now, stock_of
from tests.concurrency import run_concurrently
from tests.factories import ProductFactory
from tests.payments.support import post_webhook

pytestmark = pytest.mark.django_db

S = Order.Status


def _emails(kind: str, refund: Refund) -> int:
    return Notification.objects.filter(kind=kind, object_type="refund", object_id=refund.pk).count()


# --- Staff refunds ---------------------------------------------------------------------


def test_a_full_refund_gives_the_whole_charge_back_once_and_the_order_ends_refunded(
    fulfilled, sandbox, django_capture_on_commit_callbacks
):
    refund = refund_now(django_capture_on_commit_callbacks, order_id=fulfilled.pk)

    fulfilled.refresh_from_db()
    payment = fulfilled.payments.get()
    assert (refund.status, refund.amount, refund.attempts) == (Refund.Status.SUCCEEDED, Decimal("25.00"), 1)
    assert fulfilled.status == S.REFUNDED
    [at_provider] = sandbox.get("/v1/refunds", charge=payment.provider_charge_id).json()["data"]
    assert (at_provider["id"], at_provider["amount"]) == (refund.provider_refund_id, "25.00")
    assert at_provider["idempotency_key"] == refund.idempotency_key
    assert _emails("refund_requested", refund) == _emails("refund_succeeded", refund) == 1
    # Goods already with the shopper: no stock comes back by a refund.
    assert (stock_of("MUG"), stock_of("TEE")) == (8, 9)


def test_two_partial_refunds_then_the_rest_and_never_more_than_charged(
    fulfilled, sandbox, django_capture_on_commit_callbacks
):
    first = refund_now(django_capture_on_commit_callbacks, order_id=fulfilled.pk, amount="10.00")
    fulfilled.refresh_from_db()
    assert (first.status, fulfilled.status) == (Refund.Status.SUCCEEDED, S.PARTIALLY_REFUNDED)

    second = refund_now(django_capture_on_commit_callbacks, order_id=fulfilled.pk, amount="5")
    fulfilled.refresh_from_db()
    assert (second.amount, fulfilled.status) == (Decimal("5.00"), S.PARTIALLY_REFUNDED)

    with pytest.raises(refunds.RefundTooLarge, match="10.00 EUR left"):
        services.refund_order(order_id=fulfilled.pk, amount="10.01")

    last = refund_now(django_capture_on_commit_callbacks, order_id=fulfilled.pk)
    fulfilled.refresh_from_db()
    assert (last.amount, fulfilled.status) == (Decimal("10.00"), S.REFUNDED)
    with pytest.raises(refunds.NotRefundable):
        services.refund_order(order_id=fulfilled.pk, amount="0.01")
    payment = fulfilled.payments.get()
    assert sandbox.get(f"/v1/charges/{payment.provider_charge_id}").json()["amount_refunded"] == "25.00"
    assert list(fulfilled.events.values_list("to_status", flat=True))[-3:] == [
        S.PARTIALLY_REFUNDED,
        S.PARTIALLY_REFUNDED,
        S.REFUNDED,
    ]


def test_a_refund_of_lines_after_the_hand_over_keeps_stock_and_counts_the_units(
    fulfilled, django_capture_on_commit_callbacks
):
    mug = fulfilled.items.get(sku="MUG")
    refund = refund_now(django_capture_on_commit_callbacks, order_id=fulfilled.pk, lines={str(mug.pk): 1})

    mug.refresh_from_db()
    assert (refund.amount, refund.lines, mug.refunded_quantity) == (Decimal("10.00"), {str(mug.pk): 1}, 1)
    assert stock_of("MUG") == 8
    with pytest.raises(services.InvalidRefundLines, match="more than the 1 not refunded"):
        services.refund_order(order_id=fulfilled.pk, lines={str(mug.pk): 2})


@pytest.mark.parametrize(
    ("amount", "lines", "error"),
    [
        ("-1", None, refunds.InvalidRefundAmount),
        ("0", None, refunds.InvalidRefundAmount),
        ("1.001", None, refunds.InvalidRefundAmount),
        ("abc", None, refunds.InvalidRefundAmount),
        ("NaN", None, refunds.InvalidRefundAmount),
        ("Infinity", None, refunds.InvalidRefundAmount),
        ("1e12", None, refunds.InvalidRefundAmount),
        ("25.01", None, refunds.RefundTooLarge),
        (None, {"999999": 1}, services.InvalidRefundLines),
        (None, {"LINE": 0}, services.InvalidRefundLines),
        (None, {"LINE": "1"}, services.InvalidRefundLines),
        (None, {"LINE": True}, services.InvalidRefundLines),
        (None, {"LINE": -1}, services.InvalidRefundLines),
        (None, {"LINE": 3}, services.InvalidRefundLines),
        (None, {}, refunds.NotRefundable),
    ],
)
def test_hostile_refund_input_is_refused_and_claims_nothing(fulfilled, amount, lines, error):
    if lines:
        line = str(fulfilled.items.get(sku="MUG").pk)
        lines = {line if key == "LINE" else key: value for key, value in lines.items()}
    order_id = fulfilled.pk if error is not refunds.NotRefundable else fulfilled.pk + 1000
    with pytest.raises(error):
        services.refund_order(order_id=order_id, amount=amount, lines=lines)
    assert not Refund.objects.exists()
    assert not OutboxItem.objects.filter(task_name="payments.tasks.refund_payment").exists()


def test_orders_not_paid_cannot_be_refunded(user, products):
    order = place_order(owner=user, items=[("MUG", 1)])
    with pytest.raises(refunds.NotRefundable):
        services.refund_order(order_id=order.pk)


def test_the_same_submission_refunds_once(fulfilled, django_capture_on_commit_callbacks):
    first = refund_now(django_capture_on_commit_callbacks, order_id=fulfilled.pk, amount="3", submission="form-1")
    again = refund_now(django_capture_on_commit_callbacks, order_id=fulfilled.pk, amount="3", submission="form-1")
    assert first.pk == again.pk and Refund.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_refunds_racing_never_add_up_to_more_than_the_charge(fulfilled):
    # Six staff refund 10.00 of the 25.00 at the same moment, each with their own form.
    def attempt(i: int) -> str:
        try:
            services.refund_order(order_id=fulfilled.pk, amount="10.00", submission=f"form-{i}")
        except refunds.RefundTooLarge:
            return "refused"
        return "claimed"

    outcomes = run_concurrently(6, attempt)

    assert sorted(outcomes) == ["claimed", "claimed", "refused", "refused", "refused", "refused"]
    assert refunds.refunded(fulfilled.payments.get()) == Decimal("20.00")


# --- The provider failing, a lost answer, its webhook ------------------------------------


def test_a_refund_while_the_provider_fails_is_asked_again_with_its_key_and_made_once(fulfilled, sandbox):
    refund, _ = _claim(fulfilled)
    sandbox.set_faults(fail_next=2)
    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            refunds.settle_refund(refund_id=refund.pk)
    assert refunds.settle_refund(refund_id=refund.pk).status == Refund.Status.SUCCEEDED
    assert len(sandbox.get("/v1/refunds", reference=refund.idempotency_key).json()["data"]) == 1
    refund.refresh_from_db()
    assert refund.attempts == 3


def test_a_refund_whose_answer_was_lost_is_found_under_its_key_and_not_made_twice(fulfilled, sandbox):
    refund, _ = _claim(fulfilled)
    sandbox.set_faults(fail_after_refund_next=1)
    with pytest.raises(ProviderUnavailable):
        refunds.settle_refund(refund_id=refund.pk)
    assert refunds.settle_refund(refund_id=refund.pk).status == Refund.Status.SUCCEEDED
    assert len(sandbox.get("/v1/refunds", reference=refund.idempotency_key).json()["data"]) == 1


def test_the_refund_webhook_records_a_refund_whose_answer_was_lost(
    fulfilled, sandbox, client, webhook_receiver, django_capture_on_commit_callbacks
):
    refund, _ = _claim(fulfilled)
    sandbox.set_faults(fail_after_refund_next=1)
    with pytest.raises(ProviderUnavailable):
        refunds.settle_refund(refund_id=refund.pk)
    [made] = sandbox.get("/v1/refunds", reference=refund.idempotency_key).json()["data"]

    # The event the sandbox sent, posted to the shop unchanged (body and signature).
    [hook] = webhook_receiver.wait_for(
        lambda event: event["type"] == "refund.succeeded" and event["data"]["refund"]["id"] == made["id"]
    )
    with django_capture_on_commit_callbacks(execute=True):
        response = post_webhook(client, hook)
    assert response.status_code == 200

    refund.refresh_from_db()
    fulfilled.refresh_from_db()
    assert (refund.status, refund.provider_refund_id) == (Refund.Status.SUCCEEDED, made["id"])
    assert fulfilled.status == S.REFUNDED
    assert WebhookEvent.objects.get(type="refund.succeeded").status == WebhookEvent.Status.PROCESSED
    # The task's retry finds it done and asks nothing more.
    assert refunds.settle_refund(refund_id=refund.pk).attempts == 1


def test_a_refund_the_provider_refuses_fails_and_is_a_dead_letter(
    fulfilled, django_capture_on_commit_callbacks, dead_letters_forgotten
):
    payment = fulfilled.payments.get()
    Payment.objects.filter(pk=payment.pk).update(provider_charge_id="ch_not_at_the_provider")
    refund = refund_now(django_capture_on_commit_callbacks, order_id=fulfilled.pk, amount="5")

    assert refund.status == Refund.Status.FAILED and "resource_missing" in refund.failure_reason
    assert FailedTask.objects.filter(task_name=REFUND_FAILED, args=[refund.pk]).count() == 1
    # Nothing was given back: the amount is refundable again, and the order did not move.
    assert refunds.refundable(payment) == Decimal("25.00")
    fulfilled.refresh_from_db()
    assert fulfilled.status == S.FULFILLED


def _claim(order: Order) -> tuple[Refund, bool]:
    with transaction.atomic():
        return refunds.claim_refund(payment_id=order.payments.get().pk, amount=None)


# --- Cancelling a paid order ------------------------------------------------------------


def test_the_shopper_cancels_a_paid_order_before_hand_over_and_gets_everything_back(
    paid, user, sandbox, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        services.cancel_order(order_id=paid.pk, owner=user)

    paid.refresh_from_db()
    [refund] = Refund.objects.all()
    assert (refund.status, refund.amount, refund.reason) == ("succeeded", Decimal("25.00"), "cancelled_by_shopper")
    assert paid.status == S.REFUNDED
    assert list(paid.events.values_list("to_status", flat=True))[-2:] == [S.CANCELLED, S.REFUNDED]
    assert (stock_of("MUG"), stock_of("TEE")) == (10, 10)
    # The hand-over queued when it was paid finds it cancelled: nothing reaches the warehouse.
    services.sync_to_fulfillment(order_id=paid.pk)
    paid.refresh_from_db()
    assert paid.status == S.REFUNDED and not paid.fulfillment_key
    assert sandbox.get("/v1/shipments", order_id=paid.pk).json()["data"] == []


def test_a_paid_order_whose_hand_over_began_cannot_be_cancelled(paid, user):
    services._claim_hand_over(paid.pk)
    with pytest.raises(services.OrderNotCancellable):
        services.cancel_order(order_id=paid.pk, owner=user)
    assert not Refund.objects.exists()


def test_cancelling_twice_refunds_once(paid, user, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        services.cancel_order(order_id=paid.pk, owner=user)
    with pytest.raises(services.OrderNotCancellable):
        services.cancel_order(order_id=paid.pk, owner=user)
    assert Refund.objects.count() == 1


def test_a_line_refunded_before_hand_over_goes_back_on_hand_and_is_not_shipped(
    paid, sandbox, django_capture_on_commit_callbacks
):
    mug = paid.items.get(sku="MUG")
    refund = refund_now(django_capture_on_commit_callbacks, order_id=paid.pk, lines={str(mug.pk): 1})
    assert refund.status == Refund.Status.SUCCEEDED and refund.amount == Decimal("10.00")
    assert (stock_of("MUG"), stock_of("TEE")) == (9, 9)
    assert StockMovement.objects.filter(order=paid, kind="released").get().delta == 1

    services.sync_to_fulfillment(order_id=paid.pk)

    paid.refresh_from_db()
    # Shipped, then it says that part of it was given back.
    assert list(paid.events.values_list("to_status", flat=True))[-2:] == [S.FULFILLED, S.PARTIALLY_REFUNDED]
    [shipment] = sandbox.get("/v1/shipments", order_id=paid.pk).json()["data"]
    assert sorted((item["sku"], item["quantity"]) for item in shipment["items"]) == [("MUG", 1), ("TEE", 1)]


def test_refunding_every_line_before_hand_over_cancels_and_refunds_the_shipping_too(
    paid, django_capture_on_commit_callbacks
):
    lines = {str(item.pk): item.quantity for item in paid.items.all()}
    refund = refund_now(django_capture_on_commit_callbacks, order_id=paid.pk, lines=lines)
    paid.refresh_from_db()
    assert (refund.amount, paid.status) == (paid.total, S.REFUNDED)
    assert (stock_of("MUG"), stock_of("TEE")) == (10, 10)
    assert all(item.refunded_quantity == item.quantity for item in OrderItem.objects.filter(order=paid))


def test_a_failed_refund_of_every_line_counts_back_only_its_own_units(
    paid, sandbox, django_capture_on_commit_callbacks, dead_letters_forgotten
):
    # A mug refunded first (given back), then every unit left, and that refund refused by the provider.
    mug, tee = paid.items.get(sku="MUG"), paid.items.get(sku="TEE")
    assert (
        refund_now(django_capture_on_commit_callbacks, order_id=paid.pk, lines={str(mug.pk): 1}).status == "succeeded"
    )
    Payment.objects.filter(order=paid).update(provider_charge_id="ch_not_at_the_provider")

    rest = refund_now(django_capture_on_commit_callbacks, order_id=paid.pk, lines={str(mug.pk): 1, str(tee.pk): 1})

    assert rest.status == Refund.Status.FAILED
    mug.refresh_from_db()
    tee.refresh_from_db()
    # The first mug stays refunded; only the failed refund's units count as not refunded again.
    assert (mug.refunded_quantity, tee.refunded_quantity) == (1, 0)


# --- Reservations that expire -----------------------------------------------------------


def test_confirming_an_order_sets_its_payment_deadline(user, products, settings):
    settings.PAYMENT_EXPIRY_SECONDS = 1800
    order = place_order(owner=user, items=[("MUG", 1)])
    before = timezone.now()
    services.process_order(order_id=order.pk)
    item = OutboxItem.objects.get(task_name="orders.tasks.expire_order", args=[order.pk])
    assert before + timedelta(seconds=1790) < item.next_attempt_at < timezone.now() + timedelta(seconds=1810)


def test_an_unpaid_order_expires_once_and_its_stock_comes_back(user, products):
    order = place_order(owner=user, items=[("MUG", 3)])
    services.process_order(order_id=order.pk)
    assert stock_of("MUG") == 7

    services.expire_order(order_id=order.pk)
    services.expire_order(order_id=order.pk)

    order.refresh_from_db()
    assert order.status == S.EXPIRED and stock_of("MUG") == 10
    assert order.events.filter(to_status=S.EXPIRED).count() == 1
    assert Notification.objects.filter(kind="order_expired", object_id=order.pk).count() == 1
    # Its charge step, late, finds nothing to charge.
    services.charge_order(order_id=order.pk)
    assert not Payment.objects.filter(order=order).exists()


def test_a_paid_order_does_not_expire(paid):
    services.expire_order(order_id=paid.pk)
    paid.refresh_from_db()
    assert paid.status == S.PAID and stock_of("MUG") == 8


def test_a_charge_that_succeeds_after_expiry_is_refunded_by_itself_and_stock_stays_right(
    user, products, sandbox, django_capture_on_commit_callbacks
):
    order = place_order(owner=user, items=[("MUG", 3)])
    services.process_order(order_id=order.pk)
    # The charge is under way (claimed, the provider slow) when the reservation runs out.
    with pytest.raises(ProviderUnavailable):
        sandbox.set_faults(fail_next=1)
        services.charge_order(order_id=order.pk)
    services.expire_order(order_id=order.pk)
    assert stock_of("MUG") == 10

    with django_capture_on_commit_callbacks(execute=True):
        services.charge_order(order_id=order.pk)  # the provider answers at last: it took the money

    order.refresh_from_db()
    payment = order.payments.get()
    [refund] = Refund.objects.all()
    assert payment.status == Payment.Status.SUCCEEDED
    assert (refund.reason, refund.amount, refund.status) == ("paid_after_expiry", payment.amount, "succeeded")
    assert order.status == S.EXPIRED and stock_of("MUG") == 10
    assert _emails("refund_succeeded", refund) == 1
    # Applied again (a webhook, a redelivery): still one refund.
    services.apply_payment_outcome(order_id=order.pk, payment=payment)
    assert Refund.objects.count() == 1


def test_a_line_refunded_once_the_hand_over_began_is_still_shipped_and_no_stock_is_lost(
    paid, sandbox, django_capture_on_commit_callbacks
):
    # The hand-over has claimed its key (the warehouse may have the order) when staff refund a mug.
    services._claim_hand_over(paid.pk)
    mug = paid.items.get(sku="MUG")
    refund = refund_now(django_capture_on_commit_callbacks, order_id=paid.pk, lines={str(mug.pk): 1})
    assert refund.status == Refund.Status.SUCCEEDED
    assert stock_of("MUG") == 8  # not back on hand: it may be on its way

    services.sync_to_fulfillment(order_id=paid.pk)

    # So it is shipped: every unit is either on hand or with the warehouse.
    [shipment] = sandbox.get("/v1/shipments", order_id=paid.pk).json()["data"]
    assert sorted((item["sku"], item["quantity"]) for item in shipment["items"]) == [("MUG", 2), ("TEE", 1)]


@pytest.mark.django_db(transaction=True)
def test_a_shopper_cancelling_while_the_hand_over_starts_either_cancels_it_or_is_refused(user, products, sandbox):
    # Committed as it goes (eager tasks): it ends fulfilled, and each round puts it back to paid, not handed over.
    paid = place_order(owner=user, items=[("MUG", 2)])

    def work(i: int) -> str:
        if i == 0:
            return "key" if services._claim_hand_over(paid.pk)[1] is not None else "no key"
        try:
            services.cancel_order(order_id=paid.pk, owner=user)
        except services.OrderNotCancellable:
            return "refused"
        return "cancelled"

    for _ in range(5):
        Order.objects.filter(pk=paid.pk).update(status=S.PAID, fulfillment_key="")
        assert Payment.objects.get(order=paid).status == Payment.Status.SUCCEEDED
        Refund.objects.all().delete()
        outcomes = sorted(run_concurrently(2, work))
        assert outcomes in (["cancelled", "no key"], ["key", "refused"]), outcomes


def test_a_free_order_paid_without_a_payment_is_cancelled_before_hand_over_with_nothing_to_refund(user, db):
    # Found by the state machine (MODEL_SEED=2336779787): the page offered to cancel it, the service refused.
    ProductFactory(sku="SAMPLE", price="0.00", stock=3)
    order = place_order(owner=user, items=[("SAMPLE", 1)])
    services.process_order(order_id=order.pk)
    services.charge_order(order_id=order.pk)
    order.refresh_from_db()
    assert (order.status, order.can_cancel) == (S.PAID, True)

    assert services.cancel_order(order_id=order.pk, owner=user).status == S.CANCELLED
    assert stock_of("SAMPLE") == 3 and not Refund.objects.exists()


def test_a_refund_of_an_order_whose_payment_did_not_succeed_is_not_refundable_whatever_the_amount(fulfilled):
    # Found by the state machine: a held payment and the amount "0.00" answered "invalid amount", not 409.
    Payment.objects.filter(order=fulfilled).update(status=Payment.Status.NEEDS_ATTENTION)
    Order.objects.filter(pk=fulfilled.pk).update(status=S.ON_HOLD)
    for amount in (None, "0.00", "-1", "5"):
        with pytest.raises(refunds.NotRefundable):
            services.refund_order(order_id=fulfilled.pk, amount=amount)


def test_a_request_made_again_gets_its_refund_even_once_the_order_is_refunded_and_another_body_is_refused(
    fulfilled, django_capture_on_commit_callbacks
):
    first = refund_now(django_capture_on_commit_callbacks, order_id=fulfilled.pk, submission="key-1")
    fulfilled.refresh_from_db()
    assert fulfilled.status == S.REFUNDED

    assert services.refund_order(order_id=fulfilled.pk, submission="key-1").pk == first.pk
    with pytest.raises(services.RefundKeyReused):
        services.refund_order(order_id=fulfilled.pk, amount="3.00", submission="key-1")
    with pytest.raises(refunds.NotRefundable, match="all of its payment|is refunded"):
        services.refund_order(order_id=fulfilled.pk, submission="key-2")
    assert Refund.objects.count() == 1
