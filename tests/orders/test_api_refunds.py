"""Refunds through the API: staff refund an order in full or in part, shoppers see them, hostile input is a 4xx.

Refunds run against the sandbox: the outbox items a request commits are run in this process after it
(`django_capture_on_commit_callbacks(execute=True)`), so the provider's refund is the sandbox's own.
"""

import json
from decimal import Decimal

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from core.models import OutboxItem
from orders.models import Order, OrderItem
from payments.models import Refund
from tests.after_sale import bearer, post_refund
from tests.factories import OrderFactory, PaymentFactory, RefundFactory, UserFactory

pytestmark = pytest.mark.django_db

S = Order.Status


def refunds_url(order) -> str:
    return f"/api/orders/{order.pk}/refunds/"


def api_refund_now(captured, client: Client, order, body, key: str | None = None):
    """Post a refund and run what its commit dispatched (the refund task, at the sandbox)."""
    with captured(execute=True):
        response = post_refund(client, order, body, key)
    order.refresh_from_db()
    return response


def error_locs(response) -> set[str]:
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail, detail
    return {str(part) for error in detail for part in error["loc"]}


def assert_nothing_claimed() -> None:
    assert not Refund.objects.exists()
    assert not OutboxItem.objects.filter(task_name="payments.tasks.refund_payment").exists()
    assert not OrderItem.objects.filter(refunded_quantity__gt=0).exists()


# --- Staff refund ----------------------------------------------------------------------------


def test_staff_refund_all_that_is_left_and_the_order_ends_refunded(
    fulfilled,
    staff_api_client,
    sandbox,
    django_capture_on_commit_callbacks,
):
    response = api_refund_now(
        django_capture_on_commit_callbacks, staff_api_client, fulfilled, {"note": "damaged in transit"}
    )

    assert response.status_code == 202, response.content
    body = response.json()
    assert (body["status"], Decimal(body["amount"]), body["currency"]) == ("requested", Decimal("25.00"), "EUR")
    assert (body["reason"], body["lines"]) == ("staff", [])
    refund = Refund.objects.get()
    assert (refund.pk, refund.status, refund.note) == (body["id"], Refund.Status.SUCCEEDED, "damaged in transit")
    assert fulfilled.status == S.REFUNDED
    payment = fulfilled.payments.get()
    assert sandbox.get(f"/v1/charges/{payment.provider_charge_id}").json()["amount_refunded"] == "25.00"
    # The shopper's view of the order follows it.
    shown = bearer(fulfilled.owner).get(f"/api/orders/{fulfilled.pk}/").json()
    assert shown["status"] == "refunded"
    assert [(r["id"], r["status"], Decimal(r["amount"])) for r in shown["refunds"]] == [
        (refund.pk, "succeeded", Decimal("25.00"))
    ]
    assert "note" not in shown["refunds"][0]


def test_staff_refund_an_amount_then_the_rest(fulfilled, staff_api_client, django_capture_on_commit_callbacks):
    first = api_refund_now(django_capture_on_commit_callbacks, staff_api_client, fulfilled, {"amount": "10.00"})
    assert first.status_code == 202, first.content
    assert fulfilled.status == S.PARTIALLY_REFUNDED

    # A number is an amount too; more than is left is refused, naming the field.
    too_much = post_refund(staff_api_client, fulfilled, {"amount": 15.01})
    assert too_much.status_code == 422 and "amount" in error_locs(too_much)
    assert "15.00 EUR left" in too_much.json()["detail"][0]["msg"]

    rest = api_refund_now(django_capture_on_commit_callbacks, staff_api_client, fulfilled, {"amount": 15})
    assert rest.status_code == 202, rest.content
    assert fulfilled.status == S.REFUNDED
    assert sorted(Refund.objects.values_list("amount", "status")) == [
        (Decimal("10.00"), "succeeded"),
        (Decimal("15.00"), "succeeded"),
    ]
    # Nothing is left: the next refund is a conflict, not a new row.
    again = post_refund(staff_api_client, fulfilled, {})
    assert again.status_code == 409 and again.json()["detail"][0]["type"] == "not_refundable"
    assert Refund.objects.count() == 2


