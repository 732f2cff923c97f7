import hashlib
import hmac
import json
import time
from datetime import date
from decimal import Decimal
from unittest import mock

import pytest

from core.models import OutboxItem
from ops.deadletters import PAYMENT_NEEDS_ATTENTION
from ops.models import FailedTask
from orders import services as order_services
from orders.models import Order
from orders.services import place_order
from payments import services
from payments.models import Payment, WebhookEvent
from tests.factories import OrderFactory, PlanFactory, ProductFactory, SubscriptionFactory, WebhookEventFactory
from tests.payments.support import claim_and_stop, deliver_webhook

pytestmark = pytest.mark.django_db

URL = "/payments/webhooks/provider/"
SECRET = "test-webhook-secret"


def signed(body: bytes, *, secret: str = SECRET, timestamp: int | None = None) -> str:
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def event_body(event_id: str = "evt_1", event_type: str = "charge.succeeded") -> bytes:
    return json.dumps({"id": event_id, "type": event_type, "data": {"charge": {"id": "ch_1"}}}).encode()


def post(client, body: bytes, signature: str | None):
    headers = {"HTTP_SANDBOX_SIGNATURE": signature} if signature is not None else {}
    return client.post(URL, data=body, content_type="application/json", **headers)


def test_signed_event_is_stored_once_and_dispatched_once(client, django_capture_on_commit_callbacks):
    body = event_body()
    with django_capture_on_commit_callbacks() as first_callbacks:
        first = post(client, body, signed(body))
    with django_capture_on_commit_callbacks() as replay_callbacks:
        replay = post(client, body, signed(body))
    assert first.status_code == 200 and first.json()["duplicate"] is False
    assert replay.status_code == 200 and replay.json()["duplicate"] is True
    assert WebhookEvent.objects.count() == 1
    assert (len(first_callbacks), len(replay_callbacks)) == (1, 0)
    event = WebhookEvent.objects.get()
    assert list(OutboxItem.objects.values_list("task_name", "args")) == [("payments.tasks.process_webhook", [event.pk])]


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "",
        "garbage",
        "t=abc,v1=00",
        signed(event_body(), secret="wrong-secret"),
        signed(event_body(), timestamp=int(time.time()) - 3600),
        signed(event_body(), timestamp=int(time.time()) + 3600),
        signed(b"another body"),
    ],
    ids=["missing", "empty", "garbage", "bad-timestamp", "wrong-secret", "stale", "future", "other-body"],
)
def test_unsigned_or_badly_signed_webhook_is_refused_and_stores_nothing(client, signature):
    response = post(client, event_body(), signature)
    assert response.status_code == 400
    assert "detail" in response.json()
    assert WebhookEvent.objects.count() == 0


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe\x00",
        b"[1, 2]",
        b'{"id": 5, "type": "charge.succeeded"}',
        b'{"type": "x"}',
        b'{"id": ""}',
    ],
    ids=["not-json", "bad-utf8", "array", "id-not-string", "no-id", "empty-id"],
)
def test_hostile_signed_body_is_refused_and_stores_nothing(client, body):
    response = post(client, body, signed(body))
    assert response.status_code == 400
    assert WebhookEvent.objects.count() == 0


def test_huge_webhook_body_is_refused(client):
    body = json.dumps({"id": "evt_big", "type": "charge.succeeded", "pad": "x" * 100_000}).encode()
    response = post(client, body, signed(body))
    assert response.status_code == 413
    assert WebhookEvent.objects.count() == 0


def test_webhook_rejects_get(client):
    assert client.get(URL).status_code == 405


