import hashlib
import hmac
import json
import time
from unittest import mock

import pytest

from payments.models import WebhookEvent

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
    with mock.patch("payments.tasks.process_webhook.delay") as delay:
        with django_capture_on_commit_callbacks(execute=True):
            first = post(client, body, signed(body))
        with django_capture_on_commit_callbacks(execute=True):
            replay = post(client, body, signed(body))
    assert first.status_code == 200 and first.json()["duplicate"] is False
    assert replay.status_code == 200 and replay.json()["duplicate"] is True
    assert WebhookEvent.objects.count() == 1
    delay.assert_called_once_with(WebhookEvent.objects.get().pk)


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
    from datetime import date

    from payments import services
    from payments.models import Payment, Plan, Subscription

    plan = Plan.objects.create(code="wh", name="Webhook plan", price="5.00")
    subscription = Subscription.objects.create(
        owner=user, plan=plan, current_period_start=date(2026, 8, 1), current_period_end=date(2026, 8, 1)
    )
    with mock.patch.object(services, "_record", side_effect=SystemExit("worker killed")):
        with pytest.raises(SystemExit):
            services.charge_subscription(subscription_id=subscription.pk, billing_period="2026-08-01")
    [charge] = sandbox.charges(reference=f"sub-{subscription.pk}-2026-08-01")
    event = WebhookEvent.objects.create(
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
def test_unprocessable_event_is_a_validation_error_and_marked_invalid(payload):
    from django.core.exceptions import ValidationError

    from payments import services

    event = WebhookEvent.objects.create(provider_event_id="evt_x", type=payload["type"], payload=payload)
    with pytest.raises(ValidationError):
        services.process_webhook(event_id=event.pk)
    event.refresh_from_db()
    assert event.status == WebhookEvent.Status.INVALID and event.error


def test_sandbox_signature_is_accepted(client, django_capture_on_commit_callbacks):
    """The shop verifies exactly what the sandbox signs."""
    from sandbox.signing import sign

    body = event_body("evt_from_sandbox")
    with mock.patch("payments.tasks.process_webhook.delay"):
        response = post(client, body, sign(SECRET, body, int(time.time())))
    assert response.status_code == 200
