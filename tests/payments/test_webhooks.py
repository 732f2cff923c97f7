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
    [b"not json", b"\xff\xfe\x00", b"[1, 2]", b'{"id": 5, "type": "charge.succeeded"}', b'{"type": "x"}', b'{"id": ""}'],
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
