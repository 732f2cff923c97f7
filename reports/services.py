"""Report rules: what may be requested, who sees what, and generating the file under time limits.

Filters come from an allowlist and become a query through explicit code: user input
never reaches `.filter(**...)`. Generation runs outside any transaction so progress is
visible as it goes; a report ends done or failed, with the reason, however it ends.
"""

import datetime
import logging
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.files import File
from django.db import connection, transaction
from django.db.models import QuerySet
from django.utils import timezone
from django.utils.module_loading import import_string

from core import outbox
from orders.models import Order, OrderItem

from . import writers
from .models import Report

if TYPE_CHECKING:
    from django.contrib.auth.models import User

logger = logging.getLogger(__name__)

ALLOWED_FILTERS = ("date_from", "date_to", "status", "sku", "owner")
STAFF_ONLY_FILTERS = ("owner",)
MAX_SKU_LENGTH = 64
# Rows fetched per round trip (server-side cursor on PostgreSQL) and rows between progress updates.
CHUNK_SIZE = 2000

TIMEOUT_REASON = "timeout"
HARD_LIMIT_REASON = "killed at the hard time limit"

_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_USERNAME = re.compile(r"^[\w.@+-]{1,150}$")


class InvalidReportRequest(Exception):
    """The request names an unknown kind, format or filter, or a filter value is invalid.

    `errors` maps each offending field (a filter's key for filters) to its message.
    """

    def __init__(self, errors: Mapping[str, str], *, in_filters: bool = True):
        self.errors = dict(errors)
        self.in_filters = in_filters
        super().__init__("; ".join(f"{field}: {msg}" for field, msg in self.errors.items()))


class ReportNotReady(Exception):
    def __init__(self, report: Report):
        self.report = report
        super().__init__(f"report #{report.pk} is {report.status}, not done")


# --- Requesting -------------------------------------------------------------


def _check_date(value: object) -> datetime.date | str:
    if not isinstance(value, str) or not _ISO_DATE.match(value):
        return "must be a date written YYYY-MM-DD"
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        return "is not a valid date"


def _check_status(value: object) -> str | None:
    if not isinstance(value, str) or value not in Order.Status.values:
        return f"must be one of: {', '.join(Order.Status.values)}"
    return None


def _check_sku(value: object) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "must be a non-empty string"
    if len(value) > MAX_SKU_LENGTH:
        return f"must be at most {MAX_SKU_LENGTH} characters"
    if _CONTROL_CHARS.search(value):
        return "must not contain control characters"
    return None


def _check_owner(value: object, requester: "User") -> str | None:
    if not requester.is_staff:
        return "only staff may filter by owner; your reports always cover your own orders"
    if not isinstance(value, str) or not _USERNAME.match(value):
        return "must be a username"
    if not get_user_model().objects.filter(username=value).exists():
        return f"no user is named {value}"
    return None


def check_filters(*, filters: object, requester: "User") -> dict[str, str]:
    """Return the filters normalised, or raise InvalidReportRequest naming every bad key.

    Only ALLOWED_FILTERS are accepted; `owner` only from staff. Values are checked for
    type and form: dates YYYY-MM-DD with date_from <= date_to, status one of the order
    statuses, sku a short single-line string, owner an existing username.
    """
    if not isinstance(filters, Mapping):
        raise InvalidReportRequest({"filters": "must be an object"}, in_filters=False)
    errors: dict[str, str] = {}
    clean: dict[str, str] = {}
    for key, value in filters.items():
        if key not in ALLOWED_FILTERS:
            errors[str(key)[:100]] = f"unknown filter; allowed: {', '.join(ALLOWED_FILTERS)}"
        elif key in ("date_from", "date_to"):
            checked = _check_date(value)
            if isinstance(checked, str):
                errors[key] = checked
            else:
                clean[key] = checked.isoformat()
        else:
            problem = (
                _check_owner(value, requester)
                if key == "owner"
                else _check_status(value)
                if key == "status"
                else _check_sku(value)
            )
            if problem:
                errors[key] = problem
            else:
                clean[key] = value
    if "date_from" in clean and "date_to" in clean and clean["date_from"] > clean["date_to"]:
        errors["date_to"] = "must not be before date_from"
    if errors:
        raise InvalidReportRequest(errors)
    return clean


