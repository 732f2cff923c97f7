from django.contrib import admin

from .models import Payment, Plan, Subscription, WebhookEvent


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = ("code", "name", "price", "currency", "interval", "active")


@admin.register(Subscription)
class SubscriptionAdmin(admin.ModelAdmin):
    list_display = ("id", "owner", "plan", "status", "current_period_start", "current_period_end")
    list_filter = ("status", "plan")
    readonly_fields = ("owner", "plan", "status", "current_period_start", "current_period_end", "cancelled_at")


@admin.register(Payment)
class PaymentAdmin(admin.ModelAdmin):
    list_display = ("idempotency_key", "status", "amount", "currency", "provider_charge_id", "attempts", "created_at")
    list_filter = ("status",)
    search_fields = ("idempotency_key", "provider_charge_id")
    readonly_fields = [field.name for field in Payment._meta.fields]


@admin.register(WebhookEvent)
class WebhookEventAdmin(admin.ModelAdmin):
    list_display = ("provider_event_id", "type", "status", "received_at", "processed_at")
    list_filter = ("status", "type")
    readonly_fields = [field.name for field in WebhookEvent._meta.fields]
