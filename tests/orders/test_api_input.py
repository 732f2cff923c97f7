"""Bad input at POST /api/orders/: a 4xx whose JSON names the field, nothing created, never a 500."""

import json

import pytest
from django.conf import settings
from django.test import Client

from orders.models import Order, OrderItem
from orders.services import MAX_ITEMS
from tests.factories import ProductFactory

pytestmark = pytest.mark.django_db

URL = "/api/orders/"


def error_locs(response) -> set:
    """Every path element named by the error body (`detail[*].loc`)."""
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail, detail
    return {str(part) for error in detail for part in error["loc"]}


def assert_refused(response, status: int | tuple, field: str) -> None:
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.content[:500])
    assert response["Content-Type"].startswith("application/json")
    assert field in error_locs(response), response.json()
    assert Order.objects.count() == 0
    assert OrderItem.objects.count() == 0


def item(sku="MUG-001", quantity=1):
    return {"sku": sku, "quantity": quantity}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        pytest.param({"items": [item(sku="NOPE")]}, "sku", id="unknown-sku"),
        pytest.param({"items": [item(), item(sku="NOPE")]}, "sku", id="one-of-two-skus-unknown"),
        pytest.param({"items": [item(sku="mug-001")]}, "sku", id="sku-other-case"),
        pytest.param({"items": [item(quantity=0)]}, "quantity", id="quantity-zero"),
        pytest.param({"items": [item(quantity=-1)]}, "quantity", id="quantity-negative"),
        pytest.param({"items": [item(quantity=1.5)]}, "quantity", id="quantity-fractional"),
        pytest.param({"items": [item(quantity=2.0)]}, "quantity", id="quantity-float-whole"),
        pytest.param({"items": [item(quantity="2")]}, "quantity", id="quantity-numeric-string"),
        pytest.param({"items": [item(quantity="abc")]}, "quantity", id="quantity-string"),
        pytest.param({"items": [item(quantity=True)]}, "quantity", id="quantity-boolean"),
        pytest.param({"items": [item(quantity=None)]}, "quantity", id="quantity-null"),
        pytest.param({"items": [item(quantity=[1])]}, "quantity", id="quantity-list"),
        pytest.param({"items": [item(quantity=1001)]}, "quantity", id="quantity-over-max"),
        pytest.param({"items": [item(quantity=10**30)]}, "quantity", id="quantity-absurd"),
        pytest.param({"items": [item(quantity=-(10**30))]}, "quantity", id="quantity-absurd-negative"),
        pytest.param({"items": [{"sku": "MUG-001"}]}, "quantity", id="quantity-missing"),
        pytest.param({"items": [{"quantity": 1}]}, "sku", id="sku-missing"),
        pytest.param({"items": [item(sku="")]}, "sku", id="sku-empty"),
        pytest.param({"items": [item(sku="   ")]}, "sku", id="sku-blank"),
        pytest.param({"items": [item(sku=123)]}, "sku", id="sku-number"),
        pytest.param({"items": [item(sku=None)]}, "sku", id="sku-null"),
        pytest.param({"items": [item(sku="X" * 65)]}, "sku", id="sku-overlong"),
        pytest.param({"items": [item(sku="MUG-001\x00")]}, "sku", id="sku-nul-character"),
        pytest.param({"items": [item(sku="MUG\ud800")]}, "sku", id="sku-lone-surrogate"),
        pytest.param({"items": []}, "items", id="items-empty"),
        pytest.param({}, "items", id="items-missing"),
        pytest.param({"items": None}, "items", id="items-null"),
        pytest.param({"items": [item(), item(quantity=2)]}, "items", id="items-duplicated-sku"),
        pytest.param({"items": [item(), item(sku=" MUG-001 ")]}, "items", id="items-duplicated-after-trim"),
        pytest.param({"items": [item(sku=f"S-{n}") for n in range(MAX_ITEMS + 1)]}, "items", id="items-too-many"),
        pytest.param({"items": "MUG-001"}, "items", id="items-string"),
        pytest.param({"items": item()}, "items", id="items-object"),
        pytest.param({"items": ["MUG-001"]}, "items", id="item-string"),
        pytest.param({"items": [1]}, "items", id="item-number"),
        pytest.param({"items": [None]}, "items", id="item-null"),
        pytest.param({"items": [["MUG-001", 1]]}, "items", id="item-list"),
        pytest.param({"items": [{**item(), "price": "0.01"}]}, "price", id="item-unknown-field"),
        pytest.param({"items": [item()], "owner": 1}, "owner", id="order-unknown-field"),
    ],
)
def test_invalid_order_payload_is_refused_naming_the_field(api_client, product, payload, field):
    response = api_client.post(URL, payload, content_type="application/json")

    assert_refused(response, (400, 422), field)
    product.refresh_from_db()
    assert product.stock == 10


