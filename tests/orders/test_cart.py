"""The cart in the session: add, change, remove, the rules of an order, never a 5xx, and the merge at sign-in."""

import html
from decimal import Decimal

import pytest
from django.test import Client

from orders.cart import SESSION_KEY, Cart
from orders.models import Order
from orders.services import MAX_ITEMS, MAX_QUANTITY
from tests.factories import ProductFactory, UserFactory

pytestmark = pytest.mark.django_db

ADD, SET, REMOVE, CART = "/orders/cart/add/", "/orders/cart/set/", "/orders/cart/remove/", "/orders/cart/"
PASSWORD = "correct-horse-battery"  # noqa: S105 (tests.factories.UserFactory's password)


def text(response) -> str:
    return html.unescape(response.content.decode())


def cart_of(client: Client) -> dict:
    return dict(client.session.get(SESSION_KEY, {}))


@pytest.fixture
def mug(db):
    return ProductFactory(sku="MUG-001", name="Enamel mug", price=Decimal("12.50"), stock=2000)


@pytest.fixture
def tee(db):
    return ProductFactory(sku="TEE-001", name="Organic T-shirt", price=Decimal("24.00"), stock=3)


def test_a_visitor_adds_a_product_and_sees_lines_subtotal_shipping_and_total(client, mug, tee, settings):
    settings.SHIPPING_FEE = "4.90"

    response = client.post(ADD, {"sku": "MUG-001", "quantity": "2"})
    client.post(ADD, {"sku": "TEE-001", "quantity": "1"})

    assert response.status_code == 302 and response["Location"] == CART
    assert cart_of(client) == {"MUG-001": 2, "TEE-001": 1}
    page = client.get(CART)
    summary = page.context["cart"]
    assert [(line.sku, line.quantity, line.line_total) for line in summary.lines] == [
        ("MUG-001", 2, Decimal("25.00")),
        ("TEE-001", 1, Decimal("24.00")),
    ]
    assert (summary.subtotal, summary.shipping, summary.total) == (Decimal("49.00"), Decimal("4.90"), Decimal("53.90"))
    assert "Added 2 × Enamel mug to your cart." in text(page)
    assert 'id="cart-total">€53.90<' in text(page)
    assert "Check out" in text(page)


def test_adding_again_adds_up_and_the_nav_shows_the_count_of_products(client, mug, tee):
    client.post(ADD, {"sku": "MUG-001", "quantity": "2"})
    client.post(ADD, {"sku": "MUG-001", "quantity": "3"})
    client.post(ADD, {"sku": "TEE-001", "quantity": "1"})

    assert cart_of(client) == {"MUG-001": 5, "TEE-001": 1}
    assert 'aria-label="2 products">2</span>' in text(client.get("/"))


def test_changing_a_quantity_and_removing_a_line(client, mug, tee):
    client.post(ADD, {"sku": "MUG-001", "quantity": "2"})
    client.post(ADD, {"sku": "TEE-001", "quantity": "1"})

    assert client.post(SET, {"sku": "MUG-001", "quantity": "7"}).status_code == 302
    assert cart_of(client) == {"MUG-001": 7, "TEE-001": 1}
    assert client.post(SET, {"sku": "TEE-001", "quantity": "0"}).status_code == 302
    assert cart_of(client) == {"MUG-001": 7}
    assert client.post(REMOVE, {"sku": "MUG-001"}).status_code == 302
    assert cart_of(client) == {}
    assert "Your cart is empty." in text(client.get(CART))


def test_the_empty_cart_costs_nothing_and_offers_no_checkout(client):
    page = client.get(CART)
    assert page.status_code == 200
    assert page.context["cart"].total == 0
    assert "Check out" not in text(page)


HOSTILE_QUANTITIES = [
    ("0", "The quantity must be at least 1."),
    ("-1", "The quantity must be at least 1."),
    (str(MAX_QUANTITY + 1), f"You can order at most {MAX_QUANTITY} of one product."),
    ("abc", "The quantity must be a whole number from 1 to 1000."),
    ("1e3", "The quantity must be a whole number from 1 to 1000."),
    ("1.5", "The quantity must be a whole number from 1 to 1000."),
    ("9" * 30, f"You can order at most {MAX_QUANTITY} of one product."),
    ("9" * 5000, "The quantity must be a whole number from 1 to 1000."),
    ("", "Enter a quantity."),
    ("0x10", "The quantity must be a whole number from 1 to 1000."),
    ("NaN", "The quantity must be a whole number from 1 to 1000."),
]


