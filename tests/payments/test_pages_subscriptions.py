"""The subscriptions page follows a charge live: its status endpoint (owner only) and the words of each state."""

import html
from datetime import UTC

import pytest

from payments.models import Payment, Subscription
from tests.factories import PlanFactory, SubscriptionFactory, UserFactory
from tests.orders.test_pages_order_states import VisibleText

pytestmark = pytest.mark.django_db


@pytest.fixture
def plan(db):
    return PlanFactory(code="basic", name="Basic box", price="9.00")


def subscriptions_page(client) -> str:
    response = client.get("/subscriptions/")
    assert response.status_code == 200
    return html.unescape(response.content.decode())


def row_words(page: str) -> str:
    return VisibleText.of(page, "subscriptions")


def status_of(client, subscription: Subscription):
    return client.get(f"/subscriptions/{subscription.pk}/status/")


def test_the_status_of_a_subscription_whose_first_charge_is_due_says_charging(client, user, plan):
    # Given a subscription whose first period is due and not yet charged (its task has not run)
    subscription = SubscriptionFactory(owner=user, plan=plan)
    client.force_login(user)

    # When the page and its status endpoint are read
    page = subscriptions_page(client)
    response = status_of(client, subscription)

    # Then both say the charge is under way, and the page polls that row
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert (body["id"], body["status"], body["charging"], body["payments"]) == (subscription.pk, "active", True, [])
    assert f'data-status-url="/subscriptions/{subscription.pk}/status/" data-settled="0"' in page
    assert "Taking this period's payment; this row updates by itself." in row_words(page)


def test_the_status_after_the_charge_has_the_payment_and_the_next_period(
    client, user, plan, sandbox, django_capture_on_commit_callbacks
):
    client.force_login(user)
    with django_capture_on_commit_callbacks(execute=True):
        client.post("/subscriptions/subscribe/", {"plan": "basic"})
    subscription = Subscription.objects.get(owner=user)
    payment = subscription.payments.get()

    body = status_of(client, subscription).json()
    page = subscriptions_page(client)

    assert body["charging"] is False
    assert body["current_period_end"] == subscription.current_period_end.isoformat() > body["current_period_start"]
    assert body["payments"] == [
        {
            "id": payment.pk,
            "status": "succeeded",
            "status_display": "Succeeded",
            "amount": "9.00",
            "currency": "EUR",
            "billing_period": payment.billing_period,
            "failure_reason": "",
            "created_at": payment.created_at.isoformat(),
        }
    ]
    assert 'data-settled="1"' in page
    assert "Paid up. The next payment is taken on the date shown." in row_words(page)
    assert "Taking this period's payment" not in row_words(page)


def test_a_declined_charge_says_what_happened_and_what_the_shopper_can_do(
    client, user, plan, sandbox, django_capture_on_commit_callbacks
):
    sandbox.set_faults(decline_rate=1.0)
    client.force_login(user)
    with django_capture_on_commit_callbacks(execute=True):
        client.post("/subscriptions/subscribe/", {"plan": "basic"})
    subscription = Subscription.objects.get(owner=user)
    assert subscription.status == Subscription.Status.PAST_DUE
    assert subscription.payments.get().status == Payment.Status.DECLINED

    body = status_of(client, subscription).json()
    words = row_words(subscriptions_page(client))

    assert (body["status"], body["charging"]) == ("past_due", False)
    assert "The last payment did not go through (see the payment history)." in words
    assert "you can cancel at any time" in words


def test_a_cancelled_subscription_says_nothing_more_is_charged(client, user, plan):
    subscription = SubscriptionFactory(owner=user, plan=plan, status=Subscription.Status.CANCELLED)
    client.force_login(user)

    body = status_of(client, subscription).json()
    words = row_words(subscriptions_page(client))

    assert (body["status"], body["charging"], body["can_cancel"]) == ("cancelled", False, False)
    assert "Cancelled: nothing more will be charged." in words


def test_another_users_subscription_status_is_404(client, user, plan):
    theirs = SubscriptionFactory(owner=UserFactory(), plan=plan)
    client.force_login(user)

    assert status_of(client, theirs).status_code == 404
    assert client.get("/subscriptions/999999/status/").status_code == 404


def test_the_status_endpoint_wants_a_signed_in_shopper_and_a_get(client, user, plan):
    subscription = SubscriptionFactory(owner=user, plan=plan)

    anonymous = status_of(client, subscription)
    client.force_login(user)

    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/accounts/login/")
    assert client.post(f"/subscriptions/{subscription.pk}/status/").status_code == 405


def test_payment_times_and_periods_have_one_format_with_a_utc_fallback(
    client, user, plan, sandbox, django_capture_on_commit_callbacks
):
    client.force_login(user)
    with django_capture_on_commit_callbacks(execute=True):
        client.post("/subscriptions/subscribe/", {"plan": "basic"})
    payment = Payment.objects.get(subscription__owner=user)

    page = subscriptions_page(client)

    created = payment.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M")
    assert f'data-local="datetime" title="{created} UTC">{created} UTC</time>' in page
    assert f'<time datetime="{payment.billing_period}" data-local="date">{payment.billing_period}</time>' in page
