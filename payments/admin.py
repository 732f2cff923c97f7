from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from .models import Payment, PaymentMismatch, Plan, Refund, Subscription, WebhookEvent
from .reconciliation import resolve_mismatches


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = ("code", "name", "price", "currency", "interval", "active")


@admin.register(Subscription)
class SubscriptionAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "owner",
        "plan",
        "status",
        "current_period_start",
        "current_period_end",
        "failed_attempts",
        "next_retry_at",
    )
    list_filter = ("status", "plan")
    # Dunning (payments/dunning.py): how many tries of the due period were declined, and when the next one runs.
    readonly_fields = (
        "owner",
        "plan",
        "status",
        "current_period_start",
        "current_period_end",
        "cancelled_at",
        "failed_attempts",
        "next_retry_at",
    )


@admin.register(Payment)
class PaymentAdmin(admin.ModelAdmin):
    list_display = (
        "idempotency_key",
        "status",
        "amount",
        "currency",
        "provider_charge_id",
        "billing_period",
        "attempt",
        "attempts",
        "created_at",
    )
    list_filter = ("status",)
    search_fields = ("idempotency_key", "provider_charge_id")
    readonly_fields = [field.name for field in Payment._meta.fields]


@admin.register(Refund)
class RefundAdmin(admin.ModelAdmin):
    """Every refund, read-only: staff refund from the order's page (orders/admin.py), which goes through its service."""

    list_display = (
        "id",
        "order_link",
        "amount",
        "currency",
        "status",
        "reason",
        "requested_by",
        "provider_refund_id",
        "attempts",
        "created_at",
    )
    list_filter = ("status", "reason", "created_at")
    list_select_related = ("payment", "requested_by")
    # An order id is searched as a whole number: "payment__order__id" with exact lookup.
    search_fields = ("idempotency_key", "provider_refund_id", "=payment__order__id", "payment__idempotency_key")
    date_hierarchy = "created_at"

    def get_readonly_fields(self, request: HttpRequest, obj: Refund | None = None) -> list[str]:
        return [field.name for field in self.model._meta.fields] + ["order_link"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Refund | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Refund | None = None) -> bool:
        return False

    @admin.display(description="order", ordering="payment__order_id")
    def order_link(self, refund: Refund) -> str:
        order_id = refund.payment.order_id
        if order_id is None:
            return f"subscription payment {refund.payment_id}"
        # By URL name: payments never imports orders.
        return format_html('<a href="{}">#{}</a>', reverse("admin:orders_order_change", args=[order_id]), order_id)


@admin.register(WebhookEvent)
class WebhookEventAdmin(admin.ModelAdmin):
    list_display = ("provider_event_id", "type", "status", "received_at", "processed_at")
    list_filter = ("status", "type")
    readonly_fields = [field.name for field in WebhookEvent._meta.fields]


@admin.register(PaymentMismatch)
class PaymentMismatchAdmin(admin.ModelAdmin):
    list_display = ("found_at", "kind", "reference", "payment", "provider_charge_id", "details", "resolved")
    list_filter = ("resolved", "kind", "found_at")
    search_fields = ("reference", "provider_charge_id", "details")
    date_hierarchy = "found_at"
    actions = ["mark_resolved"]

    # Found by reconciliation (python manage.py reconcile_payments): it changes only through the action.
    def get_readonly_fields(self, request: HttpRequest, obj: PaymentMismatch | None = None) -> list[str]:
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: PaymentMismatch | None = None) -> bool:
        return False

    @admin.action(description="Mark resolved", permissions=["change"])
    def mark_resolved(self, request: HttpRequest, queryset: QuerySet[PaymentMismatch]) -> None:
        resolved = resolve_mismatches(mismatch_ids=queryset.values_list("pk", flat=True))
        self.message_user(request, f"Marked {resolved} mismatch(es) resolved.", messages.SUCCESS)
