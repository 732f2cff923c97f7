"""Checkout through the pages: address and card, review, place; one order per checkout, never a 5xx.

Placing goes through orders.services.place_order, as the API does; the provider is the sandbox
(in-process behind the stub in this tier).
"""

import html
import re
from decimal import Decimal

import pytest
from django.test import Client

from accounts.models import Address
from orders.cart import SESSION_KEY
from orders.models import Order
from payments.models import PaymentMethod
from tests.factories import AddressFactory, PaymentMethodFactory, ProductFactory, UserFactory

pytestmark = pytest.mark.django_db

CHECKOUT, PLACE, CART = "/orders/checkout/", "/orders/checkout/place/", "/orders/cart/"
SUCCEEDS, DECLINES = "4242 4242 4242 4242", "4000 0000 0000 0002"
NEW_ADDRESS = {
    "name": "Ada Lovelace",
    "line1": "1 Market Street",
    "line2": "",
    "postal_code": "10115",
    "city": "Berlin",
    "country": "de",
}
NEW_CARD = {"card_number": SUCCEEDS, "exp_month": "12", "exp_year": "2040", "cvc": "123"}


def text(response) -> str:
    return html.unescape(response.content.decode())


@pytest.fixture(autouse=True)
def fee(settings):
    settings.SHIPPING_FEE = "4.90"


@pytest.fixture
def mug(db):
    return ProductFactory(sku="MUG-001", name="Enamel mug", price=Decimal("12.50"), stock=50)


@pytest.fixture
def shopper(client, user, mug) -> Client:
    """Signed in, with two mugs in the cart."""
    client.force_login(user)
    assert client.post("/orders/cart/add/", {"sku": "MUG-001", "quantity": "2"}).status_code == 302
    return client


@pytest.fixture
def address(user):
    return AddressFactory(owner=user, name="Ada", city="Hamburg")


@pytest.fixture
def card(user):
    return PaymentMethodFactory(owner=user, brand="visa", last4="4242")


def checkout_form(client: Client, **fields) -> dict:
    """The checkout form as the page sends it, with `fields` changed."""
    page = client.get(CHECKOUT)
    assert page.status_code == 200
    form = page.context["form"]
    data = {"idempotency_key": form["idempotency_key"].value(), "address": "new", "card": "new"}
    data.update(fields)
    return data


def review(client: Client, **fields):
    response = client.post(CHECKOUT, checkout_form(client, **fields))
    assert response.status_code == 200, text(response)[:2000]
    assert "orders/checkout_review.html" in [t.name for t in response.templates]
    return response


def place_fields(review_response) -> dict:
    """The hidden fields of the review's Place order form, as the browser posts them."""
    form = review_response.context["form"]
    return {name: value for name in form.fields if (value := form[name].value()) not in (None, "")}


def nothing_created(*, addresses: int = 0, cards: int = 0) -> None:
    assert Order.objects.count() == 0
    assert Address.objects.count() == addresses
    assert PaymentMethod.objects.count() == cards


def test_a_saved_address_and_a_saved_card_place_one_order_with_the_shipping_fee(shopper, user, address, card):
    # Given the review of a saved address and card
    page = review(shopper, address=str(address.pk), card=str(card.pk))
    shown = text(page)
    assert "Visa ending in 4242 (12/2040)" in shown
    assert "Ada" in shown and "Hamburg" in shown
    assert 'id="cart-shipping">€4.90<' in shown and 'id="cart-total">€29.90<' in shown

    # When it is placed
    placed = shopper.post(PLACE, place_fields(page))

    # Then one order, the lines, the fee, the address copied and the card, and the cart is empty
    order = Order.objects.get()
    assert placed.status_code == 302 and placed["Location"] == f"/orders/{order.pk}/"
    assert (order.owner, order.total, order.shipping_fee) == (user, Decimal("29.90"), Decimal("4.90"))
    assert list(order.items.values_list("sku", "quantity")) == [("MUG-001", 2)]
    assert order.shipping_address == address.snapshot()
    assert order.payment_method == card
    assert shopper.session.get(SESSION_KEY) is None
    assert "Your cart is empty." in text(shopper.get(CART))


