"""The order page says in plain words what is happening and what to do, for every status.

Each order is brought to its status by the services (the provider is the sandbox), then the page
is read the way a shopper sees it: only the message for that status is shown.
"""

# The fixtures imported from tests/orders/test_refunds.py are arguments of the tests below.
# ruff: noqa: F811

import html
import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

import pytest
from django.utils import timezone

from orders.models import Order
from orders.services import (
    HOLD_MESSAGES,
    cancel_order,
    expire_order,
    hold_stuck_order,
    place_order,
    process_order,
    refund_order,
)
from orders.views import HELD_KEY
from payments.models import Refund
from tests.factories import OrderFactory, PaymentFactory

pytestmark = pytest.mark.django_db

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class VisibleText(HTMLParser):
    """The text of one element (by id) that is not inside a `hidden` element, as a browser shows it."""

    def __init__(self, element_id: str):
        super().__init__()
        self.element_id = element_id
        self.stack: list[bool] = []  # per open element: inside the wanted element and shown
        self.inside_depth: int | None = None
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in VOID:
            return
        attributes = dict(attrs)
        if self.inside_depth is None and attributes.get("id") == self.element_id:
            self.inside_depth = len(self.stack)
        if self.inside_depth is None:
            shown = False
        elif self.inside_depth == len(self.stack):  # the element itself
            shown = "hidden" not in attributes
        else:
            shown = self.stack[-1] and "hidden" not in attributes
        self.stack.append(shown)

    def handle_endtag(self, tag):
        if tag in VOID or not self.stack:
            return
        self.stack.pop()
        if self.inside_depth is not None and len(self.stack) == self.inside_depth:
            self.inside_depth = None

    def handle_data(self, data):
        if self.stack and self.stack[-1] and self.inside_depth is not None:
            self.parts.append(data)

    @classmethod
    def of(cls, page: str, element_id: str) -> str:
        parser = cls(element_id)
        parser.feed(page)
        return " ".join("".join(parser.parts).split())


def order_page(client, order: Order) -> str:
    client.force_login(order.owner)
    response = client.get(f"/orders/{order.pk}/")
    assert response.status_code == 200
    return html.unescape(response.content.decode())


def shown(page: str, element_id: str) -> str:
    return VisibleText.of(page, element_id)


def assert_unpaid(page: str, state: str) -> None:
    """The order's state reads `state`, and its receipt says no payment was taken."""
    assert shown(page, "order-state") == state
    assert shown(page, "receipt") == "Receipt No payment was taken for this order."


def spinner_shown(page: str) -> bool:
    tag = re.search(r'<span id="order-progress"[^>]*>', page)
    assert tag, "no spinner on the order page"
    return not re.search(r"\shidden\b", tag.group(0))


@pytest.fixture
def placed(user, product, django_capture_on_commit_callbacks):
    """Place an order for `quantity` mugs and run what its commit dispatches (eagerly): as far as it goes."""

    def _place(quantity: int, *, run: bool = True) -> Order:
        with django_capture_on_commit_callbacks(execute=run):
            order = place_order(owner=user, items=[("MUG-001", quantity)])
        order.refresh_from_db()
        return order

    return _place


def test_a_pending_order_says_it_is_reserving_and_can_be_cancelled(client, placed):
    order = placed(1, run=False)

    page = order_page(client, order)

    assert shown(page, "order-state") == (
        "We have your order and are reserving the items. "
        "Nothing to do: this page updates by itself. You can still cancel the order below."
    )
    assert shown(page, "receipt") == "Receipt No payment yet: the order is charged once its stock is reserved."
    assert spinner_shown(page)


def test_a_fulfilled_order_says_it_is_on_its_way_and_shows_the_receipt(client, placed, sandbox):
    order = placed(2)
    assert order.status == Order.Status.FULFILLED

    page = order_page(client, order)

    assert shown(page, "order-state") == (
        "Your order is paid and on its way from the warehouse. Nothing more to do. We have emailed you a confirmation."
    )
    assert "Succeeded" in shown(page, "receipt")
    assert "charged once its stock is reserved" not in shown(page, "receipt")
    assert not spinner_shown(page)


def test_a_declined_payment_says_nothing_was_charged_and_how_to_try_again(client, placed, sandbox):
    sandbox.set_faults(decline_rate=1.0)
    order = placed(2)
    assert order.status == Order.Status.PAYMENT_FAILED
    reason = order.payments.get().failure_reason
    assert reason

    page = order_page(client, order)

    assert shown(page, "order-state") == (
        f"Your payment did not go through ({reason}). "
        "You have not been charged, and the items are no longer reserved for you. To try again, place a new "
        "order; if your bank declined the payment, check your card with them first. Place a new order"
    )
    assert not spinner_shown(page)


