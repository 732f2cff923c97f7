"""An order is read as of one moment: its row and the rows read after it (payment, refunds, history) agree.

PostgreSQL's default isolation gives each statement its own snapshot. The order page and the API read the
order's row, then its relations a moment later; a refund that succeeded in between (its row and the order's
status commit together) was read as done beside the status from before it. The browser test of a shopper's
cancel failed in CI this way: the page showed "Cancelled" with a succeeded refund and, seeing nothing on its
way, never looked again. Here another connection commits between the two reads.
"""

import html
import re
from decimal import Decimal

import pytest
from django.db import connection, connections

from orders.models import Order
from payments.models import Refund
from tests.after_sale import bearer
from tests.factories import OrderFactory, PaymentFactory, RefundFactory

pytestmark = pytest.mark.django_db(transaction=True)


def refund_succeeds_between_the_reads(order: Order):
    """An execute wrapper: just before the request reads the order's refunds, another connection commits the
    refund's success (the refund's row and the order's status, as `payments.tasks.refund_payment` does)."""
    done: list[bool] = []

    def wrapper(execute, sql, params, many, context):
        if '"payments_refund"' in sql and not done:
            done.append(True)
            other = connections.create_connection("default")
            try:
                with other.cursor() as cursor:
                    cursor.execute("BEGIN")
                    cursor.execute("UPDATE payments_refund SET status = 'succeeded'")
                    cursor.execute("UPDATE orders_order SET status = 'refunded' WHERE id = %s", [order.pk])
                    cursor.execute("COMMIT")
            finally:
                other.close()
        return execute(sql, params, many, context)

    return wrapper, done


@pytest.fixture
def cancelled(user) -> Order:
    """A paid order its shopper cancelled: its refund is on its way (rows made directly: no task runs)."""
    order = OrderFactory(owner=user, status=Order.Status.CANCELLED, total=Decimal("25.00"))
    payment = PaymentFactory(order=order, amount=order.total)
    RefundFactory(payment=payment, amount=order.total)
    assert Refund.objects.get().status == Refund.Status.REQUESTED
    return order


def test_the_order_page_shows_the_status_its_refunds_belong_to_and_follows_one_on_its_way(client, cancelled):
    wrapper, done = refund_succeeds_between_the_reads(cancelled)
    client.force_login(cancelled.owner)

    with connection.execute_wrapper(wrapper):
        response = client.get(f"/orders/{cancelled.pk}/")

    assert done and response.status_code == 200
    page = html.unescape(response.content.decode())
    status = re.search(r'<span id="order-status"[^>]*>([^<]*)</span>', page)
    refund = re.search(r'<td data-label="Status"><span[^>]*>([^<]*)</span>', page)
    assert status and refund
    # As of the moment before the refund succeeded: still on its way, so the page's script follows the order.
    assert (status.group(1).strip(), refund.group(1)) == ("Cancelled", "Requested")
    assert 'data-terminal="0"' in page
    assert Order.objects.get(pk=cancelled.pk).status == Order.Status.REFUNDED


def test_the_api_answers_the_status_its_refunds_belong_to(cancelled):
    wrapper, done = refund_succeeds_between_the_reads(cancelled)
    client = bearer(cancelled.owner)

    with connection.execute_wrapper(wrapper):
        body = client.get(f"/api/orders/{cancelled.pk}/").json()

    assert done
    assert (body["status"], [refund["status"] for refund in body["refunds"]]) == ("cancelled", ["requested"])
    body = client.get(f"/api/orders/{cancelled.pk}/").json()
    assert (body["status"], [refund["status"] for refund in body["refunds"]]) == ("refunded", ["succeeded"])
