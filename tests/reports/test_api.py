"""The reports API through the client: request, live status, owner-only download, refusals."""

import pytest
from django.test import Client

from reports import services
from reports.models import Report
from tests.factories import OrderFactory, ReportFactory

pytestmark = pytest.mark.django_db

REPORTS = "/api/reports/"


def post(client, payload, **extra):
    return client.post(REPORTS, payload, content_type="application/json", **extra)


def locs(response) -> list[list]:
    return [error["loc"] for error in response.json()["detail"]]


@pytest.fixture
def done_report(user):
    OrderFactory(owner=user)
    report = services.request_report(owner=user, kind="sales", filters={}, format="csv")
    return services.generate_report(report_id=report.pk)


def test_post_report_answers_201_pending_and_generates_after_commit(
    bearer_client_of, user, django_capture_on_commit_callbacks
):
    OrderFactory(owner=user)
    client = bearer_client_of(user)
    with django_capture_on_commit_callbacks(execute=True):
        response = post(client, {"kind": "sales", "format": "xlsx", "filters": {"status": "confirmed"}})

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["status"], body["format"], body["filters"], body["download_url"]) == (
        "pending",
        "xlsx",
        {"status": "confirmed"},
        None,
    )
    status = client.get(f"{REPORTS}{body['id']}/").json()
    assert (status["status"], status["progress"], status["rows_written"]) == ("done", 100, 1)
    assert status["download_url"] == f"{REPORTS}{body['id']}/download"
    download = client.get(status["download_url"])
    assert download.status_code == 200
    assert download["Content-Disposition"] == f'attachment; filename="sales-report-{body["id"]}.xlsx"'
    assert download["Content-Type"] == "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    assert b"".join(download.streaming_content)[:2] == b"PK"


@pytest.mark.parametrize(
    ("filters", "field"),
    [
        ({"owner__password": "x"}, "owner__password"),
        ({"items__sku__startswith": "M"}, "items__sku__startswith"),
        ({"sku": "A" * 65}, "sku"),
        ({"status": "paid' OR '1'='1"}, "status"),
        ({"date_from": "2025-13-01"}, "date_from"),
        ({"date_from": 20250101}, "date_from"),
        ({"date_from": "2025-02-01", "date_to": "2025-01-01"}, "date_to"),
        ({"owner": "someone"}, "owner"),
    ],
)
def test_bad_filter_is_a_422_naming_it(bearer_client_of, user, filters, field):
    response = post(bearer_client_of(user), {"filters": filters})

    assert response.status_code == 422, response.content
    assert locs(response) == [["body", "payload", "filters", field]]
    assert not Report.objects.exists()


def test_unknown_kind_or_format_is_a_422_naming_it(bearer_client_of, user):
    response = post(bearer_client_of(user), {"kind": "passwords", "format": "pdf"})

    assert response.status_code == 422
    assert sorted(locs(response)) == [["body", "payload", "format"], ["body", "payload", "kind"]]


@pytest.mark.parametrize(
    "payload",
    [{"filters": ["sku"]}, {"filters": "sku=MUG"}, {"owner": 1}, {"kind": "sales", "filters": {}, "extra": 1}],
)
def test_malformed_request_is_a_422(bearer_client_of, user, payload):
    response = post(bearer_client_of(user), payload)

    assert response.status_code == 422, response.content
    assert not Report.objects.exists()


def test_staff_may_filter_by_owner(bearer_client_of, staff, other_user):
    response = post(bearer_client_of(staff), {"filters": {"owner": other_user.username}})

    assert response.status_code == 201, response.content


def test_without_credentials_is_a_401(client):
    assert post(client, {}).status_code == 401
    assert client.get(REPORTS).status_code == 401


def test_session_post_without_csrf_token_is_refused(client_of, user):
    client = client_of(user, enforce_csrf_checks=True)

    response = post(client, {})

    assert response.status_code == 403
    assert not Report.objects.exists()


def test_session_post_with_csrf_token_is_accepted(client_of, user):
    client = client_of(user, enforce_csrf_checks=True)
    client.get("/reports/")  # sets the CSRF cookie

    response = post(client, {}, HTTP_X_CSRFTOKEN=client.cookies["csrftoken"].value)

    assert response.status_code == 201, response.content


def test_live_status_follows_the_report(bearer_client_of, user):
    client = bearer_client_of(user)
    report = ReportFactory(owner=user)
    assert client.get(f"{REPORTS}{report.pk}/").json()["status"] == "pending"

    Report.objects.filter(pk=report.pk).update(status="running", progress=40, rows_written=800)
    body = client.get(f"{REPORTS}{report.pk}/").json()
    assert (body["status"], body["status_display"], body["progress"], body["rows_written"]) == (
        "running",
        "Running",
        40,
        800,
    )

    Report.objects.filter(pk=report.pk).update(status="failed", failure_reason="timeout")
    body = client.get(f"{REPORTS}{report.pk}/").json()
    assert (body["status"], body["failure_reason"], body["download_url"]) == ("failed", "timeout", None)


def test_list_shows_only_my_reports_newest_first(bearer_client_of, user, other_user):
    first = ReportFactory(owner=user)
    ReportFactory(owner=other_user)
    second = ReportFactory(owner=user)

    body = bearer_client_of(user).get(REPORTS).json()

    assert [item["id"] for item in body["items"]] == [second.pk, first.pk]
    assert body["count"] == 2


def test_another_users_report_is_a_404(bearer_client_of, other_user, done_report):
    client = bearer_client_of(other_user)

    assert client.get(f"{REPORTS}{done_report.pk}/").status_code == 404
    assert client.get(f"{REPORTS}{done_report.pk}/download").status_code == 404


def test_staff_may_read_and_download_any_report(bearer_client_of, staff, done_report):
    client = bearer_client_of(staff)

    assert client.get(f"{REPORTS}{done_report.pk}/").status_code == 200
    download = client.get(f"{REPORTS}{done_report.pk}/download")
    assert download.status_code == 200
    assert b"".join(download.streaming_content).startswith(b"order_id,")


def test_download_before_done_is_a_409(bearer_client_of, user):
    report = ReportFactory(owner=user, status="running")

    response = bearer_client_of(user).get(f"{REPORTS}{report.pk}/download")

    assert response.status_code == 409
    assert "running" in response.json()["detail"]


def test_download_of_a_file_gone_from_storage_is_a_404(bearer_client_of, user, done_report):
    done_report.file.storage.delete(done_report.file.name)

    assert bearer_client_of(user).get(f"{REPORTS}{done_report.pk}/download").status_code == 404


def test_report_files_are_not_served_from_media_url(user, done_report):
    client = Client()
    client.force_login(user)

    assert client.get(f"/media/{done_report.file.name}").status_code == 404
