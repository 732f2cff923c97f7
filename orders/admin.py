from django.contrib import admin

from .models import ApiToken, Order, OrderEvent, OrderItem, Product


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ("sku", "name", "price", "stock")
    search_fields = ("sku", "name")


class OrderItemInline(admin.TabularInline):
    model = OrderItem
    extra = 0
    readonly_fields = ("product", "sku", "name", "unit_price", "quantity")
    can_delete = False


class OrderEventInline(admin.TabularInline):
    model = OrderEvent
    extra = 0
    readonly_fields = ("from_status", "to_status", "note", "created_at")
    can_delete = False


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    list_display = ("id", "owner", "status", "total", "currency", "created_at")
    list_filter = ("status",)
    search_fields = ("id", "owner__username", "idempotency_key")
    # Status changes only through services, never by editing the row.
    readonly_fields = ("owner", "status", "total", "currency", "idempotency_key", "created_at", "updated_at")
    inlines = [OrderItemInline, OrderEventInline]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("user", "created_at")
    readonly_fields = ("user", "digest", "created_at")
