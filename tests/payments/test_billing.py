"""Billing periods keep their anchor day, and a period has exactly one spelling."""

import calendar
from datetime import date

import hypothesis
import pytest
from hypothesis import strategies as st

from payments import services
from payments.billing import InvalidBillingPeriod, next_period_start, parse_billing_period, period_start
from payments.models import Payment, Plan
from tests.factories import PlanFactory, SubscriptionFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def monthly(db):
    return PlanFactory(code="monthly", name="Monthly", price="9.00", interval=Plan.Interval.MONTH)


@pytest.fixture
def yearly(db):
    return PlanFactory(code="yearly", name="Yearly", price="90.00", interval=Plan.Interval.YEAR)


def test_monthly_periods_from_the_31st_fall_on_the_last_day_of_shorter_months():
    starts = [period_start(date(2026, 1, 31), "month", n) for n in range(13)]
    assert starts == [
        date(2026, 1, 31),
        date(2026, 2, 28),
        date(2026, 3, 31),
        date(2026, 4, 30),
        date(2026, 5, 31),
        date(2026, 6, 30),
        date(2026, 7, 31),
        date(2026, 8, 31),
        date(2026, 9, 30),
        date(2026, 10, 31),
        date(2026, 11, 30),
        date(2026, 12, 31),
        date(2027, 1, 31),
    ]


def test_next_period_start_walks_the_31st_without_drifting():
    anchor = date(2026, 1, 31)
    walked = [anchor]
    for _ in range(12):
        walked.append(next_period_start(anchor, "month", walked[-1]))
    assert walked == [period_start(anchor, "month", n) for n in range(13)]


def test_monthly_from_the_30th_goes_back_to_the_30th_after_february():
    anchor = date(2026, 1, 30)
    feb = next_period_start(anchor, "month", anchor)
    assert (feb, next_period_start(anchor, "month", feb)) == (date(2026, 2, 28), date(2026, 3, 30))


def test_monthly_from_the_31st_uses_february_29th_in_a_leap_year():
    anchor = date(2028, 1, 31)
    assert [period_start(anchor, "month", n) for n in range(4)] == [
        date(2028, 1, 31),
        date(2028, 2, 29),
        date(2028, 3, 31),
        date(2028, 4, 30),
    ]


def test_yearly_from_february_29th_returns_to_it_in_leap_years():
    anchor = date(2024, 2, 29)
    walked = [anchor]
    for _ in range(8):
        walked.append(next_period_start(anchor, "year", walked[-1]))
    assert walked == [
        date(2024, 2, 29),
        date(2025, 2, 28),
        date(2026, 2, 28),
        date(2027, 2, 28),
        date(2028, 2, 29),
        date(2029, 2, 28),
        date(2030, 2, 28),
        date(2031, 2, 28),
        date(2032, 2, 29),
    ]


def test_next_period_start_from_a_date_off_the_schedule_is_the_next_scheduled_start():
    assert next_period_start(date(2026, 1, 31), "month", date(2026, 3, 15)) == date(2026, 3, 31)


def test_next_period_start_before_the_anchor_is_refused():
    with pytest.raises(ValueError):
        next_period_start(date(2026, 1, 31), "month", date(2026, 1, 30))


def test_unknown_interval_is_refused():
    with pytest.raises(ValueError):
        period_start(date(2026, 1, 31), "week", 1)


def test_plan_period_after_keeps_the_anchor():
    plan = Plan(interval=Plan.Interval.MONTH)
    assert plan.period_after(date(2026, 1, 31)) == date(2026, 2, 28)
    assert plan.period_after(date(2026, 2, 28), anchor=date(2026, 1, 31)) == date(2026, 3, 31)


@hypothesis.settings(max_examples=500, derandomize=True, database=None)
@hypothesis.given(
    anchor=st.dates(min_value=date(1900, 1, 1), max_value=date(2200, 12, 31)),
    interval=st.sampled_from(["month", "year"]),
    n=st.integers(min_value=0, max_value=600),
)
def test_period_start_keeps_the_anchor_day_and_periods_strictly_increase(anchor, interval, n):
    start = period_start(anchor, interval, n)
    days_in_month = calendar.monthrange(start.year, start.month)[1]
    assert start.day == min(anchor.day, days_in_month)
    assert start < period_start(anchor, interval, n + 1)
    assert next_period_start(anchor, interval, start) == period_start(anchor, interval, n + 1)
    months = (start.year - anchor.year) * 12 + start.month - anchor.month
    assert months == (n if interval == "month" else 12 * n)
    assert parse_billing_period(start.isoformat()) == start