@pytest.mark.parametrize(("quantity", "message"), HOSTILE_QUANTITIES)
def test_a_hostile_quantity_to_add_is_refused_with_a_message_and_the_cart_is_unchanged(client, mug, quantity, message):
    client.post(ADD, {"sku": "MUG-001", "quantity": "2"})

    response = client.post(ADD, {"sku": "MUG-001", "quantity": quantity})

    assert response.status_code == 400
    assert message in text(response)
    assert 'class="flash flash-error"' in text(response)
    assert cart_of(client) == {"MUG-001": 2}


@pytest.mark.parametrize(
    ("quantity", "message"),
    [
        ("-1", "The quantity must be at least 0."),
        ("1001", f"You can order at most {MAX_QUANTITY} of one product."),
        ("abc", "The quantity must be a whole number from 0 to 1000."),
        ("1e3", "The quantity must be a whole number from 0 to 1000."),
        ("99999999999999999999999", f"You can order at most {MAX_QUANTITY} of one product."),
        ("", "Enter a quantity."),
    ],
)
def test_a_hostile_quantity_to_set_is_refused_and_the_cart_is_unchanged(client, mug, quantity, message):
    client.post(ADD, {"sku": "MUG-001", "quantity": "2"})

    response = client.post(SET, {"sku": "MUG-001", "quantity": quantity})

    assert response.status_code == 400
    assert message in text(response)
    assert cart_of(client) == {"MUG-001": 2}


@pytest.mark.parametrize("url", [ADD, SET, REMOVE])
@pytest.mark.parametrize(
    ("sku", "message"),
    [
        ("NOPE", "There is no product with the sku 'NOPE'."),
        ("x" * 65, "Choose a product from the catalogue."),
        ("", "Choose a product from the catalogue."),
        ("mug-001", "There is no product with the sku 'mug-001'."),
        ("<b>MUG</b>", "There is no product with the sku '<b>MUG</b>'."),
    ],
)
def test_an_unknown_sku_is_refused_with_a_message(client, mug, url, sku, message):
    client.post(ADD, {"sku": "MUG-001", "quantity": "1"})

    response = client.post(url, {"sku": sku, "quantity": "1"})

    assert response.status_code == 400
    page = text(response)
    if url == ADD:
        assert message in page
    else:
        assert message in page or "That product is not in your cart." in page
    assert "<b>MUG</b>" not in response.content.decode()
    assert cart_of(client) == {"MUG-001": 1}


def test_setting_or_removing_a_product_not_in_the_cart_is_refused(client, mug, tee):
    client.post(ADD, {"sku": "MUG-001", "quantity": "1"})

    for url in (SET, REMOVE):
        response = client.post(url, {"sku": "TEE-001", "quantity": "2"})
        assert response.status_code == 400
        assert "That product is not in your cart." in text(response)
    assert cart_of(client) == {"MUG-001": 1}


def test_adding_up_past_the_most_one_order_takes_is_refused(client, mug):
    client.post(ADD, {"sku": "MUG-001", "quantity": "999"})

    response = client.post(ADD, {"sku": "MUG-001", "quantity": "2"})

    assert response.status_code == 400
    assert f"You can order at most {MAX_QUANTITY} of one product." in text(response)
    assert cart_of(client) == {"MUG-001": 999}


def test_a_cart_holds_at_most_50_different_products(client):
    products = ProductFactory.create_batch(MAX_ITEMS + 1)
    for product in products[:MAX_ITEMS]:
        assert client.post(ADD, {"sku": product.sku, "quantity": "1"}).status_code == 302

    response = client.post(ADD, {"sku": products[-1].sku, "quantity": "1"})

    assert response.status_code == 400
    assert f"A cart holds at most {MAX_ITEMS} different products." in text(response)
    assert len(cart_of(client)) == MAX_ITEMS
    # More of a product already in it is still fine.
    assert client.post(ADD, {"sku": products[0].sku, "quantity": "1"}).status_code == 302


