from django.contrib import admin

from .models import Notification


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):
    list_display = ("id", "kind", "object_type", "object_id", "recipient", "status", "created_at", "sent_at")
    list_filter = ("status", "kind")
    search_fields = ("recipient__username", "recipient__email", "subject")
    raw_id_fields = ("recipient",)
    # A record of what was sent; sending happens only through the service.
    readonly_fields = (
        "recipient",
        "kind",
        "object_type",
        "object_id",
        "subject",
        "body_text",
        "status",
        "error",
        "created_at",
        "sent_at",
    )
