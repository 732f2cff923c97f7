"""The reports API: request a report, watch its status, download its file (owner or staff only)."""

from datetime import datetime
from typing import Any

from django.db.models import QuerySet
from django.http import FileResponse, Http404
from django.shortcuts import get_object_or_404
from django.urls import reverse
from ninja import Field, Router, Schema, Status
from ninja.errors import HttpError, ValidationError
from ninja.pagination import paginate
from pydantic import ConfigDict

from core.pagination import bounded_pagination
from core.types import ApiRequest

from . import services
from .models import Report
from .views import report_file_response

router = Router(tags=["reports"])


Pagination = bounded_pagination(default_limit=50)


class ReportIn(Schema):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(Report.Kind.SALES, max_length=32, description=f"one of: {', '.join(Report.Kind.values)}")
    format: str = Field(Report.Format.CSV, max_length=8, description=f"one of: {', '.join(Report.Format.values)}")
    filters: dict[str, Any] = Field(
        default_factory=dict,
        description="any of: date_from, date_to (YYYY-MM-DD), status (an order status), sku, "
        "owner (a username; staff only). Any other key is refused.",
    )


class ReportOut(Schema):
    id: int
    kind: str
    format: str
    filters: dict[str, Any]
    status: str
    status_display: str
    progress: int
    rows_written: int
    failure_reason: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    download_url: str | None

    @staticmethod
    def resolve_status_display(report: Report) -> str:
        return report.get_status_display()

    @staticmethod
    def resolve_download_url(report: Report) -> str | None:
        return reverse("api:download_report", kwargs={"report_id": report.pk}) if report.is_downloadable else None


class ErrorOut(Schema):
    detail: list[dict] | str


@router.post("/reports/", response={201: ReportOut, 401: ErrorOut, 422: ErrorOut}, summary="Request a report")
def create_report(request: ApiRequest, payload: ReportIn) -> Status[Report]:
    """Queue a report. Filters are checked against an allowlist; a bad one is a 422 naming it."""
    try:
        report = services.request_report(
            owner=request.auth, kind=payload.kind, filters=payload.filters, format=payload.format
        )
    except services.InvalidReportRequest as exc:
        prefix = ["body", "payload", "filters"] if exc.in_filters else ["body", "payload"]
        raise ValidationError(
            [
                {"loc": [*prefix, field], "msg": msg, "type": "invalid_report_request"}
                for field, msg in exc.errors.items()
            ]
        ) from exc
    return Status(201, report)


@router.get("/reports/", response=list[ReportOut], summary="List my reports, newest first")
@paginate(Pagination)
def list_reports(request: ApiRequest) -> QuerySet[Report]:
    return Report.objects.filter(owner=request.auth)


@router.get("/reports/{report_id}/", response={200: ReportOut, 404: ErrorOut}, summary="One report and its status")
def get_report(request: ApiRequest, report_id: int) -> Report:
    return get_object_or_404(services.reports_visible_to(request.auth), pk=report_id)


@router.get(
    "/reports/{report_id}/download",
    response={200: None, 404: ErrorOut, 409: ErrorOut},
    summary="Download a finished report's file",
)
def download_report(request: ApiRequest, report_id: int) -> FileResponse:
    try:
        report = services.downloadable_report(user=request.auth, report_id=report_id)
    except Report.DoesNotExist as exc:
        raise Http404 from exc
    except services.ReportNotReady as exc:
        raise HttpError(409, str(exc)) from exc
    return report_file_response(report)