def test_more_than_the_stock_or_a_sold_out_product_is_refused(client, tee):
    sold_out = ProductFactory(sku="GONE-1", name="Gone", stock=0)

    over = client.post(ADD, {"sku": "TEE-001", "quantity": "4"})
    gone = client.post(ADD, {"sku": sold_out.sku, "quantity": "1"})

    assert over.status_code == gone.status_code == 400
    assert "Only 3 of Organic T-shirt left: you can have at most 3." in text(over)
    assert "Gone is sold out." in text(gone)
    assert cart_of(client) == {}


def test_stale_lines_are_shown_with_a_message_and_checkout_waits(client, mug, tee):
    client.post(ADD, {"sku": "MUG-001", "quantity": "1"})
    client.post(ADD, {"sku": "TEE-001", "quantity": "3"})
    session = client.session
    session[SESSION_KEY] = {**session[SESSION_KEY], "GONE-404": 2}
    session.save()
    tee.stock = 1
    tee.save()

    page = client.get(CART)

    assert page.status_code == 200
    shown = text(page)
    assert "This product is no longer sold: remove it to check out." in shown
    assert "Only 1 left: lower the quantity to check out." in shown
    assert "Check out</a>" not in shown
    assert client.post(REMOVE, {"sku": "GONE-404"}).status_code == 302


@pytest.mark.parametrize(
    "stored",
    [
        "not a dict",
        ["MUG-001", 2],
        {"MUG-001": "2"},
        {"MUG-001": -3},
        {"MUG-001": 10**12},
        {"MUG-001": True},
        {"MUG-001": 2.5},
        {"x" * 500: 1},
        None,
    ],
)
def test_a_cart_the_session_holds_in_another_shape_is_read_as_the_rules_allow(client, mug, stored):
    session = client.session
    session[SESSION_KEY] = stored
    session.save()

    page = client.get(CART)

    assert page.status_code == 200
    assert page.context["cart"].lines == []
    assert client.post(ADD, {"sku": "MUG-001", "quantity": "1"}).status_code == 302
    assert cart_of(client) == {"MUG-001": 1}


def test_another_sessions_cart_is_untouched(mug, tee):
    mine, theirs = Client(), Client()
    theirs.post(ADD, {"sku": "TEE-001", "quantity": "2"})

    mine.post(ADD, {"sku": "MUG-001", "quantity": "1"})
    mine.post(SET, {"sku": "TEE-001", "quantity": "0"})
    mine.post(REMOVE, {"sku": "TEE-001"})

    assert cart_of(theirs) == {"TEE-001": 2}
    assert cart_of(mine) == {"MUG-001": 1}


def test_cart_pages_refuse_the_wrong_method(client):
    assert client.get(ADD).status_code == 405
    assert client.get(SET).status_code == 405
    assert client.get(REMOVE).status_code == 405
    assert client.post(CART).status_code == 405


# --- Merge --------------------------------------------------------------------------------------


def test_merging_carts_adds_quantities_up_capped_by_the_rules(client, mug, tee):
    session = client.session
    cart = Cart(session)
    cart.add(sku="MUG-001", quantity=600)
    cart.add(sku="TEE-001", quantity=1)

    notes = cart.merge({"MUG-001": 600, "TEE-001": 2, "GONE-404": 1, "bad": "x"})

    assert cart.quantities == {"MUG-001": MAX_QUANTITY, "TEE-001": 3}
    assert notes == [
        "GONE-404 is no longer sold and was left out.",
        f"Enamel mug: lowered to {MAX_QUANTITY}, the most one order takes.",
    ]


def test_merging_stops_at_50_different_products(client):
    products = ProductFactory.create_batch(MAX_ITEMS + 2)
    cart = Cart(client.session)
    for product in products[: MAX_ITEMS - 1]:
        cart.add(sku=product.sku, quantity=1)

    notes = cart.merge({products[-1].sku: 1, products[-2].sku: 1})

    assert len(cart.quantities) == MAX_ITEMS
    assert len(notes) == 1 and "a cart holds at most 50 products" in notes[0]


def test_a_visitors_cart_is_merged_into_the_signed_in_session_at_sign_in(client, mug, tee):
    shopper = UserFactory()
    client.post(ADD, {"sku": "MUG-001", "quantity": "2"})
    client.post(ADD, {"sku": "TEE-001", "quantity": "1"})
    visitor_key = client.session.session_key

    response = client.post("/accounts/login/", {"login": shopper.username, "password": PASSWORD})

    assert response.status_code == 302
    assert client.session.session_key != visitor_key  # a new session, signed in
    assert client.session["_auth_user_id"] == str(shopper.pk)
    assert cart_of(client) == {"MUG-001": 2, "TEE-001": 1}
    assert [line.sku for line in client.get(CART).context["cart"].lines] == ["MUG-001", "TEE-001"]


