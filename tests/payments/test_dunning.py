"""Failed-renewal recovery (payments/dunning.py): declined renewals tried again on a schedule, then cancelled.

Against the sandbox (in-process stub), eager tasks. The schedule is days apart: the clock is moved
(time-machine), never slept through.
"""

from datetime import UTC, datetime, timedelta

import pytest
from django.core import mail
from django.test import Client
from django.utils import timezone

from core import outbox
from core.models import OutboxItem
from notifications.models import Notification
from notifications.services import send_notification
from payments import dunning, services, tasks
from payments.models import Payment, PaymentMethod, Subscription
from tests.concurrency import run_concurrently
from tests.factories import PaymentMethodFactory, PlanFactory, SubscriptionFactory, UserFactory

pytestmark = pytest.mark.django_db

CHARGE_SUBSCRIPTION = "payments.tasks.charge_subscription"
SUCCEEDS, DECLINES = "4242424242424242", "4000000000000002"
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.fixture
def plan(db):
    return PlanFactory(code="basic", name="Basic", price="9.00")


@pytest.fixture
def past_due_clock(time_machine):
    """The clock at T0, the day the period is due; the test moves it."""
    time_machine.move_to(T0)
    return time_machine


def add_card(owner, number: str) -> PaymentMethod:
    return services.add_card(owner=owner, number=number, exp_month=12, exp_year=2040, cvc="123")


def due_subscription(owner, plan, card: PaymentMethod | None = None) -> Subscription:
    return SubscriptionFactory(owner=owner, plan=plan, current_period_start=T0.date(), payment_method=card)


def charge(subscription: Subscription, attempt: int = 1, *, capture) -> Payment | None:
    with capture(execute=True):
        return services.charge_subscription(
            subscription_id=subscription.pk, billing_period=T0.date().isoformat(), attempt=attempt
        )


def declined_once(owner, plan, sandbox, *, capture) -> Subscription:
    """A subscription due at T0 whose first try the sandbox declined; the sandbox goes on declining."""
    sandbox.set_faults(decline_rate=1.0)
    subscription = due_subscription(owner, plan)
    charge(subscription, capture=capture)
    return subscription


def sweep(capture) -> list[tuple[int, str, int]]:
    """The beat sweep, and the work it enqueues run at once (eager tasks after commit)."""
    with capture(execute=True):
        return services.retry_due_renewals()


def emails(kind: str) -> list[mail.EmailMessage]:
    sent = set(
        Notification.objects.filter(kind=kind, status=Notification.Status.SENT).values_list("subject", flat=True)
    )
    return [message for message in mail.outbox if message.subject in sent]


# --- The policy ---------------------------------------------------------------------------


def test_each_retry_is_counted_from_the_first_decline_and_the_last_decline_gives_up():
    schedule = (DAY, 3 * DAY, 7 * DAY)

    times = [dunning.next_retry_at(first_decline_at=T0, failed_attempts=n, schedule=schedule) for n in (1, 2, 3, 4)]

    assert times == [T0 + DAY, T0 + 3 * DAY, T0 + 7 * DAY, None]
    assert [dunning.is_last_attempt(n, schedule=schedule) for n in (1, 3, 4)] == [False, False, True]
    with pytest.raises(ValueError, match="at least 1"):
        dunning.next_retry_at(first_decline_at=T0, failed_attempts=0, schedule=schedule)


def test_the_schedule_is_read_from_the_settings(settings):
    settings.DUNNING_RETRY_DAYS = [0.5, 2.0]
    settings.DUNNING_RETRY_UNIT_SECONDS = 60

    assert dunning.retry_schedule() == (timedelta(seconds=30), timedelta(seconds=120))
    assert dunning.next_retry_at(first_decline_at=T0, failed_attempts=3) is None


# --- The two flows ----------------------------------------------------------------------------


