"""Report requests: the filter allowlist, and filters that really filter (and nothing else)."""

import datetime

import pytest

from orders.models import Order
from reports import services
from reports.models import Report
from tests.factories import OrderFactory, ProductFactory, ReportFactory

from .conftest import csv_rows

pytestmark = pytest.mark.django_db


def refused(requester, filters) -> dict:
    with pytest.raises(services.InvalidReportRequest) as caught:
        services.request_report(owner=requester, kind="sales", filters=filters, format="csv")
    assert not Report.objects.exists()
    return caught.value.errors


@pytest.mark.parametrize(
    "key",
    [
        "owner__password",
        "order__owner__password",
        "items__sku__startswith",
        "sku__icontains",
        "status__in",
        "pk",
        "id",
        "created_at__gte",
        "Owner",
        "sku ",
        "",
    ],
)
def test_unknown_filter_key_is_refused_by_name(user, key):
    errors = refused(user, {key: "x"})

    assert list(errors) == [key]
    assert "unknown filter" in errors[key]


def test_every_bad_key_is_named_at_once(user):
    errors = refused(user, {"owner__password": "x", "sku": "A" * 65, "date_from": "yesterday", "status": "paid"})

    assert set(errors) == {"owner__password", "sku", "date_from"}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("date_from", 20250101),
        ("date_from", ["2025-01-01"]),
        ("date_from", {"gte": "2025-01-01"}),
        ("date_to", None),
        ("date_to", True),
        ("status", ["paid"]),
        ("status", 1),
        ("status", None),
        ("sku", 123),
        ("sku", ["MUG-001"]),
        ("sku", None),
        ("sku", ""),
        ("sku", "   "),
    ],
)
def test_filter_of_the_wrong_type_is_refused(user, key, value):
    assert set(refused(user, {key: value})) == {key}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("status", "paid' OR '1'='1"),
        ("status", "paid; DROP TABLE orders_order; --"),
        ("status", "PAID"),
        ("date_from", "2025-01-01' OR 1=1 --"),
        ("date_to", "2025-01-01; DROP TABLE reports_report"),
        ("sku", "MUG\x00"),
        ("sku", "MUG\nDROP"),
        ("sku", "A" * 65),
    ],
)
def test_sql_looking_or_malformed_value_is_refused(user, key, value):
    assert set(refused(user, {key: value})) == {key}


@pytest.mark.parametrize(
    "value", ["2025-02-30", "2025-1-1", "20250101", "2025-W01-1", "01/02/2025", "2025-01-01T00:00"]
)
def test_bad_date_is_refused(user, value):
    assert "date" in refused(user, {"date_from": value})["date_from"]


def test_date_from_after_date_to_is_refused(user):
    errors = refused(user, {"date_from": "2025-03-02", "date_to": "2025-03-01"})

    assert errors == {"date_to": "must not be before date_from"}


def test_non_staff_may_not_filter_by_owner(user, other_user):
    errors = refused(user, {"owner": other_user.username})

    assert "only staff" in errors["owner"]


def test_staff_owner_filter_must_name_an_existing_user(staff):
    assert "no user" in refused(staff, {"owner": "nobody-here"})["owner"]
    assert "username" in refused(staff, {"owner": "bad name!"})["owner"]
    assert "username" in refused(staff, {"owner": 7})["owner"]


def test_filters_must_be_an_object(user):
    assert refused(user, ["sku", "MUG"]) == {"filters": "must be an object"}


def test_unknown_kind_and_format_are_refused(user):
    with pytest.raises(services.InvalidReportRequest) as caught:
        services.request_report(owner=user, kind="users", filters={}, format="pdf")

    assert set(caught.value.errors) == {"kind", "format"}
    assert caught.value.in_filters is False
    assert not Report.objects.exists()


def test_valid_request_stores_normalised_filters_and_dispatches_after_commit(user, django_capture_on_commit_callbacks):
    filters = {"date_from": "2025-01-01", "date_to": "2025-01-31", "status": "paid", "sku": "' OR 1=1 --"}
    with django_capture_on_commit_callbacks() as callbacks:
        report = services.request_report(owner=user, kind="sales", filters=filters, format="xlsx")

    assert (report.status, report.format, report.owner) == ("pending", "xlsx", user)
    assert report.filters == filters
    assert len(callbacks) == 1


