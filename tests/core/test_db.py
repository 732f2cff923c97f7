"""core.db.insert_unless_exists: one statement, no savepoint, and the caller's transaction survives a conflict."""

import pytest
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext

from core.db import insert_unless_exists
from notifications.models import Notification
from notifications.services import notify
from tests.factories import OrderFactory, UserFactory

pytestmark = pytest.mark.django_db

UNIQUE = ("kind", "object_type", "object_id")


def a_notification(user, object_id: int = 7) -> Notification:
    return Notification(kind="order_paid", object_type="order", object_id=object_id, recipient_id=user.pk)


def test_a_new_row_is_inserted_in_one_statement_with_its_primary_key_and_defaults():
    user = UserFactory()
    notification = a_notification(user)
    with CaptureQueriesContext(connection) as queries:
        assert insert_unless_exists(notification, unique=UNIQUE) is True
    assert len(queries.captured_queries) == 1
    assert "ON CONFLICT" in queries.captured_queries[0]["sql"]
    stored = Notification.objects.get(pk=notification.pk)
    assert (stored.status, stored.recipient_id, stored.subject) == ("pending", user.pk, "")
    assert stored.created_at is not None and notification._state.adding is False


def test_an_existing_row_is_left_alone_and_the_callers_transaction_goes_on():
    user = UserFactory()
    first = a_notification(user)
    insert_unless_exists(first, unique=UNIQUE)
    with transaction.atomic():
        second = a_notification(UserFactory())
        assert insert_unless_exists(second, unique=UNIQUE) is False
        assert second.pk is None
        # No error was raised inside the transaction: it can still be used (no savepoint needed).
        assert Notification.objects.count() == 1
    assert Notification.objects.get().recipient_id == user.pk


def test_any_other_integrity_error_is_raised():
    with pytest.raises(IntegrityError), transaction.atomic():
        insert_unless_exists(a_notification(UserFactory(), object_id=-1), unique=UNIQUE)  # a check constraint


def test_notify_inside_an_order_transaction_takes_two_statements_and_no_savepoint():
    order = OrderFactory()
    with transaction.atomic(), CaptureQueriesContext(connection) as queries:
        notify(kind="order_paid", object_type="order", object_id=order.pk, recipient_id=order.owner_id)
        again = notify(kind="order_paid", object_type="order", object_id=order.pk, recipient_id=order.owner_id)
    statements = [query["sql"].split()[0] for query in queries.captured_queries]
    assert statements == ["INSERT", "INSERT", "INSERT", "SELECT"], statements  # the row, its outbox item; then a read
    assert again.kind == "order_paid" and Notification.objects.count() == 1