def test_an_order_out_of_stock_names_the_item_and_never_promises_a_charge(client, placed):
    order = placed(11)  # the mug has 10 in stock
    assert order.status == Order.Status.REJECTED

    page = order_page(client, order)

    assert_unpaid(
        page,
        (
            "Sorry, we could not take this order: Mug ran out of stock. "
            "You have not been charged and nothing was reserved. See what is in stock and place a new order. "
            "Place a new order"
        ),
    )
    assert "charged once its stock is reserved" not in shown(page, "order")
    assert not spinner_shown(page)


def test_an_order_on_hold_shows_its_reason_and_what_to_do_without_a_spinner(client, placed):
    order = placed(1, run=False)
    hold_stuck_order(order_id=order.pk, task_name="orders.tasks.process_order", reason="ConnectionError")
    order.refresh_from_db()
    assert order.status == Order.Status.ON_HOLD

    page = order_page(client, order)

    assert shown(page, "order-state") == (
        "Your order is on hold: it needs our staff before it can move on. "
        f"{HOLD_MESSAGES[Order.Status.PENDING]} "
        f"Nothing to do for now: this page updates by itself when the order moves on. If you contact us, "
        f"quote order #{order.pk}."
    )
    assert not spinner_shown(page)


def test_a_cancelled_order_says_nothing_was_charged(client, placed, user):
    order = placed(1, run=False)
    cancel_order(order_id=order.pk, owner=user)

    page = order_page(client, order)

    assert_unpaid(
        page,
        "This order is cancelled. You have not been charged, and nothing is reserved for it. Nothing more to do.",
    )


@pytest.mark.parametrize(
    ("status", "title"),
    [
        (Order.Status.CONFIRMED, "Your items are reserved. We are taking the payment now."),
        (Order.Status.PAID, "Payment received. We are handing your order to the warehouse."),
    ],
)
def test_an_order_between_steps_says_which_step_runs(client, status, title):
    order = OrderFactory(status=status)
    if status == Order.Status.PAID:
        PaymentFactory(order=order, amount=order.total)

    page = order_page(client, order)

    assert shown(page, "order-state").startswith(title)
    assert shown(page, "order-slow") == ""


def test_an_order_stuck_between_steps_says_it_is_taking_longer(client):
    order = OrderFactory(status=Order.Status.CONFIRMED)
    Order.objects.filter(pk=order.pk).update(updated_at=timezone.now() - timedelta(minutes=5))

    page = order_page(client, order)

    assert shown(page, "order-slow").startswith("This is taking longer than usual.")


def test_times_are_one_format_in_utc_until_the_viewers_zone_is_applied(client):
    order = OrderFactory(status=Order.Status.CONFIRMED)
    Order.objects.filter(pk=order.pk).update(created_at=datetime(2026, 12, 2, 14, 5, tzinfo=UTC))
    order.events.create(to_status="confirmed", note="stock reserved")
    client.force_login(order.owner)

    listing = html.unescape(client.get("/orders/").content.decode())

    assert (
        '<time datetime="2026-12-02T14:05:00+00:00" data-local="datetime" title="2026-12-02 14:05 UTC">'
        "2026-12-02 14:05 UTC</time>"
    ) in listing
    assert 'data-local="datetime"' in order_page(client, order)


# --- After the sale: expired, cancelled once paid, refunded --------------------------------------


def refunds_shown(page: str) -> list[tuple[str, str]]:
    """(amount, status) of each row of the receipt's refunds table, as shown."""
    table = re.search(r'<div id="refunds"[^>]*>.*?</div>', page, re.S)
    assert table, "no refunds table in the receipt"
    if re.search(r'<div id="refunds"[^>]*\shidden', table.group(0)):
        return []
    rows = re.findall(r'<td data-label="Amount">([^<]*)</td><td data-label="Status"><span[^>]*>([^<]*)</span>', page)
    return [(amount.strip(), status) for amount, status in rows]


def keeps_polling(page: str) -> bool:
    tag = re.search(r'<section class="card" id="order"[^>]*>', page)
    assert tag
    return 'data-terminal="0"' in tag.group(0)


def test_an_expired_order_says_it_was_not_paid_in_time_and_a_late_payment_comes_back(client, placed, settings):
    settings.PAYMENT_EXPIRY_SECONDS = 1800
    order = placed(1, run=False)
    process_order(order_id=order.pk)
    expire_order(order_id=order.pk)
    order.refresh_from_db()
    assert order.status == Order.Status.EXPIRED

    page = order_page(client, order)

    assert_unpaid(
        page,
        (
            "This order expired: it was not paid within 30 minutes. The items are no longer reserved for you. "
            "If a payment for it still goes through, it is refunded to your card automatically. To buy the items, "
            "place a new order. Place a new order"
        ),
    )
    assert not spinner_shown(page) and not keeps_polling(page)
    assert shown(page, "order-status") == "Expired"


def test_a_confirmed_order_says_how_long_its_items_stay_reserved(client, settings):
    settings.PAYMENT_EXPIRY_SECONDS = 900
    order = OrderFactory(status=Order.Status.CONFIRMED)

    assert "The items stay reserved for 15 minutes while the payment is taken." in shown(
        order_page(client, order), "order-state"
    )


