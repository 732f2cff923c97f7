import pytest
from django.db import IntegrityError
from payments import services
from payments.models import Plan, Subscription
from tests.factories import UserFactory
from tests.orders.test_concurrency import run_at_once

HITS = []

@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("n", range(8))
def test_race(n, sandbox):
    Plan.objects.create(code="basic", name="Basic box", price="9.00")
    owner = UserFactory()
    real = Subscription.objects.create
    def create(*a, **k):
        try:
            return real(*a, **k)
        except IntegrityError:
            HITS.append(n)
            raise
    from unittest import mock
    with mock.patch.object(type(Subscription.objects), "create", side_effect=create, autospec=False):
        run_at_once(2, lambda i: services.subscribe(owner=owner, plan_code="basic"))
    print("HITS", HITS)
