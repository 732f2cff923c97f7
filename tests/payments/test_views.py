import pytest

from payments.models import Subscription
from tests.factories import PlanFactory, SubscriptionFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def plan(db):
    return PlanFactory(code="basic", name="Basic box", price="9.00")


def test_shopper_subscribes_and_sees_the_first_payment(client, user, plan, sandbox, django_capture_on_commit_callbacks):
    client.force_login(user)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/subscriptions/subscribe/", {"plan": "basic"})
    assert response.status_code == 302
    page = client.get("/subscriptions/").content.decode()
    assert "Basic box" in page and "Succeeded" in page and "€9.00" in page
    assert Subscription.objects.get(owner=user).status == "active"


def test_a_double_submitted_subscribe_answers_with_the_first_subscription(
    client, user, plan, sandbox, django_capture_on_commit_callbacks
):
    client.force_login(user)
    with django_capture_on_commit_callbacks(execute=True):
        first = client.post("/subscriptions/subscribe/", {"plan": "basic"}, follow=True)
    subscription = Subscription.objects.get(owner=user)

    with django_capture_on_commit_callbacks(execute=True):
        second = client.post("/subscriptions/subscribe/", {"plan": "basic"}, follow=True)

    assert first.status_code == second.status_code == 200
    assert [message.level_tag for message in first.context["messages"]] == ["success"]
    assert [message.level_tag for message in second.context["messages"]] == ["info"]
    assert list(second.context["subscriptions"]) == [subscription]
    page = second.content.decode()
    assert "Nothing more was charged." in page
    assert "flash-error" not in page
    assert f"/subscriptions/{subscription.pk}/cancel/" in page
    assert subscription.payments.get().status == "succeeded"


@pytest.mark.parametrize("plan_code", ["", "nope", "x" * 500, "basic\x00"])
def test_subscribing_to_an_unknown_plan_is_refused(client, user, plan, plan_code):
    client.force_login(user)
    response = client.post("/subscriptions/subscribe/", {"plan": plan_code}, follow=True)
    assert response.status_code == 200
    assert "unknown plan" in response.content.decode()
    assert Subscription.objects.count() == 0


def test_shopper_cancels_own_subscription_but_not_anothers(client, user, other_user, plan):
    mine = SubscriptionFactory(
        owner=user, plan=plan, current_period_start="2026-01-01", current_period_end="2026-02-01"
    )
    theirs = SubscriptionFactory(
        owner=other_user, plan=plan, current_period_start="2026-01-01", current_period_end="2026-02-01"
    )
    client.force_login(user)
    assert client.post(f"/subscriptions/{theirs.pk}/cancel/").status_code == 404
    assert client.post(f"/subscriptions/{mine.pk}/cancel/").status_code == 302
    mine.refresh_from_db()
    theirs.refresh_from_db()
    assert (mine.status, theirs.status) == ("cancelled", "active")


def test_subscription_pages_require_login(client):
    assert client.get("/subscriptions/").status_code == 302
    assert client.post("/subscriptions/subscribe/", {"plan": "basic"}).status_code == 302


def test_other_users_payments_are_not_listed(
    client, user, other_user, plan, sandbox, django_capture_on_commit_callbacks
):
    from payments import services

    with django_capture_on_commit_callbacks(execute=True):
        services.subscribe(owner=other_user, plan_code="basic")
    client.force_login(user)
    page = client.get("/subscriptions/").content.decode()
    assert "No payments yet." in page and "No subscriptions." in page