# --- Filters really filter ----------------------------------------------------


@pytest.fixture
def shop(user, other_user):
    """Order lines across two shoppers, three days, two statuses and two skus."""
    mug = ProductFactory(sku="MUG-001")
    tea = ProductFactory(sku="TEA-001")

    def line(owner, product, status, day):
        order = OrderFactory(owner=owner, status=status, item__product=product)
        Order.objects.filter(pk=order.pk).update(created_at=datetime.datetime(2025, 3, day, 12, tzinfo=datetime.UTC))
        return order.pk

    return {
        "mine_mug_paid_1": line(user, mug, "paid", 1),
        "mine_tea_paid_2": line(user, tea, "paid", 2),
        "mine_mug_confirmed_3": line(user, mug, "confirmed", 3),
        "other_mug_paid_1": line(other_user, mug, "paid", 1),
        "other_tea_confirmed_2": line(other_user, tea, "confirmed", 2),
    }


def order_ids(requester, filters) -> set[int]:
    report = services.request_report(owner=requester, kind="sales", filters=filters, format="csv")
    report = services.generate_report(report_id=report.pk)
    assert report.status == "done"
    return {int(row["order_id"]) for row in csv_rows(report)}


def ids(shop, *names) -> set[int]:
    return {shop[name] for name in names}


def test_shopper_report_covers_only_their_own_orders(user, shop):
    assert order_ids(user, {}) == ids(shop, "mine_mug_paid_1", "mine_tea_paid_2", "mine_mug_confirmed_3")


def test_staff_report_covers_every_order_or_one_owner(staff, other_user, shop):
    assert order_ids(staff, {}) == set(shop.values())
    assert order_ids(staff, {"owner": other_user.username}) == ids(shop, "other_mug_paid_1", "other_tea_confirmed_2")


def test_date_range_includes_both_ends_whole_days(user, shop):
    assert order_ids(user, {"date_from": "2025-03-02", "date_to": "2025-03-03"}) == ids(
        shop, "mine_tea_paid_2", "mine_mug_confirmed_3"
    )
    assert order_ids(user, {"date_to": "2025-03-01"}) == ids(shop, "mine_mug_paid_1")
    assert order_ids(user, {"date_from": "2025-03-04"}) == set()


def test_status_and_sku_filters(user, staff, shop):
    assert order_ids(user, {"status": "paid"}) == ids(shop, "mine_mug_paid_1", "mine_tea_paid_2")
    assert order_ids(user, {"sku": "MUG-001"}) == ids(shop, "mine_mug_paid_1", "mine_mug_confirmed_3")
    assert order_ids(staff, {"sku": "TEA-001", "status": "confirmed"}) == ids(shop, "other_tea_confirmed_2")


def test_sql_looking_sku_is_a_literal_that_matches_nothing(user, shop):
    assert order_ids(user, {"sku": "' OR 1=1 --"}) == set()
    assert order_ids(user, {"sku": "MUG-001' OR 'a'='a"}) == set()


def test_shopper_report_stays_restricted_even_with_an_owner_filter_stored(user, other_user, shop):
    # Filters are checked at request time; should a stored one name someone else, the owner rule still holds.
    report = ReportFactory(owner=user, kind="sales", filters={"owner": other_user.username})

    services.generate_report(report_id=report.pk)

    report.refresh_from_db()
    assert (report.status, report.rows_written) == ("done", 0)


def test_staff_sees_every_report_others_only_their_own(user, other_user, staff):
    mine = ReportFactory(owner=user)
    theirs = ReportFactory(owner=other_user)

    assert list(services.reports_visible_to(user)) == [mine]
    assert set(services.reports_visible_to(staff)) == {mine, theirs}
    with pytest.raises(Report.DoesNotExist):
        services.downloadable_report(user=user, report_id=theirs.pk)
    with pytest.raises(services.ReportNotReady):
        services.downloadable_report(user=staff, report_id=theirs.pk)