def test_webhook_finishes_a_payment_whose_worker_died_after_the_charge(user, sandbox):
    """The provider's event reconciles a Payment left `processing` by a crash, as the provider reports it."""
    plan = PlanFactory(code="wh", name="Webhook plan", price="5.00")
    subscription = SubscriptionFactory(owner=user, plan=plan, current_period_start=date(2026, 8, 1))
    with mock.patch.object(services, "record_outcome", side_effect=SystemExit("worker killed")):
        with pytest.raises(SystemExit):
            services.charge_subscription(subscription_id=subscription.pk, billing_period="2026-08-01")
    claimed = Payment.objects.get(subscription=subscription)
    [charge] = sandbox.charges(reference=claimed.idempotency_key)
    event = WebhookEventFactory(
        provider_event_id="evt_reconcile",
        type="charge.succeeded",
        # The payload claims a different amount: only the provider's own record is trusted.
        payload={
            "id": "evt_reconcile",
            "type": "charge.succeeded",
            "data": {"charge": {"id": charge["id"], "amount": "1"}},
        },
    )
    services.process_webhook(event_id=event.pk)
    payment = Payment.objects.get(subscription=subscription)
    subscription.refresh_from_db()
    event.refresh_from_db()
    assert (payment.status, payment.provider_charge_id) == ("succeeded", charge["id"])
    assert subscription.current_period_end == date(2026, 9, 1)
    assert event.status == WebhookEvent.Status.PROCESSED
    assert sandbox.summary()["charges"]["total"] == 1


def test_webhook_finishes_an_order_whose_charge_worker_died(
    client, sandbox, webhook_receiver, django_capture_on_commit_callbacks
):
    # Given an order the provider charged, whose worker died before recording it
    order = OrderFactory(total=Decimal("20.00"))
    with mock.patch.object(services, "record_outcome", side_effect=SystemExit("worker killed")):
        with pytest.raises(SystemExit):
            order_services.charge_order(order_id=order.pk)
    [charge] = sandbox.charges(reference=Payment.objects.get(order=order).idempotency_key)

    # When the provider's event arrives
    with django_capture_on_commit_callbacks(execute=True):
        response = deliver_webhook(client, webhook_receiver, charge_id=charge["id"])

    # Then the payment is finished without a second call, and the order moves on
    assert response.status_code == 200
    payment = Payment.objects.get(order=order)
    assert (payment.status, payment.provider_charge_id, payment.attempts) == ("succeeded", charge["id"], 1)
    order.refresh_from_db()
    assert order.status == Order.Status.FULFILLED
    assert sandbox.summary()["charges"]["total"] == 1


def test_webhook_for_a_declined_charge_whose_worker_died_releases_the_stock(
    client, user, sandbox, webhook_receiver, django_capture_on_commit_callbacks
):
    # Given a confirmed order holding stock, declined by the provider, whose worker died before recording it
    product = ProductFactory(sku="WH-DCL", stock=5)
    order = place_order(owner=user, items=[("WH-DCL", 2)])
    order_services.process_order(order_id=order.pk)
    product.refresh_from_db()
    assert product.stock == 3
    sandbox.set_faults(decline_rate=1.0)
    with mock.patch.object(services, "record_outcome", side_effect=SystemExit("worker killed")):
        with pytest.raises(SystemExit):
            order_services.charge_order(order_id=order.pk)
    [charge] = sandbox.charges(reference=Payment.objects.get(order=order).idempotency_key)
    assert charge["status"] == "declined"

    # When the provider's event arrives
    with django_capture_on_commit_callbacks(execute=True):
        deliver_webhook(client, webhook_receiver, charge_id=charge["id"])

    # Then the payment is declined, the order failed and its stock given back
    assert Payment.objects.get(order=order).status == Payment.Status.DECLINED
    order.refresh_from_db()
    product.refresh_from_db()
    assert order.status == Order.Status.PAYMENT_FAILED
    assert product.stock == 5


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("amount", "currency", "problem"),
    [("3.00", "EUR", "amount 3.00 != 40.00"), ("40.00", "USD", "currency USD != EUR")],
    ids=["amount", "currency"],
)
def test_a_charge_that_is_not_the_payments_puts_it_in_needs_attention(
    client, sandbox, webhook_receiver, amount, currency, problem
):
    # Given an EUR 40.00 payment claimed for an order, and a charge on the provider under its reference
    order = OrderFactory(total=Decimal("40.00"))
    payment = claim_and_stop(order)
    response = sandbox.charge(key="not-ours", reference=payment.idempotency_key, amount=amount, currency=currency)
    charge = response.json()
    assert response.status_code == 201 and charge["status"] == "succeeded"

    # When the provider's event for that charge arrives (the whole chain runs at each commit)
    assert deliver_webhook(client, webhook_receiver, charge_id=charge["id"]).status_code == 200

    # Then the payment is not succeeded: staff are told, and the order is held
    payment.refresh_from_db()
    assert payment.status == Payment.Status.NEEDS_ATTENTION
    assert payment.failure_reason.startswith("mismatch:") and problem in payment.failure_reason
    assert FailedTask.objects.filter(task_name=PAYMENT_NEEDS_ATTENTION, args=[payment.pk]).count() == 1
    order.refresh_from_db()
    assert order.status == Order.Status.ON_HOLD
    assert order.hold_reason == order_services.HOLD_MESSAGES[Order.Status.CONFIRMED]
    assert WebhookEvent.objects.get(payload__data__charge__id=charge["id"]).status == WebhookEvent.Status.PROCESSED
    # The shop made no charge of its own.
    assert sandbox.summary()["charges"]["total"] == 1