def test_at_sign_in_skus_no_longer_sold_are_left_out_and_the_shopper_is_told(client, mug):
    shopper = UserFactory()
    client.post(ADD, {"sku": "MUG-001", "quantity": "2"})
    session = client.session
    session[SESSION_KEY] = {**session[SESSION_KEY], "GONE-404": 1}
    session.save()

    client.post("/accounts/login/", {"login": shopper.username, "password": PASSWORD})

    assert cart_of(client) == {"MUG-001": 2}
    assert "Your cart: GONE-404 is no longer sold and was left out." in text(client.get(CART))


def test_signing_in_leaves_other_sessions_carts_alone(mug, tee):
    shopper = UserFactory()
    visitor, elsewhere = Client(), Client()
    elsewhere.post(ADD, {"sku": "TEE-001", "quantity": "3"})
    visitor.post(ADD, {"sku": "MUG-001", "quantity": "1"})

    visitor.post("/accounts/login/", {"login": shopper.username, "password": PASSWORD})

    assert cart_of(visitor) == {"MUG-001": 1}
    assert cart_of(elsewhere) == {"TEE-001": 3}
    assert not Order.objects.exists()


def test_signing_out_empties_the_cart(client, mug):
    shopper = UserFactory()
    client.post("/accounts/login/", {"login": shopper.username, "password": PASSWORD})
    client.post(ADD, {"sku": "MUG-001", "quantity": "1"})

    client.post("/accounts/logout/")

    assert cart_of(client) == {}


# --- The cart kept with the account ------------------------------------------------------------


def test_a_signed_in_shoppers_cart_follows_them_to_another_device_and_takes_that_visitors_lines(mug, tee):
    from orders.models import SavedCart

    shopper = UserFactory()
    laptop, phone = Client(), Client()
    laptop.post("/accounts/login/", {"login": shopper.username, "password": PASSWORD})
    laptop.post(ADD, {"sku": "MUG-001", "quantity": "2"})
    assert SavedCart.objects.get(owner=shopper).quantities == {"MUG-001": 2}

    # On the phone, as a visitor first, then signed in: the account's lines come back, the visitor's add up.
    phone.post(ADD, {"sku": "MUG-001", "quantity": "1"})
    phone.post(ADD, {"sku": "TEE-001", "quantity": "1"})
    phone.post("/accounts/login/", {"login": shopper.username, "password": PASSWORD})

    assert cart_of(phone) == {"MUG-001": 3, "TEE-001": 1}
    assert SavedCart.objects.get(owner=shopper).quantities == {"MUG-001": 3, "TEE-001": 1}


def test_a_cart_emptied_on_one_device_is_empty_at_the_next_sign_in(mug):
    shopper = UserFactory()
    client = Client()
    client.post("/accounts/login/", {"login": shopper.username, "password": PASSWORD})
    client.post(ADD, {"sku": "MUG-001", "quantity": "2"})
    client.post("/orders/cart/remove/", {"sku": "MUG-001"})
    client.post("/accounts/logout/")

    client.post("/accounts/login/", {"login": shopper.username, "password": PASSWORD})
    assert cart_of(client) == {}


def test_a_saved_cart_comes_back_to_its_own_owner_only(mug):
    owner, other = UserFactory(), UserFactory()
    first = Client()
    first.post("/accounts/login/", {"login": owner.username, "password": PASSWORD})
    first.post(ADD, {"sku": "MUG-001", "quantity": "4"})

    second = Client()
    second.post("/accounts/login/", {"login": other.username, "password": PASSWORD})
    assert cart_of(second) == {}


def test_a_saved_cart_holding_what_the_rules_refuse_comes_back_without_it(mug):
    from orders.models import SavedCart

    shopper = UserFactory()
    SavedCart.objects.create(
        owner=shopper, quantities={"MUG-001": 2, "": 1, "TEE-001": -3, "X" * 200: 1, "MUG-002": "7"}
    )
    client = Client()
    client.post("/accounts/login/", {"login": shopper.username, "password": PASSWORD})
    assert cart_of(client) == {"MUG-001": 2}