def test_a_renewal_declined_twice_then_paid_on_the_third_try(
    user, plan, sandbox, past_due_clock, django_capture_on_commit_callbacks
):
    # Given a renewal the provider declines
    sandbox.set_faults(decline_rate=1.0)
    subscription = due_subscription(user, plan)
    first = charge(subscription, capture=django_capture_on_commit_callbacks)
    subscription.refresh_from_db()
    assert (first.status, subscription.status, subscription.failed_attempts) == ("declined", "past_due", 1)
    assert subscription.next_retry_at == first.updated_at + DAY
    assert sweep(django_capture_on_commit_callbacks) == []  # not due yet

    # When the sweep runs a day later (twice: the second finds nothing more to do), and declines again
    past_due_clock.move_to(T0 + DAY + timedelta(minutes=5))
    assert sweep(django_capture_on_commit_callbacks) == [(subscription.pk, T0.date().isoformat(), 2)]
    assert sweep(django_capture_on_commit_callbacks) == []
    subscription.refresh_from_db()
    assert (subscription.status, subscription.failed_attempts) == ("past_due", 2)
    # Counted from the first decline, not from this one.
    assert subscription.next_retry_at == first.updated_at + 3 * DAY

    # And on day 3 the card goes through
    past_due_clock.move_to(T0 + 3 * DAY + timedelta(minutes=5))
    sandbox.set_faults(decline_rate=0.0)
    assert sweep(django_capture_on_commit_callbacks) == [(subscription.pk, T0.date().isoformat(), 3)]

    # Then the period is paid by the third try, each try its own payment under its own key, charged once
    subscription.refresh_from_db()
    assert (subscription.status, subscription.failed_attempts, subscription.next_retry_at) == ("active", 0, None)
    assert subscription.current_period_start == T0.date() and subscription.current_period_end > T0.date()
    payments = list(subscription.payments.order_by("attempt").values_list("attempt", "status", "idempotency_key"))
    assert [(attempt, status) for attempt, status, _ in payments] == [
        (1, "declined"),
        (2, "declined"),
        (3, "succeeded"),
    ]
    keys = [key for _, _, key in payments]
    assert len(set(keys)) == 3
    assert [len(sandbox.charges(reference=key)) for key in keys] == [1, 1, 1]
    assert sandbox.summary()["charges"]["total"] == 3
    # One email per try: two declines, then the receipt; none saying it was cancelled
    assert len(emails(Notification.Kind.SUBSCRIPTION_DECLINED)) == 2
    assert len(emails(Notification.Kind.SUBSCRIPTION_CHARGED)) == 1
    assert not Notification.objects.filter(kind=Notification.Kind.SUBSCRIPTION_CANCELLED_UNPAID).exists()
    past_due_clock.move_to(T0 + 30 * DAY)
    assert sweep(django_capture_on_commit_callbacks) == []


def test_a_renewal_declined_to_the_end_is_cancelled_and_each_email_is_sent_once(
    user, plan, sandbox, past_due_clock, django_capture_on_commit_callbacks
):
    # Given a renewal declined at every try
    subscription = declined_once(user, plan, sandbox, capture=django_capture_on_commit_callbacks)

    # When the sweep runs every few hours for ten days
    dispatched = []
    for hours in range(0, 10 * 24, 6):
        past_due_clock.move_to(T0 + timedelta(hours=hours, minutes=1))
        dispatched += sweep(django_capture_on_commit_callbacks)

    # Then tries 2, 3 and 4 ran once each (on days 1, 3 and 7), and the last decline cancelled it
    period = T0.date().isoformat()
    assert dispatched == [(subscription.pk, period, 2), (subscription.pk, period, 3), (subscription.pk, period, 4)]
    subscription.refresh_from_db()
    assert (subscription.status, subscription.failed_attempts, subscription.next_retry_at) == ("cancelled", 4, None)
    last = subscription.payments.get(attempt=4)
    # Cancelled by the decline of the try on day 7 (the clock ticks: a few milliseconds later).
    assert timedelta(0) <= subscription.cancelled_at - last.updated_at < timedelta(seconds=5)
    assert last.updated_at.date() == (T0 + 7 * DAY).date()
    assert list(subscription.payments.order_by("attempt").values_list("attempt", "status")) == [
        (n, "declined") for n in (1, 2, 3, 4)
    ]
    assert sandbox.summary()["charges"]["total"] == 4
    # One declined email per try, the last one saying so, and one cancellation email
    declined = emails(Notification.Kind.SUBSCRIPTION_DECLINED)
    assert len(declined) == 4
    assert "That was the last try" in mail.outbox[-2].body or "That was the last try" in mail.outbox[-1].body
    [cancelled] = emails(Notification.Kind.SUBSCRIPTION_CANCELLED_UNPAID)
    assert cancelled.subject == "Your Basic subscription is cancelled: payment declined"
    assert "declined 4 times" in cancelled.body
    assert len(mail.outbox) == 5
    # And nothing more is billed or tried
    with django_capture_on_commit_callbacks(execute=True):
        assert services.bill_due_subscriptions(today=(T0 + 40 * DAY).date()) == []
    past_due_clock.move_to(T0 + 40 * DAY)
    assert sweep(django_capture_on_commit_callbacks) == []
    assert charge(subscription, 5, capture=django_capture_on_commit_callbacks) is None


