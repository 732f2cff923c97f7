from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from .models import FailedTask
from .services import NotRequeueable, requeue_failed_task, resolve_failed_task


@admin.register(FailedTask)
class FailedTaskAdmin(admin.ModelAdmin):
    list_display = ("task_name", "task_id", "kind", "queue", "short_exception", "attempts", "failed_at", "resolved")
    list_filter = ("task_name", "kind", "queue", "resolved", "failed_at")
    search_fields = ("task_id", "task_name", "exception", "requeued_as")
    date_hierarchy = "failed_at"
    actions = ["requeue_selected", "mark_resolved"]

    # A dead letter is evidence: it changes only through the actions.
    def get_readonly_fields(self, request: HttpRequest, obj: FailedTask | None = None) -> list[str]:
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="exception")
    def short_exception(self, failed: FailedTask) -> str:
        return failed.exception if len(failed.exception) <= 120 else failed.exception[:119] + "…"

    @admin.action(description="Requeue selected", permissions=["change"])
    def requeue_selected(self, request: HttpRequest, queryset: QuerySet[FailedTask]) -> None:
        requeued = 0
        for failed_task_id in queryset.order_by("failed_at", "id").values_list("pk", flat=True):
            try:
                requeue_failed_task(failed_task_id=failed_task_id)
            except NotRequeueable as exc:
                self.message_user(request, str(exc), messages.WARNING)
            else:
                requeued += 1
        if requeued:
            self.message_user(request, f"Requeued {requeued} task(s).", messages.SUCCESS)

    @admin.action(description="Mark resolved", permissions=["change"])
    def mark_resolved(self, request: HttpRequest, queryset: QuerySet[FailedTask]) -> None:
        failed_task_ids = list(queryset.values_list("pk", flat=True))
        for failed_task_id in failed_task_ids:
            resolve_failed_task(failed_task_id=failed_task_id)
        self.message_user(request, f"Marked {len(failed_task_ids)} dead letter(s) resolved.", messages.SUCCESS)
