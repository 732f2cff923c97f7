"""place_order at checkout: a shipping address (checked, copied) adds the flat shipping fee; a card is the owner's."""

from decimal import Decimal

import pytest

from accounts.services import InvalidAddress
from orders.models import Order
from orders.services import place_order
from tests.factories import AddressFactory, PaymentMethodFactory, ProductFactory, UserFactory

pytestmark = pytest.mark.django_db

ADDRESS = {
    "name": "Ada",
    "line1": "1 Market St",
    "line2": "",
    "postal_code": "10115",
    "city": "Berlin",
    "country": "de",
}


def test_an_order_shipped_to_an_address_pays_the_flat_fee_and_keeps_a_copy_of_the_address(settings):
    settings.SHIPPING_FEE = "4.90"
    user = UserFactory()
    ProductFactory(sku="FEE-1", price="10.00", stock=5)
    saved = AddressFactory(owner=user, city="Hamburg")

    order = place_order(owner=user, items=[("FEE-1", 2)], shipping_address=saved.snapshot())
    saved.city = "Munich"
    saved.save()

    order.refresh_from_db()
    assert (order.total, order.shipping_fee) == (Decimal("24.90"), Decimal("4.90"))
    assert order.shipping_address["city"] == "Hamburg"


def test_an_order_without_an_address_pays_no_shipping():
    user = UserFactory()
    ProductFactory(sku="FEE-2", price="10.00", stock=5)
    order = place_order(owner=user, items=[("FEE-2", 1)])
    assert (order.total, order.shipping_fee, order.shipping_address) == (Decimal("10.00"), 0, {})


@pytest.mark.parametrize(
    ("address", "field"),
    [
        ({**ADDRESS, "country": "Germany"}, "country"),
        ({**ADDRESS, "city": ""}, "city"),
        ({**ADDRESS, "name": 5}, "name"),
        ({**ADDRESS, "line1": "x" * 500}, "line1"),
        ({**ADDRESS, "admin": True}, "admin"),
    ],
)
def test_a_bad_address_is_refused_with_its_field_and_nothing_is_created(address, field):
    user = UserFactory()
    ProductFactory(sku="FEE-3", stock=5)
    with pytest.raises(InvalidAddress) as refused:
        place_order(owner=user, items=[("FEE-3", 1)], shipping_address=address, payment_method_id=None)
    assert refused.value.field == field
    assert not Order.objects.exists()


def test_the_address_is_cleaned_before_it_is_copied():
    user = UserFactory()
    ProductFactory(sku="FEE-4", stock=5)
    card = PaymentMethodFactory(owner=user)
    order = place_order(
        owner=user, items=[("FEE-4", 1)], shipping_address={**ADDRESS, "city": "  Berlin  "}, payment_method_id=card.pk
    )
    assert order.shipping_address == {**ADDRESS, "country": "DE"}
    assert order.payment_method == card