def test_the_declined_email_says_when_the_next_try_is_and_links_to_changing_the_card(
    user, plan, sandbox, past_due_clock, settings, django_capture_on_commit_callbacks
):
    settings.SHOP_URL = "https://shop.example"
    sandbox.set_faults(decline_rate=1.0)
    subscription = due_subscription(user, plan)

    charge(subscription, capture=django_capture_on_commit_callbacks)

    [message] = mail.outbox
    subscription.refresh_from_db()
    assert message.subject == "Your Basic subscription: payment declined"
    assert f"tried again on {subscription.next_retry_at:%-d %B %Y, %H:%M} UTC" in message.body
    assert "https://shop.example/subscriptions/" in message.body
    assert 'href="https://shop.example/subscriptions/"' in message.alternatives[0][0]


@pytest.mark.parametrize("kind", [kind for kind, _ in Notification.Kind.choices if kind.startswith("subscription_")])
def test_every_subscription_email_renders_with_the_plan_name(kind, user, plan):
    subscription = due_subscription(user, plan)
    payment = Payment.objects.create(
        subscription=subscription, billing_period=T0.date().isoformat(), amount=plan.price, idempotency_key="pay_x"
    )
    by_subscription = kind == Notification.Kind.SUBSCRIPTION_CANCELLED_UNPAID
    notification = Notification.objects.create(
        kind=kind,
        object_type="subscription" if by_subscription else "payment",
        object_id=subscription.pk if by_subscription else payment.pk,
        recipient=user,
    )

    send_notification(notification_id=notification.pk)

    [message] = mail.outbox
    assert "Basic" in message.subject
    assert "Basic" in message.body and message.alternatives


# --- Each try once ------------------------------------------------------------------------------


def test_a_retry_delivered_twice_charges_once(user, plan, sandbox, past_due_clock, django_capture_on_commit_callbacks):
    subscription = declined_once(user, plan, sandbox, capture=django_capture_on_commit_callbacks)

    first = charge(subscription, 2, capture=django_capture_on_commit_callbacks)
    again = charge(subscription, 2, capture=django_capture_on_commit_callbacks)

    assert again.pk == first.pk and first.attempt == 2
    assert subscription.payments.filter(attempt=2).count() == 1
    assert len(sandbox.charges(reference=first.idempotency_key)) == 1
    subscription.refresh_from_db()
    assert subscription.failed_attempts == 2
    assert len(emails(Notification.Kind.SUBSCRIPTION_DECLINED)) == 2


