"""The flush that ends each transactional test is one DELETE a table (tests/conftest.py `_flush_by_delete`)."""

import pytest
from django.core.management import call_command
from django.core.management.color import no_style
from django.db import connection

from orders.models import Order, OrderItem, Product
from tests.factories import OrderFactory, OrderItemFactory, UserFactory


def test_every_foreign_key_waits_for_the_commit(transactional_db):
    """A key checked at once would refuse a DELETE of its target before its own rows are gone. On the migrated
    schema (a transactional test: out of the unit tier, whose databases are built from the models), the one the
    DELETE flush meets."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT conname FROM pg_constraint WHERE contype = 'f' AND NOT (condeferrable AND condeferred)")
        immediate = [name for (name,) in cursor.fetchall()]
    assert immediate == []


@pytest.mark.django_db(transaction=True)
def test_the_flush_deletes_rows_that_refer_to_each_other_in_any_order():
    item = OrderItemFactory(order=OrderFactory(owner=UserFactory()))
    assert connection.ops.sql_flush(no_style(), ["orders_order"]) == [
        'LOCK TABLE "orders_order" IN ACCESS EXCLUSIVE MODE;',
        'DELETE FROM "orders_order";',
    ]

    call_command("flush", interactive=False, verbosity=0)

    assert not Order.objects.exists() and not OrderItem.objects.exists()
    assert not Product.objects.filter(pk=item.product_id).exists()