def request_report(*, owner: "User", kind: str, filters: object, format: str) -> Report:
    """Create a pending report from checked filters and dispatch its generation after commit.

    Raises InvalidReportRequest for an unknown kind or format or any bad filter.
    """
    errors = {}
    if kind not in Report.Kind.values:
        errors["kind"] = f"must be one of: {', '.join(Report.Kind.values)}"
    if format not in Report.Format.values:
        errors["format"] = f"must be one of: {', '.join(Report.Format.values)}"
    if errors:
        raise InvalidReportRequest(errors, in_filters=False)
    clean = check_filters(filters=filters, requester=owner)
    with transaction.atomic():
        report = Report.objects.create(owner=owner, kind=kind, filters=clean, format=format)
        outbox.enqueue("reports.tasks.generate_report", report.pk)
    return report


# --- Reading ----------------------------------------------------------------


def reports_visible_to(user: "User") -> QuerySet[Report]:
    """Staff see every report; anyone else only their own."""
    reports = Report.objects.select_related("owner")
    return reports if user.is_staff else reports.filter(owner=user)


def downloadable_report(*, user: "User", report_id: int) -> Report:
    """The finished report for download. Raises Report.DoesNotExist when the user may not see it, ReportNotReady."""
    report = reports_visible_to(user).get(pk=report_id)
    if not report.is_downloadable:
        raise ReportNotReady(report)
    return report


# --- Generating -------------------------------------------------------------


@dataclass(frozen=True)
class ReportSource:
    """What a report kind yields: a header, the expected row count (for progress), and the rows, streamed."""

    header: Sequence[str]
    total: int
    rows: Iterator[Sequence]


SALES_HEADER = (
    "order_id",
    "order_created_at",
    "order_status",
    "customer",
    "sku",
    "product",
    "unit_price",
    "quantity",
    "line_total",
    "currency",
)


def order_lines_for(report: Report) -> QuerySet[OrderItem]:
    """The order lines a sales report covers: its checked filters, applied one by one.

    A non-staff owner's report covers only their own orders, whatever its filters say.
    """
    filters = report.filters
    lines = OrderItem.objects.all()
    if not report.owner.is_staff:
        lines = lines.filter(order__owner_id=report.owner_id)
    if "owner" in filters:
        lines = lines.filter(order__owner__username=str(filters["owner"]))
    if "date_from" in filters:
        start = datetime.datetime.combine(datetime.date.fromisoformat(filters["date_from"]), datetime.time.min)
        lines = lines.filter(order__created_at__gte=timezone.make_aware(start, datetime.UTC))
    if "date_to" in filters:
        end = datetime.datetime.combine(datetime.date.fromisoformat(filters["date_to"]), datetime.time.max)
        lines = lines.filter(order__created_at__lte=timezone.make_aware(end, datetime.UTC))
    if "status" in filters:
        lines = lines.filter(order__status=str(filters["status"]))
    if "sku" in filters:
        lines = lines.filter(sku=str(filters["sku"]))
    return lines


def sales_source(report: Report) -> ReportSource:
    """Order lines with their order's fields, streamed in order id order."""
    lines = order_lines_for(report)
    rows = (
        lines.order_by("order_id", "id")
        .values_list(
            "order_id",
            "order__created_at",
            "order__status",
            "order__owner__username",
            "sku",
            "name",
            "unit_price",
            "quantity",
            "order__currency",
        )
        .iterator(chunk_size=CHUNK_SIZE)
    )
    return ReportSource(
        header=SALES_HEADER,
        total=lines.count(),
        rows=(
            (order_id, created, status, customer, sku, name, price, qty, price * qty, currency)
            for order_id, created, status, customer, sku, name, price, qty, currency in rows
        ),
    )