def test_staff_refund_lines_and_the_order_counts_them(fulfilled, staff_api_client, django_capture_on_commit_callbacks):
    mug = fulfilled.items.get(sku="MUG")

    response = api_refund_now(
        django_capture_on_commit_callbacks, staff_api_client, fulfilled, {"lines": [{"item_id": mug.pk, "quantity": 1}]}
    )

    assert response.status_code == 202, response.content
    assert response.json()["lines"] == [{"item_id": mug.pk, "quantity": 1}]
    assert Decimal(response.json()["amount"]) == Decimal("10.00")
    assert fulfilled.status == S.PARTIALLY_REFUNDED
    items = {item["sku"]: item for item in bearer(fulfilled.owner).get(f"/api/orders/{fulfilled.pk}/").json()["items"]}
    assert (items["MUG"]["id"], items["MUG"]["refunded_quantity"], items["TEE"]["refunded_quantity"]) == (mug.pk, 1, 0)
    # The second mug only: one more is more than is left of the line.
    refused = post_refund(staff_api_client, fulfilled, {"lines": [{"item_id": mug.pk, "quantity": 2}]})
    assert refused.status_code == 422 and "lines" in error_locs(refused)
    assert Refund.objects.count() == 1


def test_staff_refund_everything_of_a_paid_order_before_hand_over_cancels_it(
    paid,
    staff_api_client,
    django_capture_on_commit_callbacks,
):
    response = api_refund_now(django_capture_on_commit_callbacks, staff_api_client, paid, {})

    assert response.status_code == 202, response.content
    assert paid.status == S.REFUNDED
    assert [e.to_status for e in paid.events.all()][-2:] == [S.CANCELLED, S.REFUNDED]


def test_the_same_idempotency_key_refunds_once(
    fulfilled, staff_api_client, sandbox, django_capture_on_commit_callbacks
):
    first = api_refund_now(
        django_capture_on_commit_callbacks, staff_api_client, fulfilled, {"amount": "5.00"}, key="r-1"
    )
    again = api_refund_now(
        django_capture_on_commit_callbacks, staff_api_client, fulfilled, {"amount": "5.00"}, key="r-1"
    )

    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["status"] == "succeeded"  # the refund as it is now
    assert Refund.objects.count() == 1
    payment = fulfilled.payments.get()
    assert len(sandbox.get("/v1/refunds", charge=payment.provider_charge_id).json()["data"]) == 1
    # Another key is another refund.
    other = api_refund_now(
        django_capture_on_commit_callbacks, staff_api_client, fulfilled, {"amount": "5.00"}, key="r-2"
    )
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


def test_a_retried_full_refund_answers_with_its_refund_after_the_order_is_refunded(
    fulfilled,
    staff_api_client,
    django_capture_on_commit_callbacks,
):
    first = api_refund_now(django_capture_on_commit_callbacks, staff_api_client, fulfilled, {}, key="full-1")
    assert fulfilled.status == S.REFUNDED

    # The client lost the first answer and sends the request again.
    again = post_refund(staff_api_client, fulfilled, {}, key="full-1")

    assert again.status_code == 202, again.content
    assert again.json()["id"] == first.json()["id"]
    assert Refund.objects.count() == 1


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("k" * 65, id="overlong"),
        pytest.param("", id="empty"),
        pytest.param("has space", id="space"),
        pytest.param("ключ", id="non-ascii"),
    ],
)
def test_an_invalid_idempotency_key_is_refused_naming_the_header(fulfilled, staff_api_client, key):
    response = post_refund(staff_api_client, fulfilled, {}, key=key)

    assert response.status_code == 422
    assert "Idempotency-Key" in error_locs(response)
    assert_nothing_claimed()


# --- Who may ---------------------------------------------------------------------------------


def test_a_shopper_cannot_refund_their_own_order(fulfilled):
    response = post_refund(bearer(fulfilled.owner), fulfilled, {})

    assert response.status_code == 403
    assert response.json() == {"detail": "only staff may refund an order"}
    assert_nothing_claimed()


def test_another_shoppers_order_is_404_whether_or_not_it_exists(fulfilled):
    stranger = bearer(UserFactory())

    assert post_refund(stranger, fulfilled, {}).status_code == 404
    missing = Order(pk=fulfilled.pk + 1000)
    assert post_refund(stranger, missing, {}).status_code == 404
    assert post_refund(bearer(UserFactory(is_staff=True)), missing, {}).status_code == 404
    assert stranger.get(refunds_url(fulfilled)).status_code == 404
    assert_nothing_claimed()


def test_refunding_an_order_that_was_not_paid_is_a_conflict(staff_api_client):
    order = OrderFactory(status=S.CONFIRMED)

    response = post_refund(staff_api_client, order, {})

    assert response.status_code == 409
    assert response.json()["detail"][0]["type"] == "not_refundable"
    assert_nothing_claimed()