@pytest.mark.django_db(transaction=True)
def test_a_charge_reported_after_its_subscription_was_cancelled_needs_attention(
    client, user, sandbox, webhook_receiver
):
    # Given a period charged by the provider whose answer was lost, then the subscription cancelled
    plan = PlanFactory(code="lost", name="Lost answer", price="5.00")
    subscription = SubscriptionFactory(owner=user, plan=plan, current_period_start=date(2026, 9, 1))
    sandbox.set_faults(fail_after_charge_next=1)
    with pytest.raises(services.provider.ProviderUnavailable):
        services.charge_subscription(subscription_id=subscription.pk, billing_period="2026-09-01")
    assert services.cancel_subscription(subscription_id=subscription.pk, owner=user).voided_charge
    payment = Payment.objects.get(subscription=subscription)
    [charge] = sandbox.charges(reference=payment.idempotency_key)

    # When the provider's event for the charge arrives
    assert deliver_webhook(client, webhook_receiver, charge_id=charge["id"]).status_code == 200

    # Then the money taken after the cancellation is a case for staff (a refund), not a success
    payment.refresh_from_db()
    assert payment.status == Payment.Status.NEEDS_ATTENTION
    assert payment.provider_charge_id == charge["id"]
    assert "voided" in payment.failure_reason
    assert FailedTask.objects.filter(task_name=PAYMENT_NEEDS_ATTENTION, args=[payment.pk]).exists()
    subscription.refresh_from_db()
    assert (subscription.status, subscription.current_period_end) == ("cancelled", date(2026, 9, 1))


@pytest.mark.parametrize(
    "payload",
    [
        {"id": "evt_x", "type": "charge.refunded"},
        {"id": "evt_x", "type": "charge.succeeded"},
        {"id": "evt_x", "type": "charge.succeeded", "data": "nope"},
        {"id": "evt_x", "type": "charge.succeeded", "data": {"charge": {"id": 42}}},
    ],
    ids=["unknown-type", "no-data", "data-not-object", "charge-id-not-string"],
)
def test_unprocessable_event_is_an_application_error_and_marked_invalid(payload):
    from core.errors import ApplicationError

    event = WebhookEventFactory(provider_event_id="evt_x", type=payload["type"], payload=payload)
    with pytest.raises(ApplicationError):
        services.process_webhook(event_id=event.pk)
    event.refresh_from_db()
    assert event.status == WebhookEvent.Status.INVALID and event.error


def test_sandbox_signature_is_accepted(client, django_capture_on_commit_callbacks):
    """The shop verifies exactly what the sandbox signs."""
    from sandbox.signing import sign

    body = event_body("evt_from_sandbox")
    response = post(client, body, sign(SECRET, body, int(time.time())))
    assert response.status_code == 200
    assert WebhookEvent.objects.filter(provider_event_id="evt_from_sandbox").exists()