def source_for(report: Report) -> ReportSource:
    """The report's rows, from the function settings.REPORT_KINDS names for its kind."""
    build: Callable[[Report], ReportSource] = import_string(settings.REPORT_KINDS[report.kind])
    return build(report)


def _start(report_id: int) -> Report | None:
    with transaction.atomic():
        report = Report.objects.select_for_update().select_related("owner").filter(pk=report_id).first()
        if report is None or report.is_finished:
            return None
        # A report found running was cut off by a lost worker and redelivered: start it over.
        report.status = Report.Status.RUNNING
        report.started_at = timezone.now()
        report.progress = 0
        report.rows_written = 0
        report.save(update_fields=["status", "started_at", "progress", "rows_written"])
    return report


def _save_progress(report: Report, total: int) -> Callable[[int], None]:
    def save(rows_written: int) -> None:
        progress = min(99, rows_written * 100 // total) if total else 0
        Report.objects.filter(pk=report.pk).update(progress=progress, rows_written=rows_written)

    return save


def _discard_connection() -> None:
    # A time limit can interrupt a query mid-fetch and leave the connection unusable;
    # the failure is recorded on a fresh one. Inside a transaction (eager tests) it stays.
    if not connection.in_atomic_block:
        connection.close()


def generate_report(*, report_id: int) -> Report | None:
    """Write a pending (or interrupted) report's file, with progress, and mark it done.

    Returns None for a missing or finished report. Call outside a transaction: progress
    commits as it goes. On the soft time limit the report is marked failed with reason
    "timeout" and SoftTimeLimitExceeded propagates, so the task fails too.
    """
    report = _start(report_id)
    if report is None:
        return None
    began = time.monotonic()
    try:
        source = source_for(report)
        if report.format == Report.Format.XLSX and source.total > writers.XLSX_MAX_DATA_ROWS:
            raise writers.TooManyRows(source.total, writers.XLSX_MAX_DATA_ROWS)
        with tempfile.TemporaryDirectory(prefix=f"report-{report.pk}-") as workdir:
            path = Path(workdir) / report.download_name
            rows_written = writers.WRITERS[report.format](
                path, source.header, source.rows, every=CHUNK_SIZE, on_progress=_save_progress(report, source.total)
            )
            with path.open("rb") as handle:
                report.file.save(report.download_name, File(handle), save=False)
    except SoftTimeLimitExceeded:
        _discard_connection()
        mark_report_failed(report_id=report.pk, reason=TIMEOUT_REASON)
        raise
    except writers.TooManyRows as exc:
        mark_report_failed(report_id=report.pk, reason=f"{exc}: request CSV instead")
        report.refresh_from_db()
        return report
    report.status = Report.Status.DONE
    report.progress = 100
    report.rows_written = rows_written
    report.finished_at = timezone.now()
    report.save(update_fields=["status", "progress", "rows_written", "file", "finished_at"])
    logger.info("report %s done: %s rows in %.1f s", report.pk, rows_written, time.monotonic() - began)
    return report


def mark_report_failed(*, report_id: int, reason: str) -> bool:
    """Mark a pending or running report failed with the reason; a finished one keeps its outcome.

    Returns whether the report changed. Call outside the failing transaction, so the record survives it.
    """
    changed = Report.objects.filter(pk=report_id, status__in=[Report.Status.PENDING, Report.Status.RUNNING]).update(
        status=Report.Status.FAILED, failure_reason=reason[:255], finished_at=timezone.now()
    )
    if changed:
        logger.warning("report %s failed: %s", report_id, reason)
    return bool(changed)


def failure_reason_for(exc: BaseException) -> str:
    """The reason shown to the owner: the time limit hit, or the kind of error (its details stay in the logs)."""
    if isinstance(exc, TimeLimitExceeded):
        return HARD_LIMIT_REASON
    if isinstance(exc, SoftTimeLimitExceeded):
        return TIMEOUT_REASON
    return f"error: {type(exc).__name__}"


def record_generation_failure(*, report_id: int, exc: BaseException) -> bool:
    """Mark the report failed for however its generation failed (no change if already finished)."""
    return mark_report_failed(report_id=report_id, reason=failure_reason_for(exc))