@pytest.mark.parametrize("body", [[item()], "items", 42, None, True], ids=["list", "string", "number", "null", "bool"])
def test_json_body_that_is_not_an_object_is_refused(api_client, product, body):
    response = api_client.post(URL, json.dumps(body), content_type="application/json")

    assert_refused(response, (400, 422), "body")


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"items": [{"sku": "MUG-001", "quantity": 1}', id="truncated"),
        pytest.param(b"{'items': []}", id="single-quotes"),
        pytest.param(b'{"items": [{"sku": "MUG-001", "quantity": 1},]}', id="trailing-comma"),
        pytest.param(b"items=MUG-001", id="not-json"),
        pytest.param(b"   ", id="whitespace-only"),
        pytest.param(b'{"items": [{"sku": "MUG-001", "quantity": 1' + b"0" * 5000 + b"}]}", id="integer-too-long"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested-too-deep"),
    ],
)
def test_malformed_json_is_refused_as_bad_body(api_client, product, raw):
    response = api_client.post(URL, raw, content_type="application/json")

    assert_refused(response, 400, "body")
    assert "JSON" in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"items": [{"sku": "MUG-\xff", "quantity": 1}]}', id="invalid-byte"),
        pytest.param(b'{"items": [{"sku": "MUG-\xc3", "quantity": 1}]}', id="truncated-sequence"),
        pytest.param(b'{"items": [{"sku": "MUG-\xed\xa0\x80", "quantity": 1}]}', id="encoded-surrogate"),
        pytest.param('{"items": [{"sku": "MUG-001", "quantity": 1}]}'.encode("utf-16"), id="utf-16"),
    ],
)
def test_body_that_is_not_utf8_is_refused(api_client, product, raw):
    response = api_client.post(URL, raw, content_type="application/json")

    assert_refused(response, 400, "body")
    assert "UTF-8" in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/xml", "application/jsonp", ""],
)
def test_body_with_wrong_content_type_is_refused_with_415(api_client, product, content_type):
    body = json.dumps({"items": [item()]})

    response = api_client.post(URL, body, content_type=content_type)

    assert_refused(response, 415, "Content-Type")


def test_multipart_form_body_is_refused_with_415(api_client, product):
    response = api_client.post(URL, {"items": "MUG-001"})  # the test client's default: multipart/form-data

    assert_refused(response, 415, "Content-Type")


def test_json_content_type_with_charset_is_accepted(api_client, product):
    body = json.dumps({"items": [item()]})

    response = api_client.post(URL, body, content_type="application/json; charset=utf-8")

    assert response.status_code == 201, response.content
    assert Order.objects.count() == 1


def test_body_over_the_upload_limit_is_refused_with_413(api_client, product):
    padding = "x" * settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    body = json.dumps({"items": [item()], "padding": padding})
    assert len(body) > 256 * 1024

    response = api_client.post(URL, body, content_type="application/json")

    assert_refused(response, 413, "body")


def test_body_just_under_the_upload_limit_is_parsed(api_client, product):
    body = json.dumps({"items": [item(sku="S" * 64)]})
    body = body[:-1] + " " * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE - len(body)) + "}"
    assert len(body) == settings.DATA_UPLOAD_MAX_MEMORY_SIZE

    response = api_client.post(URL, body, content_type="application/json")

    # Reached validation: the sku is the complaint, not the size.
    assert_refused(response, 422, "sku")


def test_empty_body_is_refused_naming_the_body(api_client, product):
    response = api_client.post(URL, b"", content_type="application/json")

    assert_refused(response, (400, 422), "body")


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("k" * 65, id="overlong"),
        pytest.param("k" * 10_000, id="absurdly-long"),
        pytest.param("", id="empty"),
        pytest.param("has space", id="space"),
        pytest.param("tab\tinside", id="control-character"),
        pytest.param("nul\x00inside", id="nul"),
        pytest.param("ключ", id="non-ascii"),
    ],
)
def test_invalid_idempotency_key_is_refused_naming_the_header(api_client, product, key):
    response = api_client.post(URL, {"items": [item()]}, content_type="application/json", HTTP_IDEMPOTENCY_KEY=key)

    assert_refused(response, 422, "Idempotency-Key")


def test_idempotency_key_of_max_length_is_accepted(api_client, product):
    response = api_client.post(URL, {"items": [item()]}, content_type="application/json", HTTP_IDEMPOTENCY_KEY="k" * 64)

    assert response.status_code == 201, response.content
    assert Order.objects.get().idempotency_key == "k" * 64


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="no-header"),
        pytest.param("Bearer not-a-real-token", id="unknown-token"),
        pytest.param("Bearer ", id="empty-token"),
        pytest.param("Bearer " + "t" * 5000, id="overlong-token"),
        pytest.param("Basic ZGVtbzpkZW1v", id="other-scheme"),
        pytest.param("not-a-scheme", id="garbage"),
    ],
)
def test_order_without_valid_credentials_is_refused_with_401(product, authorization):
    # A real API client: CSRF checks on, no session.
    client = Client(enforce_csrf_checks=True)
    headers = {"HTTP_AUTHORIZATION": authorization} if authorization is not None else {}

    response = client.post(URL, {"items": [item()]}, content_type="application/json", **headers)

    assert_refused(response, 401, "Authorization")
    assert response["WWW-Authenticate"] == "Bearer"


def test_inactive_users_token_is_refused_with_401(api_client, user, product):
    user.is_active = False
    user.save(update_fields=["is_active"])

    response = api_client.post(URL, {"items": [item()]}, content_type="application/json")

    assert_refused(response, 401, "Authorization")


def test_bad_input_from_one_item_creates_nothing_for_the_valid_ones(api_client, product):
    other = ProductFactory(sku="TEE-001", stock=5)

    response = api_client.post(
        URL, {"items": [item(), item(sku="TEE-001", quantity=0)]}, content_type="application/json"
    )

    assert_refused(response, 422, "quantity")
    other.refresh_from_db()
    assert other.stock == 5
