"""Every shopper page on a phone (390 x 844) and on a desktop, against the real stack.

On the phone: nothing scrolls sideways, each table cell shows its column's name, and every link,
button and field is at least 44 px tall. Each order page says in plain words what is happening
and what to do, and follows the order without a reload. Times show in the viewer's time zone
(this browser's is New York). A screenshot of each page at 390 px and at 1280 px goes to
test-artifacts/ (phone-<page>.png, desktop-<page>.png).
"""

import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect

from orders.models import Order
from orders.services import HOLD_MESSAGES
from tests.browser.conftest import PHONE, check_on_phone_and_desktop, make_user, open_page, sign_in
from tests.factories import OrderFactory, PlanFactory, ProductFactory
from tests.sandbox_fixtures import SandboxClient

pytestmark = pytest.mark.django_db(transaction=True)

# Long enough for a charge and a shipment through the sandbox on a busy CI machine.
FLOW_TIMEOUT = 45_000


@pytest.fixture
def page(browser, live_stack) -> Iterator[Page]:
    """A phone-sized browser in New York on the live stack."""
    with open_page(
        browser, live_stack, viewport=PHONE, locale="en-US", timezone_id="America/New_York", has_touch=True
    ) as page:
        yield page


@pytest.fixture
def provider(payment_provider) -> Iterator[SandboxClient]:
    """The live stack's provider, its faults put back as they were afterwards."""
    client = SandboxClient(payment_provider.url)
    before = client.get("/v1/faults").json()
    yield client
    client.set_faults(**{key: before[key] for key in ("decline_rate",)})


def place_order_on_the_page(page: Page, product_name: str, quantity: int) -> None:
    page.goto("/orders/new/")
    page.get_by_label(product_name).fill(str(quantity))
    page.get_by_role("button", name="Place order").click()
    expect(page).to_have_url(re.compile(r"/orders/\d+/$"))
    # Lost if the page is loaded again.
    page.evaluate("() => { window.sameDocument = true; }")


def expect_state(page: Page, status_text: str, *words: str) -> None:
    """The status pill and the shown message, reached without a reload; no spinner once nothing runs."""
    expect(page.locator("#order-status")).to_have_text(status_text, timeout=FLOW_TIMEOUT)
    state = page.locator("#order-state > div:visible")
    expect(state).to_have_count(1)
    for text in words:
        expect(state).to_contain_text(text)
    expect(page.locator("#order-progress")).to_be_hidden()
    expect(page.locator("#receipt p:visible", has_text="charged once its stock is reserved")).to_have_count(0)


def test_sign_in_page_on_a_phone(page):
    page.goto("/accounts/login/")
    expect(page.get_by_role("button", name=re.compile("^Sign in$", re.IGNORECASE))).to_be_visible()
    check_on_phone_and_desktop(page, "sign-in")


def test_products_new_order_and_order_list_on_a_phone(page):
    shopper = make_user()
    ProductFactory(name="Phone Mug", sku="PHONE-MUG", stock=10)
    OrderFactory(owner=shopper, status=Order.Status.FULFILLED)
    sign_in(page, shopper)

    page.goto("/")
    check_on_phone_and_desktop(page, "products")
    page.goto("/orders/new/")
    expect(page.locator("td[data-label=Quantity]").first).to_be_visible()
    check_on_phone_and_desktop(page, "new-order")
    page.goto("/orders/")
    placed = page.locator("td[data-label=Placed] time").first
    # In the viewer's zone (New York), in the one format, not the server's UTC fallback.
    expect(placed).to_have_text(re.compile(r"^[A-Z][a-z]{2} \d{1,2}, \d{4}, \d{2}:\d{2} (AM|PM) EST$"))
    check_on_phone_and_desktop(page, "order-list")


