"""The API's checkout: cards and addresses of my own, and an order placed with them; others' ids are 404s."""

from decimal import Decimal

import pytest

from accounts.models import Address
from orders.models import Order
from payments.models import PaymentMethod
from tests.factories import AddressFactory, PaymentMethodFactory, ProductFactory

pytestmark = pytest.mark.django_db

CARD = {"number": "4242 4242 4242 4242", "exp_month": 12, "exp_year": 2040, "cvc": "123"}
ADDRESS = {"name": "Ada", "line1": "1 Market St", "postal_code": "10115", "city": "Berlin", "country": "de"}


def post(client, path, body, **headers):
    return client.post(path, body, content_type="application/json", **headers)


def test_a_card_is_added_listed_and_removed_through_the_api(api_client, user, sandbox):
    added = post(api_client, "/api/payment-methods/", CARD)

    assert added.status_code == 201, added.content
    body = added.json()
    assert (body["brand"], body["last4"], body["exp_month"], body["exp_year"]) == ("visa", "4242", 12, 2040)
    assert "number" not in body and "4242424242424242" not in added.content.decode()
    assert [card["id"] for card in api_client.get("/api/payment-methods/").json()["items"]] == [body["id"]]
    assert api_client.delete(f"/api/payment-methods/{body['id']}/").status_code == 204
    assert api_client.get("/api/payment-methods/").json()["items"] == []
    assert api_client.delete(f"/api/payment-methods/{body['id']}/").status_code == 404


@pytest.mark.parametrize(
    ("card", "loc"),
    [
        ({**CARD, "number": "4242 4242 4242 4241"}, ["body", "number"]),  # refused by the provider (Luhn)
        ({**CARD, "number": "abcd efgh ijkl"}, ["body", "payload", "number"]),
        ({**CARD, "number": "4242"}, ["body", "payload", "number"]),
        ({**CARD, "number": 4242424242424242}, ["body", "payload", "number"]),
        ({**CARD, "exp_month": 13}, ["body", "payload", "exp_month"]),
        ({**CARD, "exp_month": "12"}, ["body", "payload", "exp_month"]),
        ({**CARD, "exp_year": 2001}, ["body", "exp_year"]),  # expired: the provider says so
        ({**CARD, "cvc": "12"}, ["body", "payload", "cvc"]),
        ({**CARD, "cvc": None}, ["body", "payload", "cvc"]),
        ({**CARD, "pin": "0000"}, ["body", "payload", "pin"]),
        ({"number": CARD["number"]}, ["body", "payload", "exp_month"]),
    ],
    ids=str,
)
def test_hostile_cards_are_422_naming_the_field_and_nothing_is_kept(api_client, sandbox, card, loc):
    response = post(api_client, "/api/payment-methods/", card)

    assert response.status_code == 422, response.content
    assert loc in [error["loc"] for error in response.json()["detail"]]
    assert not PaymentMethod.objects.exists()


def test_a_card_added_while_the_provider_is_down_is_503_with_retry_after_and_nothing_is_kept(api_client, sandbox):
    sandbox.set_faults(fail_next=1)
    response = post(api_client, "/api/payment-methods/", CARD)
    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    assert not PaymentMethod.objects.exists()


@pytest.mark.parametrize(
    ("address", "field"),
    [
        ({**ADDRESS, "country": "DEU"}, "country"),
        ({**ADDRESS, "country": 49}, "country"),
        ({**ADDRESS, "name": ""}, "name"),
        ({**ADDRESS, "name": "x" * 201}, "name"),
        ({**ADDRESS, "city": "Ber\x00lin"}, "city"),
        ({**ADDRESS, "postal_code": "<b>"}, "postal_code"),
        ({**ADDRESS, "line1": ["1 Market St"]}, "line1"),
        ({**ADDRESS, "owner_id": 1}, "owner_id"),
        ({key: value for key, value in ADDRESS.items() if key != "city"}, "city"),
        ({**ADDRESS, "line2": None}, "line2"),
    ],
    ids=str,
)
def test_hostile_addresses_are_422_naming_the_field_and_nothing_is_saved(api_client, address, field):
    response = post(api_client, "/api/addresses/", address)

    assert response.status_code == 422, response.content
    assert field in [error["loc"][-1] for error in response.json()["detail"]]
    assert not Address.objects.exists()


def test_an_order_placed_with_my_card_and_saved_address_pays_the_shipping_fee(api_client, user, settings):
    settings.SHIPPING_FEE = "4.90"
    ProductFactory(sku="API-1", price="10.00", stock=5)
    card, address = PaymentMethodFactory(owner=user), AddressFactory(owner=user, city="Hamburg")

    response = post(
        api_client,
        "/api/orders/",
        {"items": [{"sku": "API-1", "quantity": 1}], "payment_method_id": card.pk, "address_id": address.pk},
    )

    assert response.status_code == 201, response.content
    body = response.json()
    assert (Decimal(body["total"]), Decimal(body["shipping_fee"])) == (Decimal("14.90"), Decimal("4.90"))
    assert body["shipping_address"]["city"] == "Hamburg"
    assert body["payment_method"] == {"brand": "visa", "last4": "4242"}


def test_an_order_with_an_address_given_inline_is_shipped_there(api_client):
    ProductFactory(sku="API-2", stock=5)
    response = post(
        api_client, "/api/orders/", {"items": [{"sku": "API-2", "quantity": 1}], "shipping_address": ADDRESS}
    )
    assert response.status_code == 201, response.content
    assert response.json()["shipping_address"]["country"] == "DE"


@pytest.mark.parametrize("field", ["payment_method_id", "address_id"])
def test_another_owners_card_or_address_is_a_404_naming_the_field_and_nothing_is_created(api_client, other_user, field):
    ProductFactory(sku="API-3", stock=5)
    theirs = (
        PaymentMethodFactory(owner=other_user) if field == "payment_method_id" else AddressFactory(owner=other_user)
    )

    for value in (theirs.pk, 10**12):
        response = post(api_client, "/api/orders/", {"items": [{"sku": "API-3", "quantity": 1}], field: value})
        assert response.status_code == 404, response.content
        assert response.json()["detail"][0]["loc"] == ["body", field]
    assert not Order.objects.exists()


@pytest.mark.parametrize(
    "extra",
    [
        {"address_id": 1, "shipping_address": ADDRESS},
        {"payment_method_id": "1"},
        {"payment_method_id": 0},
        {"address_id": -1},
        {"shipping_address": "Berlin"},
        {"shipping_address": {**ADDRESS, "country": "Deutschland"}},
    ],
    ids=str,
)
def test_hostile_checkout_fields_are_422_and_nothing_is_created(api_client, user, extra):
    ProductFactory(sku="API-4", stock=5)
    AddressFactory(owner=user)
    response = post(api_client, "/api/orders/", {"items": [{"sku": "API-4", "quantity": 1}], **extra})
    assert response.status_code == 422, response.content
    assert not Order.objects.exists()


def test_the_schema_documents_the_checkout_fields(client):
    schema = client.get("/api/openapi.json").json()
    order_in = schema["components"]["schemas"]["OrderIn"]["properties"]
    assert {"payment_method_id", "address_id", "shipping_address"} <= set(order_in)
    assert {"/api/payment-methods/", "/api/addresses/"} <= set(schema["paths"])
