"""A shopper in chromium: browse, search, fill the cart, check out, against the real stack (gunicorn, workers, sandbox).

The succeeding card is paid and shipped; a declining one says so on the order page and the cart
comes back. The same pages at 390 px: nothing scrolls sideways, labelled table cells, 44 px
touch targets; a screenshot of each page at 390 and 1280 px goes to test-artifacts/.
"""

import re
from decimal import Decimal

import pytest
from playwright.sync_api import Page, expect

from accounts.models import Address
from orders.models import Order
from payments.models import PaymentMethod
from tests.browser.conftest import PASSWORD, PHONE, check_on_phone_and_desktop, make_user, sign_in
from tests.factories import AddressFactory, PaymentMethodFactory, ProductFactory

pytestmark = pytest.mark.django_db(transaction=True)

# Long enough for a charge and a shipment through the sandbox on a busy CI machine.
FLOW_TIMEOUT = 45_000
SUCCEEDS, DECLINES = "4242 4242 4242 4242", "4000 0000 0000 0002"


@pytest.fixture
def products(db):
    return {
        "mug": ProductFactory(
            sku="CHK-MUG",
            name="Checkout Mug",
            price=Decimal("10.00"),
            stock=40,
            description="An enamel mug for the browser tests.\n\nIt survives every run.",
        ),
        "tee": ProductFactory(sku="CHK-TEE", name="Checkout Tee", price=Decimal("20.00"), stock=3),
        "cap": ProductFactory(sku="CHK-CAP", name="Checkout Cap", price=Decimal("15.00"), stock=0),
    }


def cart_line(page: Page, sku: str):
    return page.locator(f"#cart-lines tr[data-sku='{sku}']")


def add_from_the_product_page(page: Page, name: str, quantity: int) -> None:
    page.goto("/")
    page.get_by_role("link", name=name, exact=True).click()
    expect(page.get_by_role("heading", level=1)).to_have_text(name)
    page.get_by_label("Quantity", exact=True).fill(str(quantity))
    page.get_by_role("button", name="Add to cart").click()
    expect(page).to_have_url(re.compile(r"/orders/cart/$"))


def pay_with_a_new_card(page: Page, number: str) -> None:
    """On the checkout page, with the saved address chosen: a new card, reviewed, placed."""
    page.get_by_label("A new card").check()
    page.get_by_label("Card number").fill(number)
    page.get_by_label("Expiry month").fill("12")
    page.get_by_label("Expiry year").fill("2040")
    page.get_by_label("CVC").fill("123")
    page.get_by_role("button", name="Review your order").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Review your order")
    expect(page.locator("#review-card")).to_contain_text("Visa ending in")


def test_browse_search_fill_the_cart_and_check_out_with_a_saved_address_and_the_succeeding_card(page, products):
    shopper = make_user()
    AddressFactory(owner=shopper, name="Ada Browser", city="Hamburg")

    # The catalogue, searched by name and by sku.
    page.goto("/")
    expect(page.locator("#products li.product")).to_have_count(3)
    expect(page.locator("li[data-sku='CHK-CAP']")).to_contain_text("Sold out")
    expect(page.locator("li[data-sku='CHK-TEE']")).to_contain_text("Only 3 left")
    expect(page.locator("li[data-sku='CHK-MUG']")).to_contain_text("In stock")
    check_on_phone_and_desktop(page, "catalogue")
    page.get_by_label("Search by name or sku").fill("tee")
    page.get_by_role("button", name="Search").click()
    expect(page.locator("#products li.product")).to_have_count(1)
    expect(page.locator("#search-summary")).to_contain_text("1 product matching “tee”")
    page.get_by_label("Search by name or sku").fill("chk-mug")
    page.get_by_role("button", name="Search").click()
    expect(page.locator("#products li.product")).to_have_text(re.compile("Checkout Mug"))
    check_on_phone_and_desktop(page, "catalogue-search")

    # As a visitor: two mugs from the product page, a tee from the catalogue.
    add_from_the_product_page(page, "Checkout Mug", 2)
    page.goto("/orders/product/?sku=CHK-MUG")
    expect(page.locator("#in-cart")).to_contain_text("2 in your cart")
    check_on_phone_and_desktop(page, "product")
    page.goto("/")
    page.get_by_role("button", name="Add Checkout Tee to the cart").click()
    expect(page.locator("#nav-cart .count")).to_have_text("2")

    # Quantities changed, a line removed, a refused quantity explained.
    cart_line(page, "CHK-MUG").get_by_label("Quantity of Checkout Mug").fill("3")
    cart_line(page, "CHK-MUG").get_by_role("button", name="Update").click()
    expect(page.locator("#cart-subtotal")).to_have_text("€50.00")
    cart_line(page, "CHK-TEE").get_by_label("Quantity of Checkout Tee").fill("4")
    cart_line(page, "CHK-TEE").get_by_role("button", name="Update").click()
    expect(page.locator(".flash-error")).to_contain_text("Only 3 of Checkout Tee left")
    page.get_by_role("button", name="Remove Checkout Tee").click()
    expect(page.locator("#cart-lines tbody tr")).to_have_count(1)
    expect(page.locator("#cart-shipping")).to_have_text("€4.90")
    expect(page.locator("#cart-total")).to_have_text("€34.90")
    check_on_phone_and_desktop(page, "cart")

    # Checking out asks to sign in; the cart comes along.
    page.get_by_role("link", name="Check out").click()
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/orders/checkout/$"))
    page.get_by_label("Username or email").fill(shopper.username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page).to_have_url(re.compile(r"/orders/checkout/$"))
    expect(page.get_by_label(re.compile("Ada Browser"))).to_be_checked()
    expect(page.get_by_label("Name", exact=True)).to_be_hidden()  # a saved address needs no new one
    check_on_phone_and_desktop(page, "checkout")

    pay_with_a_new_card(page, SUCCEEDS)
    expect(page.locator("#review-address")).to_contain_text("Hamburg")
    expect(page.locator("#review-lines")).to_contain_text("Checkout Mug")
    expect(page.locator("#review-lines #cart-total")).to_have_text("€34.90")
    check_on_phone_and_desktop(page, "checkout-review")
    page.get_by_role("button", name="Place order").click()

    # The order page follows it to fulfilled; the cart is empty.
    expect(page).to_have_url(re.compile(r"/orders/\d+/$"))
    expect(page.locator("#order-status")).to_have_text("Fulfilled", timeout=FLOW_TIMEOUT)
    expect(page.locator("#nav-cart .count")).to_have_count(0)
    order = Order.objects.get(owner=shopper)
    assert (order.total, order.shipping_fee, order.shipping_address["city"]) == (
        Decimal("34.90"),
        Decimal("4.90"),
        "Hamburg",
    )
    assert PaymentMethod.objects.get(owner=shopper).last4 == "4242"
    check_on_phone_and_desktop(page, "checkout-order-fulfilled")