def test_the_cancel_button_of_a_paid_order_says_it_refunds(client, paid):
    page = order_page(client, paid)

    assert shown(page, "cancel-form") == "Cancel and refund"
    assert shown(order_page(client, OrderFactory(status=Order.Status.CONFIRMED)), "cancel-form") == "Cancel order"


def test_cancelling_a_paid_order_from_its_page_refunds_it_and_the_page_follows_the_refund(
    client, paid, sandbox, django_capture_on_commit_callbacks
):
    # Given a paid order the warehouse does not have yet, when its shopper sends the page's cancel form,
    client.force_login(paid.owner)
    with django_capture_on_commit_callbacks(execute=False) as refund_task:
        response = client.post(f"/orders/{paid.pk}/cancel/", follow=True)

    # then it is cancelled, its whole charge claimed back, and the page says the money is on its way.
    paid.refresh_from_db()
    [refund] = Refund.objects.all()
    assert (paid.status, refund.status, refund.amount) == (Order.Status.CANCELLED, "requested", paid.total)
    page = html.unescape(response.content.decode())
    assert f"Order #{paid.pk} cancelled. €25.00 is being refunded to your card" in page
    assert shown(page, "order-state") == (
        "This order is cancelled, and your payment is being refunded in full. Nothing is sent, and nothing more "
        "to do: this page shows when the refund has gone through. Your bank may take a few business days to show "
        "it on your card."
    )
    assert "You have not been charged" not in shown(page, "order")
    assert refunds_shown(page) == [("€25.00 EUR", "Requested")]
    assert spinner_shown(page) and keeps_polling(page)
    assert shown(page, "cancel-form") == ""

    # When the provider has given it back, the page says so and stops following it.
    with django_capture_on_commit_callbacks(execute=True):
        for task in refund_task:
            task()
    page = order_page(client, paid)
    assert shown(page, "order-state") == (
        "This order is refunded: all of your payment went back to your card. Nothing more to do. Your bank may "
        "take a few business days to show it; the refunds are listed in the receipt below."
    )
    assert refunds_shown(page) == [("€25.00 EUR", "Succeeded")]
    assert not spinner_shown(page) and not keeps_polling(page)


def test_a_cancelled_paid_order_whose_refund_failed_says_staff_will_refund_it(client, paid):
    cancel_order(order_id=paid.pk, owner=paid.owner)
    Refund.objects.update(status=Refund.Status.FAILED)

    page = order_page(client, paid)

    assert shown(page, "order-state").endswith(
        "The refund could not be sent automatically. Our staff have been told and will refund you; if you contact "
        f"us, quote order #{paid.pk}."
    )
    assert refunds_shown(page) == [("€25.00 EUR", "Failed")]
    assert not spinner_shown(page) and not keeps_polling(page)


def test_a_partly_refunded_order_lists_its_refunds_and_the_units_given_back(
    client, fulfilled, django_capture_on_commit_callbacks
):
    mug = fulfilled.items.get(sku="MUG")
    with django_capture_on_commit_callbacks(execute=True):
        refund_order(order_id=fulfilled.pk, lines={str(mug.pk): 1})
    with django_capture_on_commit_callbacks(execute=True):
        refund_order(order_id=fulfilled.pk, amount="2.50")
    fulfilled.refresh_from_db()
    assert fulfilled.status == Order.Status.PARTIALLY_REFUNDED

    page = order_page(client, fulfilled)

    assert shown(page, "order-state") == (
        "Part of your payment was refunded to your card. Nothing more to do. The refunds are listed in the receipt "
        "below; your bank may take a few business days to show them."
    )
    assert refunds_shown(page) == [("€10.00 EUR", "Succeeded"), ("€2.50 EUR", "Succeeded")]
    assert "2 (1 refunded)" in shown(page, "order")
    assert shown(page, "order-status") == "Partially Refunded"


def test_the_order_list_names_the_new_statuses(client, user):
    for status in (Order.Status.EXPIRED, Order.Status.REFUNDED, Order.Status.PARTIALLY_REFUNDED):
        OrderFactory(owner=user, status=status)
    client.force_login(user)

    listing = html.unescape(client.get("/orders/").content.decode())

    for label, css in (("Expired", "expired"), ("Refunded", "refunded"), ("Partially Refunded", "partially_refunded")):
        assert f'<span class="status status-{css}">{label}</span>' in listing


def test_a_paid_order_cancelled_by_its_shopper_does_not_put_its_items_back_in_the_cart(client, paid):
    client.force_login(paid.owner)
    session = client.session
    session[HELD_KEY] = {"order": paid.pk, "lines": {"MUG": 2, "TEE": 1}}
    session.save()
    cancel_order(order_id=paid.pk, owner=paid.owner)

    cart = client.get("/orders/cart/")

    assert cart.context["cart"].lines == []
    assert "was not paid" not in html.unescape(cart.content.decode())
    assert HELD_KEY not in client.session