def test_a_retry_that_is_no_longer_the_next_try_charges_nothing(
    user, plan, sandbox, past_due_clock, django_capture_on_commit_callbacks
):
    subscription = declined_once(user, plan, sandbox, capture=django_capture_on_commit_callbacks)

    # A try that skips one, or one for an active subscription, claims nothing
    assert charge(subscription, 3, capture=django_capture_on_commit_callbacks) is None
    sandbox.set_faults(decline_rate=0.0)
    assert charge(subscription, 2, capture=django_capture_on_commit_callbacks).status == "succeeded"
    assert charge(subscription, 3, capture=django_capture_on_commit_callbacks) is None
    # A cancelled subscription's try claims nothing either
    services.cancel_subscription(subscription_id=subscription.pk, owner=user)
    assert charge(subscription, 3, capture=django_capture_on_commit_callbacks) is None
    assert list(subscription.payments.order_by("attempt").values_list("attempt", flat=True)) == [1, 2]
    assert sandbox.summary()["charges"]["total"] == 2


def test_the_task_still_takes_the_two_argument_messages_already_queued(user, plan, sandbox, past_due_clock):
    subscription = due_subscription(user, plan)

    assert tasks.charge_subscription.apply(args=[subscription.pk, T0.date().isoformat()]).get() == "succeeded"

    assert subscription.payments.get().attempt == 1


def test_bill_due_and_the_retry_sweep_never_enqueue_the_same_try(
    user, plan, sandbox, past_due_clock, django_capture_on_commit_callbacks
):
    subscription = declined_once(user, plan, sandbox, capture=django_capture_on_commit_callbacks)
    past_due_clock.move_to(T0 + 2 * DAY)

    with django_capture_on_commit_callbacks(execute=False):
        billed = services.bill_due_subscriptions(today=(T0 + 2 * DAY).date())
        retried = services.retry_due_renewals()

    assert billed == []  # past due: the first try is behind it
    assert retried == [(subscription.pk, T0.date().isoformat(), 2)]
    assert list(OutboxItem.objects.filter(task_name=CHARGE_SUBSCRIPTION).values_list("args", flat=True)) == [
        [subscription.pk, T0.date().isoformat(), 2]
    ]


def test_a_try_that_ended_without_a_decline_is_left_to_staff_and_not_enqueued_again(
    user, plan, sandbox, past_due_clock, django_capture_on_commit_callbacks, dead_letters_forgotten
):
    subscription = declined_once(user, plan, sandbox, capture=django_capture_on_commit_callbacks)
    past_due_clock.move_to(T0 + 2 * DAY)
    with django_capture_on_commit_callbacks(execute=False):
        [(_, period, attempt)] = services.retry_due_renewals()
    item = OutboxItem.objects.get(task_name=CHARGE_SUBSCRIPTION, args=[subscription.pk, period, attempt])
    # The try's task claimed its payment, then failed for good (the provider away for its whole retry window)
    Payment.objects.create(
        subscription=subscription, billing_period=period, attempt=2, amount=plan.price, idempotency_key="pay_lost"
    )
    failed, parked = outbox.finish_failed(task_id=str(item.task_id), reason="ProviderUnavailable: HTTP 503")
    outbox.work_failed.send(sender=OutboxItem, item=failed, reason="ProviderUnavailable", by_relay=False, parked=parked)

    assert subscription.payments.get(attempt=2).status == Payment.Status.NEEDS_ATTENTION
    assert subscription.payments.get(attempt=1).status == Payment.Status.DECLINED
    with django_capture_on_commit_callbacks(execute=False):
        assert services.retry_due_renewals() == []


# --- Changing the card --------------------------------------------------------------------------


def test_changing_the_card_of_a_past_due_subscription_tries_again_at_once_and_once(
    user, plan, sandbox, past_due_clock, django_capture_on_commit_callbacks
):
    # Given a renewal declined by the subscription's card
    subscription = due_subscription(user, plan, add_card(user, DECLINES))
    charge(subscription, capture=django_capture_on_commit_callbacks)
    good = add_card(user, SUCCEEDS)

    # When the owner picks another card, twice (a double submit), hours before the scheduled retry
    past_due_clock.move_to(T0 + timedelta(hours=2))
    with django_capture_on_commit_callbacks(execute=True):
        services.set_subscription_payment_method(owner=user, subscription_id=subscription.pk, payment_method_id=good.pk)
        services.set_subscription_payment_method(owner=user, subscription_id=subscription.pk, payment_method_id=good.pk)

    # Then the second try ran at once, on the new card, once
    items = OutboxItem.objects.filter(task_name=CHARGE_SUBSCRIPTION)
    assert list(items.values_list("args", flat=True)) == [[subscription.pk, T0.date().isoformat(), 2]]
    retry = subscription.payments.get(attempt=2)
    assert (retry.status, retry.payment_method_id) == ("succeeded", good.pk)
    subscription.refresh_from_db()
    assert (subscription.status, subscription.payment_method_id, subscription.next_retry_at) == (
        "active",
        good.pk,
        None,
    )
    assert sandbox.summary()["charges"]["total"] == 2