def test_a_fulfilled_order_on_a_phone(page):
    shopper = make_user()
    ProductFactory(name="Phone Mug", sku="PHONE-MUG", stock=10)
    sign_in(page, shopper)

    place_order_on_the_page(page, "Phone Mug", 2)

    expect_state(page, "Fulfilled", "Your order is paid and on its way from the warehouse.", "Nothing more to do.")
    expect(page.locator("#receipt")).to_contain_text("Succeeded")
    expect(page.locator("#order-events time").first).to_have_text(re.compile(r" E[SD]T$"))
    assert page.evaluate("() => window.sameDocument === true"), "the order page was reloaded"
    check_on_phone_and_desktop(page, "order-fulfilled")


def test_a_declined_payment_on_a_phone(page, provider):
    shopper = make_user()
    ProductFactory(name="Phone Mug", sku="PHONE-MUG", stock=10)
    sign_in(page, shopper)
    provider.set_faults(decline_rate=1.0)

    place_order_on_the_page(page, "Phone Mug", 1)

    expect_state(page, "Payment Failed", "Your payment did not go through", "You have not been charged")
    expect(page.locator("#order-state").get_by_role("link", name="Place a new order")).to_be_visible()
    expect(page.locator("#receipt")).to_contain_text("Declined")
    expect(page.locator("#cancel-form")).to_be_hidden()
    assert page.evaluate("() => window.sameDocument === true"), "the order page was reloaded"
    check_on_phone_and_desktop(page, "order-payment-failed")


def test_an_order_out_of_stock_on_a_phone(page):
    shopper = make_user()
    ProductFactory(name="Last Mug", sku="LAST-MUG", stock=1)
    sign_in(page, shopper)

    place_order_on_the_page(page, "Last Mug", 2)

    expect_state(
        page,
        "Rejected",
        "Sorry, we could not take this order: Last Mug ran out of stock.",
        "You have not been charged and nothing was reserved.",
    )
    expect(page.locator("#receipt p:visible")).to_have_text("No payment was taken for this order.")
    assert page.evaluate("() => window.sameDocument === true"), "the order page was reloaded"
    check_on_phone_and_desktop(page, "order-rejected")


def test_an_order_on_hold_on_a_phone(page):
    shopper = make_user()
    order = OrderFactory(owner=shopper, status=Order.Status.ON_HOLD, hold_reason=HOLD_MESSAGES[Order.Status.CONFIRMED])
    sign_in(page, shopper)

    page.goto(f"/orders/{order.pk}/")

    expect_state(page, "On Hold", "Your order is on hold", HOLD_MESSAGES[Order.Status.CONFIRMED])
    expect(page.locator("#order-state")).to_contain_text(f"quote order #{order.pk}")
    # It keeps following the order (a hold ends by itself or by staff) and still shows no spinner.
    with page.expect_response(re.compile(rf"/api/orders/{order.pk}/$")):
        pass
    expect(page.locator("#order-progress")).to_be_hidden()
    check_on_phone_and_desktop(page, "order-on-hold")


def test_subscriptions_follow_the_first_charge_live_on_a_phone(page):
    shopper = make_user()
    PlanFactory(code="phone-monthly", name="Phone Monthly", price="7.00")
    sign_in(page, shopper)
    page.goto("/subscriptions/")

    page.get_by_role("button", name="Subscribe").click()
    expect(page.get_by_role("status").first).to_contain_text("Subscribed to Phone Monthly")
    page.evaluate("() => { window.sameDocument = true; }")

    # The payment appears and settles without a reload.
    payment = page.locator("#payments tbody tr[data-payment-id]")
    expect(payment).to_have_count(1, timeout=FLOW_TIMEOUT)
    expect(payment).to_contain_text("Succeeded", timeout=FLOW_TIMEOUT)
    expect(payment).to_contain_text("€7.00")
    row = page.locator("#subscriptions tr[data-subscription-id]")
    expect(row).to_contain_text("Paid up. The next payment is taken on the date shown.")
    expect(row.locator(".spinner")).to_be_hidden()
    expect(payment.locator("td[data-label=Date] time")).to_have_text(re.compile(r" E[SD]T$"))
    assert page.evaluate("() => window.sameDocument === true"), "the subscriptions page was reloaded"
    check_on_phone_and_desktop(page, "subscriptions")