def test_the_same_checkout_posted_twice_places_one_order(shopper, address, card):
    fields = place_fields(review(shopper, address=str(address.pk), card=str(card.pk)))

    first = shopper.post(PLACE, fields)
    second = shopper.post(PLACE, fields)

    order = Order.objects.get()
    assert first["Location"] == second["Location"] == f"/orders/{order.pk}/"


def test_a_new_address_saved_and_a_new_card_tokenised_at_the_provider(shopper, user, sandbox):
    page = review(shopper, **NEW_ADDRESS, save_address="on", **NEW_CARD)

    saved = Address.objects.get(owner=user)
    new_card = PaymentMethod.objects.get(owner=user)
    assert (saved.city, saved.country) == ("Berlin", "DE")
    assert (new_card.brand, new_card.last4) == ("visa", "4242")
    assert "4242424242424242" not in " ".join(map(str, PaymentMethod.objects.values().get().values()))
    assert "Visa ending in 4242" in text(page)

    shopper.post(PLACE, place_fields(page))

    order = Order.objects.get()
    assert order.payment_method == new_card
    assert order.shipping_address == saved.snapshot()


def test_a_new_address_not_saved_still_ships_the_order(shopper, user, card):
    page = review(shopper, **NEW_ADDRESS, card=str(card.pk))

    shopper.post(PLACE, place_fields(page))

    assert not Address.objects.exists()
    assert Order.objects.get().shipping_address == {**NEW_ADDRESS, "country": "DE"}


def test_the_card_number_is_never_sent_back_in_a_page(shopper, address):
    response = shopper.post(
        CHECKOUT, checkout_form(shopper, address=str(address.pk), **{**NEW_CARD, "exp_month": "13"})
    )

    assert response.status_code == 400
    assert "4242 4242 4242 4242" not in text(response)
    nothing_created(addresses=1)


def test_a_card_the_provider_refuses_shows_the_fields_error_and_nothing_is_created(shopper, address, sandbox):
    response = shopper.post(
        CHECKOUT, checkout_form(shopper, address=str(address.pk), **{**NEW_CARD, "card_number": "4242424242424241"})
    )

    assert response.status_code == 400
    assert response.context["form"].errors["card_number"]
    assert 'role="alert"' in text(response)
    nothing_created(addresses=1)


def test_a_declined_charge_shows_on_the_order_page_and_the_cart_comes_back(
    shopper, address, sandbox, django_capture_on_commit_callbacks
):
    page = review(shopper, address=str(address.pk), **{**NEW_CARD, "card_number": DECLINES})

    with django_capture_on_commit_callbacks(execute=True):
        placed = shopper.post(PLACE, place_fields(page))

    order = Order.objects.get()
    assert order.status == Order.Status.PAYMENT_FAILED
    assert shopper.session.get(SESSION_KEY) is None
    order_page = " ".join(re.sub(r"<[^>]+>", "", text(shopper.get(placed["Location"]))).split())
    assert "Your payment did not go through (card_declined)" in order_page
    assert "Back to your cart" in order_page
    cart = shopper.get(CART)
    assert [(line.sku, line.quantity) for line in cart.context["cart"].lines] == [("MUG-001", 2)]
    assert f"Order #{order.pk} was not paid, so its items are back in your cart." in text(cart)
    # Only once: opening the cart again adds nothing.
    assert shopper.session[SESSION_KEY] == {"MUG-001": 2}
    shopper.get(CART)
    assert shopper.session[SESSION_KEY] == {"MUG-001": 2}


def test_a_paid_order_lets_its_cart_go(shopper, address, sandbox, django_capture_on_commit_callbacks):
    page = review(shopper, address=str(address.pk), **NEW_CARD)
    with django_capture_on_commit_callbacks(execute=True):
        shopper.post(PLACE, place_fields(page))
    assert Order.objects.get().status in (Order.Status.PAID, Order.Status.FULFILLED)

    assert shopper.get(CART).context["cart"].lines == []
    assert "cart_held_for_order" not in shopper.session


# --- Someone else's rows: 404, nothing created ----------------------------------------------------


