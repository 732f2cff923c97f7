from django.conf import settings
from django.db import models
from django.db.models import Q


class Report(models.Model):
    """A requested export and its generation: status, progress, and the file once done."""

    class Kind(models.TextChoices):
        SALES = "sales", "Sales (order lines)"

    class Format(models.TextChoices):
        CSV = "csv", "CSV"
        XLSX = "xlsx", "Excel (XLSX)"

    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    FINISHED = (Status.DONE, Status.FAILED)

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="reports")
    kind = models.CharField(max_length=32, choices=Kind.choices, default=Kind.SALES)
    # Only what reports.services.check_filters returned: never user input as such.
    filters = models.JSONField(default=dict, blank=True)
    format = models.CharField(max_length=8, choices=Format.choices, default=Format.CSV)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    progress = models.PositiveSmallIntegerField(default=0)
    rows_written = models.PositiveIntegerField(default=0)
    failure_reason = models.CharField(max_length=255, blank=True, default="")
    # Private: stored under MEDIA_ROOT, which nothing serves; downloads go through owner-checked views.
    file = models.FileField(upload_to="reports/%Y/%m/", blank=True, max_length=255)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(progress__lte=100), name="report_progress_at_most_100"),
            models.CheckConstraint(
                condition=Q(status__in=["pending", "running", "done", "failed"]), name="report_status_valid"
            ),
        ]
        indexes = [models.Index(fields=["owner", "-created_at"])]

    def __str__(self) -> str:
        return f"Report #{self.pk} {self.kind}.{self.format} ({self.status})"

    @property
    def is_finished(self) -> bool:
        return self.status in self.FINISHED

    @property
    def is_downloadable(self) -> bool:
        return self.status == self.Status.DONE and bool(self.file)

    @property
    def download_name(self) -> str:
        return f"{self.kind}-report-{self.pk}.{self.format}"
