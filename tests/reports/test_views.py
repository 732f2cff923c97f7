"""The reports page: request form with errors, live status hooks, owner-only download."""

import pytest
from django.test import Client

from reports import services
from reports.models import Report
from tests.factories import OrderFactory, ReportFactory, UserFactory

pytestmark = pytest.mark.django_db

PAGE = "/reports/"


@pytest.fixture
def done_report(user):
    OrderFactory(owner=user)
    report = services.request_report(owner=user, kind="sales", filters={}, format="csv")
    return services.generate_report(report_id=report.pk)


def form(**fields):
    return {"kind": "sales", "format": "csv", **fields}


def test_page_needs_sign_in(client):
    response = client.get(PAGE)

    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_page_shows_the_form_my_reports_and_the_live_status_script(client_of, user, other_user):
    mine = ReportFactory(owner=user, status="running", progress=30, filters={"sku": "MUG-001"})
    theirs = ReportFactory(owner=other_user)

    response = client_of(user).get(PAGE)

    page = response.content.decode()
    assert response.status_code == 200
    assert 'name="date_from"' in page and 'name="owner"' not in page
    assert f'data-report-id="{mine.pk}"' in page and f'data-report-id="{theirs.pk}"' not in page
    assert 'data-finished="0"' in page and 'value="30"' in page
    assert 'data-status-url="/api/reports/?limit=1"' in page
    assert "js/report_status.js" in page
    assert 'href="/reports/"' in page  # the nav link


def test_staff_form_offers_the_owner_filter(client_of, staff):
    assert 'name="owner"' in client_of(staff).get(PAGE).content.decode()


def test_posting_the_form_requests_the_report_and_shows_its_download_link(
    client_of, user, django_capture_on_commit_callbacks
):
    OrderFactory(owner=user)
    client = client_of(user)

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(PAGE, form(format="xlsx", date_from="2020-01-01", status="confirmed"))

    assert response.status_code == 302
    report = Report.objects.get()
    assert (report.owner, report.format, report.filters) == (
        user,
        "xlsx",
        {"date_from": "2020-01-01", "status": "confirmed"},
    )
    page = client.get(PAGE).content.decode()
    assert f'href="/reports/{report.pk}/download/"' in page
    assert "requested" in page


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (form(sku="A" * 65), "at most 64 characters"),
        (form(date_from="2025-02-30"), "Enter a valid date"),
        (form(date_from="2025-03-02", date_to="2025-03-01"), "must not be before date_from"),
        (form(status="paid' OR 1=1"), "Select a valid choice"),
        (form(format="pdf"), "Select a valid choice"),
        (form(owner__password="x"), "unknown field: owner__password"),
        (form(owner="someone"), "unknown field: owner"),
        (form(sku="MUG\x00"), "Null characters are not allowed"),
    ],
)
def test_bad_request_redisplays_the_form_with_the_error(client_of, user, fields, message):
    response = client_of(user).post(PAGE, fields)

    assert response.status_code == 400
    assert message in response.content.decode()
    assert not Report.objects.exists()


def test_staff_owner_filter_error_is_shown_on_its_field(client_of, staff):
    response = client_of(staff).post(PAGE, form(owner="nobody-here"))

    assert response.status_code == 400
    assert "no user is named nobody-here" in response.content.decode()


def test_form_post_without_csrf_token_is_refused(client_of, user):
    response = client_of(user, enforce_csrf_checks=True).post(PAGE, form())

    assert response.status_code == 403
    assert not Report.objects.exists()


def test_owner_downloads_the_file(client_of, user, done_report):
    response = client_of(user).get(f"/reports/{done_report.pk}/download/")

    assert response.status_code == 200
    assert response["Content-Disposition"] == f'attachment; filename="sales-report-{done_report.pk}.csv"'
    assert b"".join(response.streaming_content).startswith(b"order_id,order_created_at,")


def test_another_user_gets_a_404_and_staff_may_download(client_of, other_user, staff, done_report):
    url = f"/reports/{done_report.pk}/download/"

    assert client_of(other_user).get(url).status_code == 404
    assert client_of(staff).get(url).status_code == 200


def test_unfinished_report_download_is_a_404(client_of, user):
    report = ReportFactory(owner=user)

    assert client_of(user).get(f"/reports/{report.pk}/download/").status_code == 404


def test_anonymous_download_goes_to_sign_in(done_report):
    assert Client().get(f"/reports/{done_report.pk}/download/").status_code == 302


def test_admin_links_the_file_through_the_checked_view(client_of, done_report):
    admin = UserFactory(is_staff=True, is_superuser=True)
    page = client_of(admin).get(f"/admin/reports/report/{done_report.pk}/change/").content.decode()

    assert f'href="/reports/{done_report.pk}/download/"' in page
    assert "/media/" not in page
