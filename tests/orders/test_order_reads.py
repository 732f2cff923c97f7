"""An order is read as of one moment: its row and the rows read after it (payment, refunds, history) agree.

PostgreSQL's default isolation gives each statement its own snapshot. The order page and the API read the
order's row, then its relations a moment later; a refund that succeeded in between (its row and the order's
status commit together) was read as done beside the status from before it. The browser test of a shopper's
cancel failed in CI this way: the page showed "Cancelled" with a succeeded refund and, seeing nothing on its
way, never looked again. Here another connection commits between the two reads.
"""

import html
import os
import re
import subprocess
import sys
import textwrap
from decimal import Decimal

import pytest
from django.db import connection, connections

from config.celery import app
from orders.models import Order
from payments.models import Refund
from tests.after_sale import bearer
from tests.factories import OrderFactory, PaymentFactory, RefundFactory
from tests.stack import REPO_ROOT

pytestmark = pytest.mark.django_db(transaction=True)


def refund_succeeds_between_the_reads(order: Order, *, after_commit: bool = False):
    """An execute wrapper: just before the request reads the order's refunds, another connection commits the
    refund's success (the refund's row and the order's status, as `payments.tasks.refund_payment` does)."""
    # after_commit: only reads outside a transaction, that is after the request's own writes committed (inside them
    # the refund it claims is not committed and the order's row is locked by it).
    done: list[bool] = []

    def wrapper(execute, sql, params, many, context):
        if (
            sql.startswith("SELECT")
            and '"payments_refund"' in sql
            and not done
            and not (after_commit and connection.in_atomic_block)
        ):
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


def test_the_order_list_answers_each_status_with_the_refunds_it_belongs_to(cancelled):
    wrapper, done = refund_succeeds_between_the_reads(cancelled)

    with connection.execute_wrapper(wrapper):
        [shown] = bearer(cancelled.owner).get("/api/orders/").json()["items"]

    assert done
    assert (shown["status"], [refund["status"] for refund in shown["refunds"]]) == ("cancelled", ["requested"])


def test_the_cancel_answer_shows_the_status_its_refunds_belong_to(user, monkeypatch):
    # The refund task is published (memory broker), not run: the answer is read while it could be running.
    monkeypatch.setitem(app.conf, "task_always_eager", False)
    order = OrderFactory(owner=user, status=Order.Status.PAID, total=Decimal("25.00"))
    PaymentFactory(order=order, amount=order.total)
    wrapper, done = refund_succeeds_between_the_reads(order, after_commit=True)

    with connection.execute_wrapper(wrapper):
        body = bearer(user).post(f"/api/orders/{order.pk}/cancel/").json()

    # What it shows of its refunds is read before its commit, under the order's lock: no refund can finish meanwhile
    # (before, they were read after it, and one that succeeded in between was shown beside "cancelled").
    assert not done
    assert (body["status"], [refund["status"] for refund in body["refunds"]]) == ("cancelled", ["requested"])


SQLITE_READER = textwrap.dedent(
    """
    import sqlite3
    import django
    django.setup()
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import connection
    from orders import selectors
    from orders.models import Order
    call_command("migrate", verbosity=0)
    user = User.objects.create(username="reader")
    order = Order.objects.create(owner=user, total=1)
    settings.DATABASES["default"]["OPTIONS"]["timeout"] = 1
    connection.close()
    writer = sqlite3.connect(settings.DATABASES["default"]["NAME"], isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a worker's write transaction under way
    writer.execute("UPDATE orders_order SET hold_reason = hold_reason")
    assert selectors.order_get_for(owner=user, order_id=order.pk).pk == order.pk
    writer.execute("ROLLBACK")
    print("read-ok")
    """
)


@pytest.mark.process
def test_reading_an_order_on_sqlite_waits_for_no_writer(tmp_path):
    # make run's SQLite begins its transactions IMMEDIATE (a write lock): a snapshot taken so made every order page
    # and status poll wait for the workers' writes, and fail after the busy timeout.
    env = {
        "PATH": os.environ["PATH"],
        "DJANGO_SETTINGS_MODULE": "config.settings.base",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "SECRET_KEY": "test-only-" + "k" * 50,
        "DEBUG": "true",
        "VAR_DIR": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-c", SQLITE_READER], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert "read-ok" in done.stdout, done.stderr[-2000:]