def test_the_owner_and_staff_list_an_orders_refunds_oldest_first(staff_api_client):
    payment = PaymentFactory(order__status=S.FULFILLED)
    first = RefundFactory(payment=payment, amount="5.00", status="succeeded")
    second = RefundFactory(payment=payment, amount="3.00", status="failed", note="internal: card closed")
    RefundFactory()  # another order's

    for client in (bearer(payment.order.owner), staff_api_client):
        response = client.get(refunds_url(payment.order))
        assert response.status_code == 200
        assert [(r["id"], r["status"], r["amount"]) for r in response.json()] == [
            (first.pk, "succeeded", "5.00"),
            (second.pk, "failed", "3.00"),
        ]
    assert "internal" not in response.content.decode()


# --- Hostile input ---------------------------------------------------------------------------


def line(quantity=1, item_id="MUG"):
    return {"item_id": item_id, "quantity": quantity}


# Each body names the order's mug line as "MUG" and a line of another order as "OTHER": replaced by their ids.
@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({"amount": "-1"}, "amount", id="amount-negative"),
        pytest.param({"amount": -1}, "amount", id="amount-negative-number"),
        pytest.param({"amount": "0"}, "amount", id="amount-zero"),
        pytest.param({"amount": "1.001"}, "amount", id="amount-three-decimals"),
        pytest.param({"amount": 1.001}, "amount", id="amount-three-decimals-number"),
        pytest.param({"amount": "NaN"}, "amount", id="amount-nan"),
        pytest.param({"amount": "Infinity"}, "amount", id="amount-infinity"),
        pytest.param({"amount": "1e400"}, "amount", id="amount-huge-exponent"),
        pytest.param({"amount": "99999999999999999999.00"}, "amount", id="amount-huge"),
        pytest.param({"amount": 10**30}, "amount", id="amount-huge-number"),
        pytest.param({"amount": "25.01"}, "amount", id="amount-over-the-charge"),
        pytest.param({"amount": "ten"}, "amount", id="amount-words"),
        pytest.param({"amount": ""}, "amount", id="amount-empty"),
        pytest.param({"amount": True}, "amount", id="amount-boolean"),
        pytest.param({"amount": None}, "amount", id="amount-null"),
        pytest.param({"amount": ["5"]}, "amount", id="amount-list"),
        pytest.param({"lines": [line("1")]}, "quantity", id="quantity-string"),
        pytest.param({"lines": [line(1.0)]}, "quantity", id="quantity-float"),
        pytest.param({"lines": [line(True)]}, "quantity", id="quantity-boolean"),
        pytest.param({"lines": [line(0)]}, "quantity", id="quantity-zero"),
        pytest.param({"lines": [line(-1)]}, "quantity", id="quantity-negative"),
        pytest.param({"lines": [line(10**30)]}, "quantity", id="quantity-huge"),
        pytest.param({"lines": [line(3)]}, "lines", id="quantity-more-than-bought"),
        pytest.param({"lines": [{"item_id": "MUG"}]}, "quantity", id="quantity-missing"),
        pytest.param({"lines": [line(item_id="MUG-as-string")]}, "item_id", id="item-id-string"),
        pytest.param({"lines": [line(item_id=10**30)]}, "item_id", id="item-id-huge"),
        pytest.param({"lines": [line(item_id=999_999_999)]}, "lines", id="item-id-unknown"),
        pytest.param({"lines": [line(item_id="OTHER")]}, "lines", id="item-id-of-another-order"),
        pytest.param({"lines": [line(), line()]}, "lines", id="item-id-duplicated"),
        pytest.param({"lines": [line(item_id=n) for n in range(1, 1001)]}, "lines", id="a-thousand-lines"),
        pytest.param({"lines": []}, "lines", id="lines-empty"),
        pytest.param({"lines": None}, "lines", id="lines-null"),
        pytest.param({"lines": {"MUG": 1}}, "lines", id="lines-as-a-dict"),
        pytest.param({"lines": ["MUG"]}, "lines", id="line-bare-id"),
        pytest.param({"amount": "5", "lines": [line()]}, "body", id="amount-and-lines"),
        pytest.param({"note": "x" * 10_240}, "note", id="note-10kb"),
        pytest.param({"note": "a\x00b"}, "note", id="note-nul"),
        pytest.param({"note": "a\ud800b"}, "note", id="note-lone-surrogate"),
        pytest.param({"note": 5}, "note", id="note-number"),
        pytest.param({"reason": "cancelled_by_shopper"}, "reason", id="unknown-field"),
        pytest.param([], "body", id="body-list"),
        pytest.param("5.00", "body", id="body-string"),
    ],
)
def test_hostile_refund_bodies_are_422_naming_the_field_and_claim_nothing(fulfilled, staff_api_client, body, field):
    mug = fulfilled.items.get(sku="MUG").pk
    ids = {"MUG": mug, "MUG-as-string": str(mug), "OTHER": OrderFactory(status=S.FULFILLED).items.get().pk}

    def named(value):
        if isinstance(value, dict):
            return {str(ids.get(key, key)): named(item) for key, item in value.items()}
        if isinstance(value, list):
            return [named(item) for item in value]
        return ids.get(value, value) if isinstance(value, str) else value

    raw = json.dumps(named(body))

    response = post_refund(staff_api_client, fulfilled, raw)

    assert response.status_code == 422, (response.status_code, response.content[:300])
    assert response["Content-Type"].startswith("application/json")
    assert field in error_locs(response), response.json()
    assert_nothing_claimed()