@pytest.mark.parametrize("which", ["address", "card"])
def test_another_users_address_or_card_at_checkout_is_a_404_and_nothing_is_created(shopper, address, card, which):
    other = UserFactory()
    theirs = {"address": AddressFactory(owner=other), "card": PaymentMethodFactory(owner=other)}[which]
    fields = {"address": str(address.pk), "card": str(card.pk), which: str(theirs.pk)}

    response = shopper.post(CHECKOUT, checkout_form(shopper, **fields))

    assert response.status_code == 404
    nothing_created(addresses=2, cards=2)


@pytest.mark.parametrize("which", ["address_id", "payment_method_id"])
def test_another_users_address_or_card_at_placing_is_a_404_and_nothing_is_created(shopper, address, card, which):
    other = UserFactory()
    theirs = {"address_id": AddressFactory(owner=other), "payment_method_id": PaymentMethodFactory(owner=other)}[which]
    fields = place_fields(review(shopper, address=str(address.pk), card=str(card.pk)))

    response = shopper.post(PLACE, {**fields, which: str(theirs.pk)})

    assert response.status_code == 404
    nothing_created(addresses=2, cards=2)


def test_a_removed_card_is_no_longer_the_owners_to_choose(shopper, address, card):
    from payments.services import remove_payment_method

    remove_payment_method(owner=card.owner, payment_method_id=card.pk)

    assert shopper.post(CHECKOUT, checkout_form(shopper, address=str(address.pk), card=str(card.pk))).status_code == 404


# --- Hostile input: a form error, never a 5xx, nothing created -------------------------------------

HOSTILE_CHECKOUT = [
    ({"address": ""}, "address", "Choose an address."),
    ({"address": "abc"}, "address", "Choose an address from the list."),
    ({"address": "-1"}, "address", "Choose an address from the list."),
    ({"address": "0"}, "address", "Choose an address from the list."),
    ({"address": "9999999999"}, "address", "Choose an address from the list."),
    ({"address": "1" * 40}, "address", "Choose an address from the list."),
    ({"card": ""}, "card", "Choose a card."),
    ({"card": "1 OR 1=1"}, "card", "Choose a card from the list."),
    ({"address": "new", **NEW_ADDRESS, "name": "x" * 101}, "name", "at most 100 characters"),
    ({"address": "new", **NEW_ADDRESS, "city": ""}, "city", "city is required"),
    ({"address": "new", **NEW_ADDRESS, "country": "Germany"}, "country", "at most 2 characters"),
    ({"address": "new", **NEW_ADDRESS, "country": "1!"}, "country", "two-letter country code"),
    ({"address": "new", **NEW_ADDRESS, "postal_code": "<script>"}, "postal_code", "letters, digits, spaces"),
    ({"card": "new", **NEW_CARD, "card_number": ""}, "card_number", "Enter the card's card number."),
    ({"card": "new", **NEW_CARD, "card_number": "4" * 24}, "card_number", "at most 23 characters"),
    ({"card": "new", **NEW_CARD, "exp_month": "13"}, "exp_month", "less than or equal to 12"),
    ({"card": "new", **NEW_CARD, "exp_month": "abc"}, "exp_month", "Enter a whole number."),
    ({"card": "new", **NEW_CARD, "exp_year": "1e3"}, "exp_year", "Enter a whole number."),
    ({"card": "new", **NEW_CARD, "exp_year": "9" * 50}, "exp_year", "less than or equal to 2100"),
    ({"card": "new", **NEW_CARD, "cvc": "12345"}, "cvc", "at most 4 characters"),
    ({"idempotency_key": "x" * 65}, "idempotency_key", "this checkout's key is not valid"),
    ({"idempotency_key": ""}, "idempotency_key", "this checkout's key is missing"),
]


@pytest.mark.parametrize(("fields", "field", "message"), HOSTILE_CHECKOUT, ids=[f[1] for f in HOSTILE_CHECKOUT])
def test_hostile_checkout_fields_are_form_errors_and_nothing_is_created(
    shopper, address, card, fields, field, message, sandbox
):
    data = checkout_form(shopper, **{"address": str(address.pk), "card": str(card.pk), **fields})

    response = shopper.post(CHECKOUT, data)

    assert response.status_code == 400, response.status_code
    form = response.context["form"]
    assert field in form.errors, form.errors
    assert message in " ".join(form.errors[field]), form.errors[field]
    assert 'role="alert"' in text(response)
    nothing_created(addresses=1, cards=1)
    if field == "idempotency_key":
        assert re.fullmatch(r"[0-9a-f]{32}", form.data["idempotency_key"])  # a fresh key to submit again