@pytest.mark.django_db(transaction=True)
def test_two_card_changes_at_the_same_moment_try_again_once(sandbox, time_machine):
    time_machine.move_to(T0)
    owner = UserFactory()
    plan = PlanFactory(code="conc-dunning", price="9.00")
    subscription = due_subscription(owner, plan, add_card(owner, DECLINES))
    sandbox.set_faults(decline_rate=1.0)
    services.charge_subscription(subscription_id=subscription.pk, billing_period=T0.date().isoformat())
    good = add_card(owner, SUCCEEDS)
    sandbox.set_faults(latency_ms=200)  # the first retry is still charging while the others commit

    run_concurrently(
        4,
        lambda _: services.set_subscription_payment_method(
            owner=owner, subscription_id=subscription.pk, payment_method_id=good.pk
        ),
    )

    assert OutboxItem.objects.filter(task_name=CHARGE_SUBSCRIPTION, args__2=2).count() == 1
    assert subscription.payments.filter(attempt=2).count() <= 1
    assert subscription.payments.count() <= 2


def test_changing_the_card_of_an_active_subscription_charges_nothing(user, plan, django_capture_on_commit_callbacks):
    subscription = due_subscription(user, plan)
    card = PaymentMethodFactory(owner=user)

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        changed = services.set_subscription_payment_method(
            owner=user, subscription_id=subscription.pk, payment_method_id=card.pk
        )

    assert (changed.payment_method_id, changed.status) == (card.pk, "active")
    assert callbacks == [] and not OutboxItem.objects.exists()


def test_the_api_sets_the_card_and_answers_404_for_anyone_elses(user, other_user, plan, api_client, past_due_clock):
    subscription = due_subscription(user, plan)
    mine, theirs = PaymentMethodFactory(owner=user), PaymentMethodFactory(owner=other_user)
    removed = PaymentMethodFactory(owner=user, removed_at=timezone.now())
    someone_elses = due_subscription(other_user, plan)

    def put(subscription_id: int, card_id: object):
        return api_client.put(f"/api/subscriptions/{subscription_id}/payment-method/{card_id}/")

    ok = put(subscription.pk, mine.pk)
    other_card, removed_card, other_subscription = (
        put(subscription.pk, theirs.pk),
        put(subscription.pk, removed.pk),
        put(someone_elses.pk, mine.pk),
    )
    bad = put(subscription.pk, "one")
    forged = Client(enforce_csrf_checks=True)
    forged.force_login(user)
    without_csrf = forged.put(f"/api/subscriptions/{subscription.pk}/payment-method/{mine.pk}/")

    assert ok.status_code == 200, ok.content
    assert ok.json() == {
        "id": subscription.pk,
        "plan": "basic",
        "status": "active",
        "payment_method_id": mine.pk,
        "current_period_end": T0.date().isoformat(),
        "failed_attempts": 0,
        "next_retry_at": None,
    }
    assert [answer.status_code for answer in (other_card, removed_card, other_subscription)] == [404, 404, 404]
    assert other_card.json() == other_subscription.json() == {"detail": "not found"}
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"][-1] == "payment_method_id"
    assert without_csrf.status_code == 403
    someone_elses.refresh_from_db()
    assert someone_elses.payment_method_id is None
    subscription.refresh_from_db()
    assert subscription.payment_method_id == mine.pk