def test_a_declining_card_says_so_and_the_cart_is_kept_on_a_phone(page, products):
    shopper = make_user()
    AddressFactory(owner=shopper)
    page.set_viewport_size(PHONE)
    sign_in(page, shopper)
    add_from_the_product_page(page, "Checkout Mug", 1)
    page.get_by_role("link", name="Check out").click()

    pay_with_a_new_card(page, DECLINES)
    page.get_by_role("button", name="Place order").click()

    expect(page.locator("#order-status")).to_have_text("Payment Failed", timeout=FLOW_TIMEOUT)
    expect(page.locator("#order-state")).to_contain_text("Your payment did not go through (card_declined)")
    expect(page.locator("#order-cart")).to_contain_text("Your cart is kept")
    check_on_phone_and_desktop(page, "checkout-order-declined")
    page.get_by_role("link", name="Back to your cart").click()
    expect(page.locator(".flash")).to_contain_text("its items are back in your cart")
    expect(cart_line(page, "CHK-MUG").get_by_label("Quantity of Checkout Mug")).to_have_value("1")
    expect(page.locator("#nav-cart .count")).to_have_text("1")
    assert Order.objects.get(owner=shopper).status == Order.Status.PAYMENT_FAILED


def test_a_card_the_provider_refuses_shows_the_fields_error_on_a_phone(page, products):
    shopper = make_user()
    AddressFactory(owner=shopper)
    page.set_viewport_size(PHONE)
    sign_in(page, shopper)
    add_from_the_product_page(page, "Checkout Mug", 1)
    page.get_by_role("link", name="Check out").click()

    page.get_by_label("Card number").fill("4242 4242 4242 4241")
    page.get_by_label("Expiry month").fill("12")
    page.get_by_label("Expiry year").fill("2040")
    page.get_by_label("CVC").fill("123")
    page.get_by_role("button", name="Review your order").click()

    expect(page.locator("p.field.has-error", has=page.get_by_label("Card number"))).to_contain_text("card")
    expect(page.get_by_label("Card number")).to_have_value("")  # never sent back
    check_on_phone_and_desktop(page, "checkout-card-refused")
    assert not PaymentMethod.objects.filter(owner=shopper).exists()
    assert not Order.objects.filter(owner=shopper).exists()
    assert Address.objects.filter(owner=shopper).count() == 1


def test_saved_cards_are_listed_and_removed_on_a_phone(page):
    shopper = make_user()
    PaymentMethodFactory(owner=shopper, brand="visa", last4="4242")
    PaymentMethodFactory(owner=shopper, brand="mastercard", last4="4444")
    page.set_viewport_size(PHONE)
    sign_in(page, shopper)
    page.goto("/accounts/profile/")
    page.get_by_role("link", name="Saved cards").click()
    expect(page.locator("#cards tbody tr")).to_have_count(2)
    check_on_phone_and_desktop(page, "cards")

    page.get_by_role("button", name="Remove Mastercard ending in 4444").click()

    expect(page.locator(".flash")).to_contain_text("Card removed.")
    expect(page.locator("#cards tbody tr")).to_have_count(1)
    expect(page.locator("#cards")).to_contain_text("Visa ending in 4242")