@pytest.mark.parametrize(
    ("raw", "content_type", "status"),
    [
        pytest.param(b"amount=5", "application/x-www-form-urlencoded", 415, id="form-body"),
        pytest.param(b"{not json", "application/json", 400, id="malformed-json"),
        pytest.param(b'{"amount": "5"', "application/json", 400, id="truncated-json"),
        pytest.param(b'{"amount": "\xff"}', "application/json", 400, id="not-utf8"),
        pytest.param(b"", "application/json", 400, id="empty"),
        pytest.param(b"5.00", "text/plain", 415, id="text"),
    ],
)
def test_a_body_that_is_not_json_is_a_4xx_and_claims_nothing(fulfilled, staff_api_client, raw, content_type, status):
    response = staff_api_client.post(refunds_url(fulfilled), raw, content_type=content_type)

    assert response.status_code in (status, 422), (response.status_code, response.content[:300])
    assert 400 <= response.status_code < 500
    assert "detail" in response.json()
    assert_nothing_claimed()


# --- The shopper cancels a paid order through the API ------------------------------------------


def test_cancelling_a_paid_order_through_the_api_refunds_it_in_full(paid, django_capture_on_commit_callbacks):
    client = bearer(paid.owner)

    # The refund is asked of the provider after the answer (its task runs when the block ends).
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/api/orders/{paid.pk}/cancel/")

    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["status"], body["can_cancel"]) == ("cancelled", False)
    assert [(r["status"], r["reason"], Decimal(r["amount"])) for r in body["refunds"]] == [
        ("requested", "cancelled_by_shopper", Decimal("25.00"))
    ]
    shown = client.get(f"/api/orders/{paid.pk}/").json()
    assert shown["status"] == "refunded"
    assert [r["status"] for r in shown["refunds"]] == ["succeeded"]


# --- Reading: one query per relation, not per refund --------------------------------------------


def test_an_orders_refunds_add_no_query_per_refund(client):
    payment = PaymentFactory(order__status=S.FULFILLED, order__total=Decimal("20.00"))
    order = payment.order
    RefundFactory(payment=payment, amount="1.00")
    api = bearer(order.owner)

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            response = api.get(f"/api/orders/{order.pk}/")
        assert response.status_code == 200
        return len(captured)

    with_one = queries()
    RefundFactory(payment=payment, amount="2.00")
    RefundFactory(payment=payment, amount="3.00")

    assert queries() == with_one
    assert len(api.get(f"/api/orders/{order.pk}/").json()["refunds"]) == 3


def test_the_schema_documents_the_refund_operations(client):
    schema = client.get("/api/openapi.json").json()

    post = schema["paths"]["/api/orders/{order_id}/refunds/"]["post"]
    assert {"202", "403", "404", "409", "422"} <= set(post["responses"])
    assert "staff" in post["summary"].lower()
    assert any(parameter["name"] == "Idempotency-Key" for parameter in post["parameters"])
    assert set(schema["components"]["schemas"]["RefundIn"]["properties"]) == {"amount", "lines", "note"}
    assert "refunds" in schema["components"]["schemas"]["OrderOut"]["properties"]
    assert "refunded_quantity" in schema["components"]["schemas"]["ItemOut"]["properties"]
    cancel = schema["paths"]["/api/orders/{order_id}/cancel/"]["post"]
    assert "refunded" in cancel["summary"] and "pending or confirmed" not in cancel["summary"]
