from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404, HttpResponse
from django.shortcuts import redirect, render

from core.types import AuthenticatedHttpRequest

from . import services
from .forms import ReportForm
from .models import Report

RECENT_REPORTS = 50


def report_file_response(report: Report) -> FileResponse:
    """The report's file as an attachment; a file gone from storage is a 404."""
    try:
        handle = report.file.open("rb")
    except FileNotFoundError as exc:
        raise Http404("report file is missing") from exc
    return FileResponse(handle, as_attachment=True, filename=report.download_name)


@login_required
def report_list(request: AuthenticatedHttpRequest) -> HttpResponse:
    """My recent reports with their live status, and the form to request another."""
    status = 200
    if request.method == "POST":
        form = ReportForm(request.POST, user=request.user)
        if form.is_valid():
            try:
                report = services.request_report(
                    owner=request.user,
                    kind=form.cleaned_data["kind"],
                    filters=form.filters(),
                    format=form.cleaned_data["format"],
                )
            except services.InvalidReportRequest as exc:
                for field, msg in exc.errors.items():
                    form.add_error(field if field in form.fields else None, msg)
            else:
                messages.success(request, f"Report #{report.pk} requested; its status updates below.")
                return redirect("reports:list")
        status = 400
    else:
        form = ReportForm(user=request.user)
    reports = Report.objects.filter(owner=request.user)[:RECENT_REPORTS]
    return render(request, "reports/report_list.html", {"form": form, "reports": reports}, status=status)


@login_required
def report_download(request: AuthenticatedHttpRequest, report_id: int) -> FileResponse:
    """The file of a finished report, to its owner or staff; anyone else gets a 404."""
    try:
        report = services.downloadable_report(user=request.user, report_id=report_id)
    except (Report.DoesNotExist, services.ReportNotReady) as exc:
        raise Http404("no such finished report") from exc
    return report_file_response(report)
