from django.contrib import admin
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from .models import Report


@admin.register(Report)
class ReportAdmin(admin.ModelAdmin):
    list_display = ("id", "owner", "kind", "format", "status", "progress", "rows_written", "created_at", "finished_at")
    list_filter = ("status", "kind", "format")
    search_fields = ("id", "owner__username", "failure_reason")
    # Reports are requested through the site and change only through reports.services.
    # The file's storage URL is not served: the link goes through the owner-checked view.
    exclude = ("file",)
    readonly_fields = [field.name for field in Report._meta.fields if field.name != "file"] + ["download"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="file")
    def download(self, report: Report) -> str:
        if not report.is_downloadable:
            return "-"
        return format_html('<a href="{}">{}</a>', reverse("reports:download", args=[report.pk]), report.download_name)
