"""An operator in chromium: finds a dead letter in the admin and requeues it; a worker runs it again."""

import time

import pytest
from playwright.sync_api import expect

from orders.models import Order
from tests.browser.conftest import make_user, sign_in
from tests.factories import FailedTaskFactory, OrderFactory

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


def test_api_docs_render_under_the_content_security_policy(page):
    # The page fixture fails the test on any console message about a refused script or style.
    page.goto("/api/docs")
    expect(page.get_by_text("Shop API").first).to_be_visible()
    expect(page.get_by_role("link", name="/api/orders/{order_id}/", exact=True)).to_be_visible()
