"""A shopper in chromium: signs in, orders, subscribes and downloads a report, against the real stack."""

import csv
import io
import re

import pytest
from playwright.sync_api import expect

from orders.models import Order
from tests.browser.conftest import check_on_phone_and_desktop, make_user, sign_in
from tests.factories import OrderFactory, PlanFactory, ProductFactory

pytestmark = pytest.mark.django_db(transaction=True)

# Long enough for a charge and a shipment through the sandbox on a busy CI machine.
FLOW_TIMEOUT = 45_000


def test_sign_in(page):
    shopper = make_user()
    page.goto("/orders/")
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/orders/$"))
    page.get_by_label("Username or email").fill(shopper.username)
    page.get_by_label("Password").fill("not-the-password")
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("alert")).to_contain_text("username and/or password you specified are not correct")
    page.get_by_label("Password").fill("correct-horse-battery")
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page).to_have_url(re.compile(r"/orders/$"))
    expect(page.get_by_role("button", name=f"Sign out ({shopper.username})")).to_be_visible()


def test_order_reaches_paid_then_fulfilled_without_a_reload(page):
    shopper = make_user()
    ProductFactory(name="Browser Mug", sku="BROWSER-MUG", stock=10)
    sign_in(page, shopper)
    page.goto("/orders/new/")
    page.get_by_label("Browser Mug").fill("2")
    page.get_by_role("button", name="Place order").click()
    expect(page).to_have_url(re.compile(r"/orders/\d+/$"))
    order = Order.objects.get(owner=shopper)
    # Lost if the page is loaded again.
    page.evaluate("() => { window.sameDocument = true; }")

    status = page.locator("#order-status")
    expect(status).to_have_text("Fulfilled", timeout=FLOW_TIMEOUT)
    history = page.locator("#order-events li")
    expect(history).to_have_count(4)
    steps = [re.search(r"\b(pending|confirmed|paid|fulfilled)\b", text).group(1) for text in history.all_inner_texts()]
    assert steps == ["pending", "confirmed", "paid", "fulfilled"]
    receipt = page.locator("#receipt")
    expect(receipt).to_contain_text("Succeeded")
    # The provider key is random, made when the payment was claimed (never `order-<id>`).
    expect(receipt).to_contain_text(order.payments.get().idempotency_key)
    expect(page.locator("#order-progress")).to_be_hidden()
    assert page.evaluate("() => window.sameDocument === true"), "the order page was reloaded"
    order.refresh_from_db()
    assert order.status == Order.Status.FULFILLED


def test_invalid_quantity_shows_a_form_error(page):
    shopper = make_user()
    ProductFactory(name="Browser Mug", sku="BROWSER-MUG", stock=10)
    sign_in(page, shopper)
    page.goto("/orders/new/")
    page.get_by_label("Browser Mug").fill("-3")
    page.get_by_role("button", name="Place order").click()
    expect(page).to_have_url(re.compile(r"/orders/new/$"))
    expect(page.get_by_role("alert")).to_contain_text("greater than or equal to 0")
    assert not Order.objects.filter(owner=shopper).exists()


def test_subscribe_to_a_plan_and_see_the_first_payment(page):
    shopper = make_user()
    PlanFactory(code="browser-monthly", name="Browser Monthly", price="9.00")
    sign_in(page, shopper)
    page.goto("/subscriptions/")
    page.get_by_role("button", name="Subscribe").click()
    expect(page.get_by_role("status")).to_contain_text("Subscribed to Browser Monthly")
    expect(page.locator("#subscriptions")).to_contain_text("Browser Monthly")
    # The first charge runs on a worker; the page shows payments as they are when it loads,
    # so refresh as a shopper would until the charge has its outcome.
    payment = page.locator("#payments tbody tr").filter(has_text="Browser Monthly")
    for _ in range(45):
        if payment.count() and "Succeeded" in payment.inner_text():
            break
        page.wait_for_timeout(1000)
        page.reload()
    expect(payment).to_have_count(1)
    expect(payment).to_contain_text("€9.00")
    expect(payment).to_contain_text("Succeeded")


def test_request_a_report_and_download_it(page):
    shopper = make_user()
    OrderFactory(owner=shopper, status=Order.Status.FULFILLED)
    sign_in(page, shopper)
    page.goto("/reports/")
    page.get_by_label("Format").select_option("csv")
    page.get_by_role("button", name="Request report").click()
    row = page.locator("#reports tbody tr[data-report-id]")
    expect(row).to_have_count(1)
    expect(row.locator("[data-role=status]")).to_have_text("Done", timeout=FLOW_TIMEOUT)
    # The reports page on a phone too (tests/browser/test_phone.py has the other pages).
    check_on_phone_and_desktop(page, "reports")
    with page.expect_download() as download_info:
        row.get_by_role("link", name="Download").click()
    download = download_info.value
    assert download.suggested_filename.endswith(".csv")
    with open(download.path(), encoding="utf-8") as handle:
        rows = list(csv.DictReader(io.StringIO(handle.read())))
    assert len(rows) == 1
    assert rows[0]["customer"] == shopper.username