def test_the_api_refuses_a_cancelled_subscription_with_409(user, plan, api_client):
    subscription = due_subscription(user, plan)
    services.cancel_subscription(subscription_id=subscription.pk, owner=user)
    card = PaymentMethodFactory(owner=user)

    answer = api_client.put(f"/api/subscriptions/{subscription.pk}/payment-method/{card.pk}/")

    assert answer.status_code == 409
    assert answer.json()["detail"][0]["type"] == "subscription_cancelled"
    subscription.refresh_from_db()
    assert subscription.payment_method_id is None


def test_the_api_retries_a_past_due_subscription_once_when_sent_twice(
    user, plan, sandbox, api_client, past_due_clock, django_capture_on_commit_callbacks
):
    subscription = due_subscription(user, plan, add_card(user, DECLINES))
    charge(subscription, capture=django_capture_on_commit_callbacks)
    good = add_card(user, SUCCEEDS)
    url = f"/api/subscriptions/{subscription.pk}/payment-method/{good.pk}/"

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        first, second = api_client.put(url), api_client.put(url)
    for callback in callbacks:
        callback()

    assert (first.status_code, second.status_code) == (200, 200)
    assert first.json()["status"] == "past_due"  # the retry follows the commit
    assert OutboxItem.objects.filter(task_name=CHARGE_SUBSCRIPTION, args__2=2).count() == 1
    subscription.refresh_from_db()
    assert (subscription.status, subscription.payments.get(attempt=2).status) == ("active", "succeeded")


def test_the_page_form_changes_the_card_and_retries_a_past_due_subscription(
    user, plan, sandbox, past_due_clock, django_capture_on_commit_callbacks
):
    subscription = due_subscription(user, plan, add_card(user, DECLINES))
    charge(subscription, capture=django_capture_on_commit_callbacks)
    good = add_card(user, SUCCEEDS)
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    page = browser.get("/subscriptions/")
    assert f'action="/subscriptions/{subscription.pk}/card/"' in page.content.decode()
    assert "Pay now with this card" in page.content.decode()
    url = f"/subscriptions/{subscription.pk}/card/"

    forged = browser.post(url, {"payment_method": good.pk})
    with django_capture_on_commit_callbacks(execute=True):
        answer = browser.post(url, {"payment_method": good.pk, "csrfmiddlewaretoken": page.context["csrf_token"]})

    assert forged.status_code == 403
    assert answer.status_code == 302
    subscription.refresh_from_db()
    assert (subscription.status, subscription.payment_method_id) == ("active", good.pk)
    assert subscription.payments.get(attempt=2).status == "succeeded"


def test_the_page_form_answers_404_for_another_owners_card_or_subscription(user, other_user, plan, client):
    subscription = due_subscription(user, plan)
    theirs = PaymentMethodFactory(owner=other_user)
    someone_elses = due_subscription(other_user, plan)
    mine = PaymentMethodFactory(owner=user)
    client.force_login(user)

    assert client.post(f"/subscriptions/{subscription.pk}/card/", {"payment_method": theirs.pk}).status_code == 404
    assert client.post(f"/subscriptions/{someone_elses.pk}/card/", {"payment_method": mine.pk}).status_code == 404
    assert Subscription.objects.filter(payment_method__isnull=False).count() == 0


def test_staff_see_the_declined_tries_and_the_next_one_in_the_admin(
    client, user, plan, sandbox, past_due_clock, django_capture_on_commit_callbacks
):
    subscription = due_subscription(user, plan, add_card(user, "4000000000000002"))
    charge(subscription, capture=django_capture_on_commit_callbacks)
    subscription.refresh_from_db()
    assert subscription.failed_attempts == 1 and subscription.next_retry_at is not None
    client.force_login(UserFactory(is_staff=True, is_superuser=True))

    listing = client.get("/admin/payments/subscription/").content.decode()
    page = client.get(f"/admin/payments/subscription/{subscription.pk}/change/").content.decode()

    assert "Failed attempts" in listing and "Next retry at" in listing
    assert "Failed attempts" in page and "Next retry at" in page
    assert "Past Due" in listing
