"""A shopper in chromium cancels a paid order and watches the refund go through, against the real stack."""

import re
from decimal import Decimal

import pytest
from playwright.sync_api import expect

from integrations import provider
from orders.models import Order
from payments.models import Refund
from payments.services import new_idempotency_key
from tests.browser.conftest import check_on_phone_and_desktop, make_user, sign_in
from tests.factories import OrderFactory, PaymentFactory

pytestmark = pytest.mark.django_db(transaction=True)

# Long enough for a refund through the sandbox on a busy CI machine.
FLOW_TIMEOUT = 45_000


def paid_order(owner) -> Order:
    """A paid order the warehouse does not have yet, its charge made at the sandbox: made directly, so no worker
    hands it over before the shopper acts."""
    order = OrderFactory(owner=owner, status=Order.Status.PAID, total=Decimal("20.00"))
    key = new_idempotency_key()
    charge = provider.charge(amount=order.total, currency="EUR", reference=key, idempotency_key=key)
    PaymentFactory(order=order, amount=order.total, idempotency_key=key, provider_charge_id=charge.id)
    return order


def test_a_shopper_cancels_a_paid_order_and_sees_it_refunded_without_a_reload(page):
    shopper = make_user()
    order = paid_order(shopper)
    sign_in(page, shopper)
    page.goto(f"/orders/{order.pk}/")
    expect(page.locator("#order-state")).to_contain_text("Payment received.")

    page.get_by_role("button", name="Cancel and refund").click()

    expect(page).to_have_url(re.compile(rf"/orders/{order.pk}/$"))
    expect(page.get_by_text(f"Order #{order.pk} cancelled. €20.00 is being refunded to your card")).to_be_visible()
    # Lost if the page is loaded again.
    page.evaluate("() => { window.sameDocument = true; }")
    expect(page.locator("#order-status")).to_have_text("Refunded", timeout=FLOW_TIMEOUT)
    expect(page.locator("#order-state")).to_contain_text("all of your payment went back to your card")
    refunds = page.locator("#refunds tbody tr")
    expect(refunds).to_have_count(1)
    expect(refunds.first).to_contain_text("€20.00 EUR")
    expect(refunds.first).to_contain_text("Succeeded")
    expect(page.locator("#order-progress")).to_be_hidden()
    expect(page.locator("#cancel-form")).to_be_hidden()
    assert page.evaluate("() => window.sameDocument === true"), "the order page was reloaded"
    order.refresh_from_db()
    assert order.status == Order.Status.REFUNDED
    assert Refund.objects.get(payment__order=order).status == Refund.Status.SUCCEEDED
    check_on_phone_and_desktop(page, "order-refunded")
