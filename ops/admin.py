from django.contrib import admin, messages
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.urls import reverse

from notifications.models import Notification
from orders.admin import DeadLetter, DeadLetters, dead_letter_finders
from orders.models import Order
from payments.models import Payment, Refund

from .deadletters import PAYMENT_NEEDS_ATTENTION, REFUND_FAILED
from .models import FailedTask
from .services import NotRequeueable, requeue_failed_task, resolve_failed_task

# The dead letters an order's page lists, newest first: enough to see what went wrong, the rest in the list.
ORDER_DEAD_LETTERS_SHOWN = 50


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


def order_dead_letters(order: Order) -> DeadLetters:
    """The dead letters about an order: its steps, its payment's and refunds', and its customer emails'."""
    payment_ids = list(Payment.objects.filter(order=order).values_list("pk", flat=True))
    refund_ids = list(Refund.objects.filter(payment__order=order).values_list("pk", flat=True))
    notifications = dict(
        Notification.objects.filter(
            Q(object_type=Notification.ObjectType.ORDER, object_id=order.pk)
            | Q(object_type=Notification.ObjectType.REFUND, object_id__in=refund_ids)
        ).values_list("pk", "kind")
    )
    # Each of these tasks and records names its row by its first argument.
    about = (
        Q(task_name__startswith="orders.tasks.", args__0=order.pk)
        | Q(task_name=PAYMENT_NEEDS_ATTENTION, args__0__in=payment_ids)
        | Q(task_name__in=[REFUND_FAILED, "payments.tasks.refund_payment"], args__0__in=refund_ids)
        | Q(task_name="notifications.tasks.send_notification", args__0__in=list(notifications))
    )
    failed = list(FailedTask.objects.filter(about).order_by("-failed_at", "-id")[:ORDER_DEAD_LETTERS_SHOWN])

    def describe(letter: FailedTask) -> str:
        first = letter.args[0] if isinstance(letter.args, list) and letter.args else None
        if letter.task_name.startswith("orders.tasks."):
            return f"order {first}"
        if letter.task_name == PAYMENT_NEEDS_ATTENTION:
            return f"payment {first}"
        if letter.task_name.startswith("notifications."):
            return (
                f"email {notifications[first]} (notification {first})" if first in notifications else f"email {first}"
            )
        return f"refund {first}"

    letters = [
        DeadLetter(
            pk=letter.pk,
            task_name=letter.task_name,
            about=describe(letter),
            exception=letter.exception,
            failed_at=letter.failed_at,
            resolved=letter.resolved,
            url=reverse("admin:ops_failedtask_change", args=[letter.pk]),
        )
        for letter in failed
    ]
    ids = ",".join(str(letter.pk) for letter in letters)
    return DeadLetters(letters=letters, list_url=f"{reverse('admin:ops_failedtask_changelist')}?id__in={ids}")


dead_letter_finders.append(order_dead_letters)