@pytest.mark.parametrize(("field", "value"), [("address", "987654321"), ("card", "987654321")])
def test_an_id_that_names_no_row_is_a_404_like_someone_elses(shopper, address, card, field, value):
    data = checkout_form(shopper, **{"address": str(address.pk), "card": str(card.pk), field: value})

    assert shopper.post(CHECKOUT, data).status_code == 404
    nothing_created(addresses=1, cards=1)


HOSTILE_PLACE = [
    {"idempotency_key": ""},
    {"idempotency_key": "k" * 65},
    {"idempotency_key": "../../etc"},
    {"payment_method_id": "abc"},
    {"payment_method_id": "-1"},
    {"payment_method_id": "99999999999999999999"},
    {"address_id": "1.5"},
    {"address_id": "2147483648"},
    {"cart_digest": "0" * 32},
    {"cart_digest": "not hex"},
]


@pytest.mark.parametrize("changed", HOSTILE_PLACE, ids=str)
def test_a_hostile_place_form_goes_back_to_checkout_and_nothing_is_created(shopper, address, card, changed):
    fields = place_fields(review(shopper, address=str(address.pk), card=str(card.pk)))

    response = shopper.post(PLACE, {**fields, **changed}, follow=True)

    assert response.redirect_chain[0] == (CHECKOUT, 302)
    assert response.status_code == 200
    nothing_created(addresses=1, cards=1)


@pytest.mark.parametrize(
    "changed", [{"city": ""}, {"country": "XXX"}, {"name": "x" * 101}, {"postal_code": "%%"}], ids=str
)
def test_a_tampered_new_address_at_placing_goes_back_to_checkout_and_nothing_is_created(shopper, card, changed):
    fields = place_fields(review(shopper, **NEW_ADDRESS, card=str(card.pk)))

    response = shopper.post(PLACE, {**fields, **changed}, follow=True)

    assert response.redirect_chain[0] == (CHECKOUT, 302)
    nothing_created(cards=1)


def test_a_cart_changed_after_the_review_is_not_placed(shopper, address, card):
    fields = place_fields(review(shopper, address=str(address.pk), card=str(card.pk)))
    shopper.post("/orders/cart/set/", {"sku": "MUG-001", "quantity": "5"})

    response = shopper.post(PLACE, fields, follow=True)

    assert "Your cart changed after you reviewed it" in text(response)
    nothing_created(addresses=1, cards=1)


def test_an_empty_cart_cannot_be_checked_out(client, user, address, card):
    client.force_login(user)

    assert client.get(CHECKOUT)["Location"] == CART
    assert client.post(CHECKOUT, {"address": str(address.pk), "card": str(card.pk)})["Location"] == CART


def test_a_cart_with_a_line_short_of_stock_waits_at_the_cart(shopper, mug, address, card):
    mug.stock = 1
    mug.save()

    response = shopper.get(CHECKOUT, follow=True)

    assert response.redirect_chain == [(CART, 302)]
    assert "fix them to check out" in text(response)


def test_a_visitor_signs_in_to_check_out_and_keeps_the_cart(client, mug):
    client.post("/orders/cart/add/", {"sku": "MUG-001", "quantity": "1"})

    response = client.get(CHECKOUT)

    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/?next=/orders/checkout/")
    assert client.post(PLACE, {}).status_code == 302
    assert not Order.objects.exists()


@pytest.mark.parametrize(("debug", "shown"), [(True, True), (False, False)])
def test_the_test_cards_are_a_hint_only_while_debugging(shopper, settings, debug, shown):
    settings.DEBUG = debug
    page = text(shopper.get(CHECKOUT))
    assert ("4000 0000 0000 0002" in page) is shown
    assert ("fails the first attempt and succeeds on the retry" in page) is shown


def test_checkout_offers_the_saved_address_and_card_first(shopper, address, card):
    page = shopper.get(CHECKOUT)

    assert page.context["form"]["address"].value() == address.pk
    assert page.context["form"]["card"].value() == card.pk
    assert "Visa ending in 4242 (12/2040)" in text(page)
