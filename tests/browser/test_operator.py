"""An operator in chromium: requeues a dead letter a worker then runs; refunds a shopper's order from the admin."""

import re
import time
from decimal import Decimal

import pytest
from playwright.sync_api import expect

from orders.models import Order
from payments.models import Refund
from tests.browser.conftest import make_user, open_page, sign_in
from tests.factories import FailedTaskFactory, OrderFactory, ProductFactory

pytestmark = pytest.mark.django_db(transaction=True)


def test_staff_requeues_a_dead_letter_from_the_admin(page):
    staff = make_user(is_staff=True, is_superuser=True)
    # An order whose processing failed for good while the provider was down.
    order = OrderFactory(status=Order.Status.PENDING)
    failed = FailedTaskFactory(
        task_name="orders.tasks.process_order",
        queue="critical",
        args=[order.pk],
        exception="ConnectionError: provider unreachable",
        attempts=6,
    )
    sign_in(page, staff)
    page.goto("/admin/ops/failedtask/")
    page.get_by_role("searchbox").fill(failed.task_id)
    page.get_by_role("button", name="Search").click()
    row = page.locator("#result_list tbody tr").filter(has_text=failed.task_id)
    expect(row).to_have_count(1)
    expect(row).to_contain_text("orders.tasks.process_order")
    row.get_by_role("checkbox").check()
    page.locator("select[name=action]").select_option(label="Requeue selected")
    page.get_by_role("button", name="Go").click()
    expect(page.locator(".messagelist")).to_contain_text("Requeued 1 task(s).")

    failed.refresh_from_db()
    assert failed.resolved and failed.requeued_as
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        order.refresh_from_db()
        if order.status == Order.Status.FULFILLED:
            break
        time.sleep(0.5)
    assert order.status == Order.Status.FULFILLED


def test_staff_refund_a_fulfilled_order_from_the_admin_and_see_it_refunded(page, browser, live_stack):
    # Given a shopper's order, charged and handed to the warehouse by the workers
    shopper = make_user()
    ProductFactory(name="Refund Mug", sku="REFUND-MUG", price="12.00", stock=5)
    sign_in(page, shopper)
    page.goto("/orders/new/")
    page.get_by_label("Refund Mug").fill("2")
    page.get_by_role("button", name="Place order").click()
    expect(page.locator("#order-status")).to_have_text("Fulfilled", timeout=45_000)
    order = Order.objects.get(owner=shopper)

    # When support refunds one mug, then all that is left, from the order's admin page
    with open_page(browser, live_stack) as admin:
        sign_in(admin, make_user(is_staff=True, is_superuser=True))
        admin.goto(f"/admin/orders/order/{order.pk}/change/")
        expect(admin.locator("#order-actions")).to_contain_text("24.00 EUR of the 24.00 EUR charged is left to refund")
        admin.get_by_label("Units of REFUND-MUG to refund").fill("1")
        admin.locator("#refund-lines").get_by_label("Note").fill("one arrived broken")
        admin.get_by_role("button", name="Refund these lines").click()
        expect(admin.locator(".messagelist")).to_contain_text("of 12.00 EUR requested")
        refunded = admin.locator("#order-refunds")
        # The refund runs on a worker; the page shows it as it is when loaded. Its rows and the order's
        # status are read one after the other, so a reload between the two reads can show the refund
        # done and the status not yet: wait for both.
        for _ in range(45):
            status = admin.locator(".field-status .readonly").inner_text()
            if "succeeded" in refunded.inner_text() and status == "Partially Refunded":
                break
            admin.wait_for_timeout(1000)
            admin.reload()
        expect(refunded).to_contain_text("1 × REFUND-MUG")
        expect(admin.locator(".field-status .readonly")).to_have_text("Partially Refunded")

        admin.locator("#refund-all").get_by_label("Note").fill("customer gave up")
        admin.locator("#refund-all").get_by_label("Yes, refund 12.00 EUR").check()
        admin.get_by_role("button", name="Refund all that is left").click()
        expect(admin.locator(".messagelist")).to_contain_text("of 12.00 EUR requested")
        for _ in range(45):
            status = admin.locator(".field-status .readonly").inner_text()
            if status == "Refunded" and refunded.inner_text().count("succeeded") == 2:
                break
            admin.wait_for_timeout(1000)
            admin.reload()

        # Then the order is refunded, each refund with its provider id, and nothing more is offered
        expect(admin.locator(".field-status .readonly")).to_have_text("Refunded")
        expect(refunded.locator("td.refund-status")).to_have_text(["succeeded", "succeeded"])
        expect(admin.locator("#order-actions")).to_contain_text("No action applies")
        expect(admin.get_by_role("button", name=re.compile("^Refund"))).to_have_count(0)

    refunds = Refund.objects.filter(payment__order=order).order_by("id")
    assert [(refund.amount, refund.status) for refund in refunds] == [
        (Decimal("12.00"), Refund.Status.SUCCEEDED),
        (Decimal("12.00"), Refund.Status.SUCCEEDED),
    ]
    assert all(refund.provider_refund_id for refund in refunds)


def test_api_docs_render_under_the_content_security_policy(page):
    # The page fixture fails the test on any console message about a refused script or style.
    page.goto("/api/docs")
    expect(page.get_by_text("Shop API").first).to_be_visible()
    expect(page.get_by_role("link", name="/api/orders/{order_id}/", exact=True)).to_be_visible()
