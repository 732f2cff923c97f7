"""The Notification table's own invariant: one row per kind and object."""

import pytest
from django.db import IntegrityError, transaction

from notifications.models import Notification
from tests.factories import NotificationFactory, UserFactory

pytestmark = pytest.mark.django_db


def test_second_notification_for_the_same_kind_and_object_is_refused_by_the_database():
    first = NotificationFactory()

    with pytest.raises(IntegrityError), transaction.atomic():
        # Another recipient does not make it a different notification.
        Notification.objects.create(
            recipient=UserFactory(), kind=first.kind, object_type=first.object_type, object_id=first.object_id
        )

    assert Notification.objects.count() == 1


def test_other_kind_for_the_same_object_is_another_notification():
    confirmed = NotificationFactory()

    paid = NotificationFactory(
        kind=Notification.Kind.ORDER_PAID, recipient=confirmed.recipient, object_id=confirmed.object_id
    )

    assert paid.pk != confirmed.pk
