"""Generating the file: CSV and XLSX content, progress, and how a report ends when generation fails."""

import datetime
import zipfile
from decimal import Decimal

import openpyxl
import pytest
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from orders.models import Order
from reports import services, tasks, writers
from reports.models import Report
from tests.factories import OrderFactory, OrderItemFactory, ProductFactory, ReportFactory

from .conftest import csv_rows
from .fault_kinds import FAULT_KINDS

pytestmark = pytest.mark.django_db

HEADER = list(services.SALES_HEADER)


@pytest.fixture
def fault_kinds(settings):
    settings.REPORT_KINDS = {**settings.REPORT_KINDS, **FAULT_KINDS}


@pytest.fixture
def paid_order(user):
    """One paid order of the user's: 2 mugs at 10.00 and 3 teas at 4.50, placed 2025-03-01 12:00 UTC."""
    order = OrderFactory(owner=user, status="paid", item=None, total=Decimal("33.50"))
    OrderItemFactory(order=order, product=ProductFactory(sku="MUG-001", name="Mug", price=Decimal("10.00")), quantity=2)
    OrderItemFactory(order=order, product=ProductFactory(sku="TEA-001", name="Tea", price=Decimal("4.50")), quantity=3)
    Order.objects.filter(pk=order.pk).update(created_at=datetime.datetime(2025, 3, 1, 12, tzinfo=datetime.UTC))
    return order


def generated(owner, format="csv", filters=None) -> Report:
    report = services.request_report(owner=owner, kind="sales", filters=filters or {}, format=format)
    return services.generate_report(report_id=report.pk)


def test_csv_report_holds_every_line_with_its_order_fields(user, paid_order):
    report = generated(user)

    report.refresh_from_db()
    assert (report.status, report.progress, report.rows_written, report.failure_reason) == ("done", 100, 2, "")
    assert report.started_at <= report.finished_at
    assert report.file.name.startswith("reports/") and report.file.name.endswith(".csv")
    rows = csv_rows(report)
    assert list(rows[0]) == HEADER
    assert [(r["sku"], r["product"], r["unit_price"], r["quantity"], r["line_total"]) for r in rows] == [
        ("MUG-001", "Mug", "10.00", "2", "20.00"),
        ("TEA-001", "Tea", "4.50", "3", "13.50"),
    ]
    assert {(r["order_id"], r["order_status"], r["customer"], r["currency"]) for r in rows} == {
        (str(paid_order.pk), "paid", user.username, "EUR")
    }
    assert rows[0]["order_created_at"] == "2025-03-01T12:00:00+00:00"


def test_xlsx_report_is_a_workbook_with_the_same_rows(user, paid_order):
    report = generated(user, format="xlsx")

    assert report.status == "done" and report.file.name.endswith(".xlsx")
    with report.file.open("rb") as handle:
        assert "xl/worksheets/sheet1.xml" in zipfile.ZipFile(handle).namelist()
        handle.seek(0)
        workbook = openpyxl.load_workbook(handle, read_only=True)
        sheet = workbook["Report"]
        values = [list(row) for row in sheet.iter_rows(values_only=True)]
        workbook.close()
    assert values[0] == HEADER
    assert values[1][0] == paid_order.pk
    assert values[1][1] == datetime.datetime(2025, 3, 1, 12, 0)
    assert values[1][4:9] == ["MUG-001", "Mug", 10, 2, 20]
    assert values[2][4:9] == ["TEA-001", "Tea", 4.5, 3, 13.5]
    assert len(values) == 3


def test_cells_that_look_like_formulas_stay_text(user):
    product = ProductFactory(sku="=1+1", name='=HYPERLINK("http://evil.example","click")')
    OrderFactory(owner=user, item__product=product)

    [row] = csv_rows(generated(user))
    assert (row["sku"], row["product"]) == ("'=1+1", '\'=HYPERLINK("http://evil.example","click")')

    report = generated(user, format="xlsx")
    with report.file.open("rb") as handle:
        sheet = openpyxl.load_workbook(handle)["Report"]
    assert (sheet["E2"].data_type, sheet["E2"].value) == ("s", "=1+1")
    assert sheet["F2"].data_type == "s"