# --- One spelling per period ----------------------------------------------------------


def test_parse_billing_period_accepts_the_iso_calendar_date():
    assert parse_billing_period("2026-03-01") == date(2026, 3, 1)


@pytest.mark.parametrize(
    "value",
    [
        "20260301",
        "2026-W09-7",
        "2026-3-1",
        " 2026-03-01",
        "2026-03-01 ",
        "2026-03-01\n",
        "2026-03-01T00:00",
        "2026-02-30",
        "\u0662\u0660\u0662\u0666-03-01",
        "",
        None,
        20260301,
        date(2026, 3, 1),
        b"2026-03-01",
    ],
    ids=[
        "basic-format",
        "iso-week",
        "no-padding",
        "leading-space",
        "trailing-space",
        "trailing-newline",
        "datetime",
        "no-such-day",
        "non-ascii-digits",
        "empty",
        "none",
        "int",
        "date",
        "bytes",
    ],
)
def test_parse_billing_period_rejects_every_other_spelling(value):
    with pytest.raises(InvalidBillingPeriod):
        parse_billing_period(value)


@pytest.mark.parametrize("period", ["20260301", "2026-W09-7", "2026-3-1"])
def test_charging_a_period_under_another_spelling_is_refused_before_any_payment(user, monthly, sandbox, period):
    subscription = SubscriptionFactory(owner=user, plan=monthly, current_period_start=date(2026, 3, 1))
    with pytest.raises(InvalidBillingPeriod):
        services.charge_subscription(subscription_id=subscription.pk, billing_period=period)
    assert Payment.objects.filter(subscription=subscription).count() == 0
    assert sandbox.summary()["charges"]["total"] == 0


# --- Through the service --------------------------------------------------------------


def test_subscribe_anchors_billing_on_the_first_day(user, monthly):
    from django.utils import timezone

    subscription = services.subscribe(owner=user, plan_code="monthly")
    assert subscription.billing_anchor == timezone.localdate()
    subscription.refresh_from_db()
    assert subscription.billing_anchor == timezone.localdate()


def test_monthly_subscription_from_the_31st_is_billed_on_each_months_last_day_or_31st(user, monthly, sandbox):
    # Given a subscription anchored on January 31st
    anchor = date(2026, 1, 31)
    subscription = SubscriptionFactory(owner=user, plan=monthly, current_period_start=anchor)
    # When each due period is charged in turn, as bill_due_subscriptions would
    billed = []
    for _ in range(4):
        subscription.refresh_from_db()
        due = subscription.current_period_end
        services.charge_subscription(subscription_id=subscription.pk, billing_period=due.isoformat())
        billed.append(due)
    subscription.refresh_from_db()
    # Then the billing day returns to the 31st after February
    assert billed == [date(2026, 1, 31), date(2026, 2, 28), date(2026, 3, 31), date(2026, 4, 30)]
    assert subscription.current_period_end == date(2026, 5, 31)
    assert list(
        Payment.objects.filter(subscription=subscription).order_by("id").values_list("billing_period", flat=True)
    ) == [
        "2026-01-31",
        "2026-02-28",
        "2026-03-31",
        "2026-04-30",
    ]


def test_yearly_subscription_from_february_29th_comes_back_to_it(user, yearly, sandbox):
    anchor = date(2024, 2, 29)
    subscription = SubscriptionFactory(owner=user, plan=yearly, current_period_start=anchor)
    for _ in range(4):
        subscription.refresh_from_db()
        services.charge_subscription(
            subscription_id=subscription.pk, billing_period=subscription.current_period_end.isoformat()
        )
    subscription.refresh_from_db()
    assert (subscription.current_period_start, subscription.current_period_end) == (
        date(2027, 2, 28),
        date(2028, 2, 29),
    )


def test_subscription_from_before_anchors_existed_keeps_its_first_billed_day(user, monthly, sandbox):
    # Given a subscription with no billing_anchor, started on January 31st
    start = date(2026, 1, 31)
    subscription = SubscriptionFactory(owner=user, plan=monthly, current_period_start=start, billing_anchor=None)
    # When four periods are charged
    billed = []
    for _ in range(4):
        subscription.refresh_from_db()
        billed.append(subscription.current_period_end)
        services.charge_subscription(
            subscription_id=subscription.pk, billing_period=subscription.current_period_end.isoformat()
        )
    subscription.refresh_from_db()
    # Then its first billed day became its anchor
    assert billed == [date(2026, 1, 31), date(2026, 2, 28), date(2026, 3, 31), date(2026, 4, 30)]
    assert subscription.billing_anchor == start