def test_report_without_matching_lines_is_done_with_the_header_only(user, paid_order):
    report = generated(user, filters={"sku": "NOTHING"})

    assert (report.status, report.progress, report.rows_written) == ("done", 100, 0)
    assert csv_rows(report) == []
    with report.file.open("rb") as handle:
        assert handle.read().decode().splitlines() == [",".join(HEADER)]


def progress_probe(report) -> services.ReportSource:
    """Rows that record the report's committed progress as generation goes."""
    seen = []

    def rows():
        for number in range(1, 8):
            seen.append(Report.objects.values_list("progress", "rows_written").get(pk=report.pk))
            yield (number,)

    progress_probe.seen = seen
    return services.ReportSource(header=("n",), total=7, rows=rows())


def test_progress_is_saved_as_rows_are_written(user, settings, monkeypatch):
    settings.REPORT_KINDS = {"sales": f"{__name__}.progress_probe"}
    monkeypatch.setattr(services, "CHUNK_SIZE", 2)

    report = generated(user)

    assert progress_probe.seen == [(0, 0), (0, 0), (28, 2), (28, 2), (57, 4), (57, 4), (85, 6)]
    assert (report.progress, report.rows_written) == (100, 7)


def test_soft_time_limit_marks_the_report_failed_with_timeout_and_propagates(user, fault_kinds):
    report = ReportFactory(owner=user, kind="soft_limit_after_first_row")

    with pytest.raises(SoftTimeLimitExceeded):
        services.generate_report(report_id=report.pk)

    report.refresh_from_db()
    assert (report.status, report.failure_reason, bool(report.file)) == ("failed", "timeout", False)
    assert report.finished_at is not None


def test_task_failure_keeps_the_timeout_reason(user, fault_kinds):
    report = ReportFactory(owner=user, kind="soft_limit_after_first_row")

    # throw=False: eager propagation would skip the task's on_failure, which a worker always calls.
    result = tasks.generate_report.apply(args=[report.pk], throw=False)

    assert isinstance(result.result, SoftTimeLimitExceeded)
    report.refresh_from_db()
    assert (report.status, report.failure_reason) == ("failed", "timeout")


def test_a_bug_in_generation_fails_the_report_with_the_error_kind(user, fault_kinds):
    report = ReportFactory(owner=user, kind="broken")

    result = tasks.generate_report.apply(args=[report.pk], throw=False)

    assert isinstance(result.result, ZeroDivisionError)

    report.refresh_from_db()
    assert (report.status, report.failure_reason) == ("failed", "error: ZeroDivisionError")


@pytest.mark.django_db(transaction=True)
def test_hard_time_limit_seen_by_the_main_process_marks_the_running_report_failed(user):
    # What Celery's Request.on_timeout does in the worker's main process once the pool process is killed.
    report = ReportFactory(owner=user, status="running")

    tasks.generate_report.on_failure(TimeLimitExceeded(4), "task-id", [report.pk], {}, None)

    report.refresh_from_db()
    assert (report.status, report.failure_reason) == ("failed", "killed at the hard time limit")


def test_failure_never_overwrites_a_finished_report(user, paid_order):
    report = generated(user)

    assert services.mark_report_failed(report_id=report.pk, reason="late") is False
    report.refresh_from_db()
    assert (report.status, report.failure_reason) == ("done", "")


def test_finished_report_is_not_generated_again(user, paid_order):
    report = generated(user)
    name = report.file.name

    assert services.generate_report(report_id=report.pk) is None
    report.refresh_from_db()
    assert report.file.name == name


def test_report_left_running_by_a_lost_worker_is_generated_from_the_start(user, paid_order):
    report = ReportFactory(owner=user, status="running", progress=40, rows_written=1)

    services.generate_report(report_id=report.pk)

    report.refresh_from_db()
    assert (report.status, report.progress, report.rows_written) == ("done", 100, 2)


def test_missing_report_is_ignored():
    assert services.generate_report(report_id=987654321) is None


def test_xlsx_with_more_rows_than_a_sheet_holds_fails_asking_for_csv(user, paid_order, monkeypatch):
    monkeypatch.setattr(writers, "XLSX_MAX_DATA_ROWS", 1)

    report = generated(user, format="xlsx")

    assert report.status == "failed"
    assert "request CSV instead" in report.failure_reason


def test_dispatched_task_generates_the_report(user, paid_order, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        report = services.request_report(owner=user, kind="sales", filters={}, format="csv")

    report.refresh_from_db()
    assert (report.status, report.rows_written) == ("done", 2)
