import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils.text import capfirst

from core.types import AuthenticatedHttpRequest

from . import services as order_services
from . import stock
from .models import Order, OrderEvent, OrderItem, Product, StockMovement

if TYPE_CHECKING:
    from django.contrib.auth.models import User

# Far below the column's limit, far above any real delivery or count.
MAX_STOCK_CHANGE = 1_000_000


class OnceForm(forms.Form):
    """A staff form with a one-time token: posted twice (a double click, a resubmit), it acts once."""

    submission = forms.CharField(widget=forms.HiddenInput, max_length=64, required=False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.is_bound:
            self.initial["submission"] = uuid.uuid4().hex


class ReceiveStockForm(OnceForm):
    quantity = forms.IntegerField(min_value=1, max_value=MAX_STOCK_CHANGE)
    reason = forms.CharField(max_length=255, required=False, help_text="Delivery note or supplier, if any.")


class AdjustStockForm(OnceForm):
    delta = forms.IntegerField(
        label="Change by",
        min_value=-MAX_STOCK_CHANGE,
        max_value=MAX_STOCK_CHANGE,
        help_text="Units to add, or a negative number to take away (breakage, a count below the books).",
    )
    reason = forms.CharField(max_length=255)

    def clean_delta(self) -> int:
        if self.cleaned_data["delta"] == 0:
            raise forms.ValidationError("Enter a change other than zero.")
        return self.cleaned_data["delta"]


StockChange = Callable[[Product, dict[str, Any], "User"], StockMovement]


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ("sku", "name", "price", "stock")
    search_fields = ("sku", "name")
    # Stock changes only by delta through orders.stock: a form field would write back a stale number.
    readonly_fields = ("stock",)

    def save_model(self, request: HttpRequest, obj: Product, form: forms.ModelForm, change: bool) -> None:
        if change:
            # Every column but stock: a reservation may have changed it since this row was read.
            obj.save(
                update_fields=[f.name for f in obj._meta.concrete_fields if not f.primary_key and f.name != "stock"]
            )
        else:
            obj.save()

    def get_urls(self) -> list[URLPattern]:
        stock_urls = [
            path(
                "<path:object_id>/receive-stock/",
                self.admin_site.admin_view(self.receive_stock_view),
                name="orders_product_receive_stock",
            ),
            path(
                "<path:object_id>/adjust-stock/",
                self.admin_site.admin_view(self.adjust_stock_view),
                name="orders_product_adjust_stock",
            ),
        ]
        # Before the defaults: their "<path:object_id>/" would swallow these.
        return stock_urls + super().get_urls()

    def receive_stock_view(self, request: AuthenticatedHttpRequest, object_id: str) -> HttpResponse:
        return self._stock_change_view(
            request,
            object_id,
            title="Receive stock",
            form_class=ReceiveStockForm,
            change=lambda product, data, user: stock.receive_stock(
                product_id=product.pk,
                quantity=data["quantity"],
                reason=data["reason"],
                user=user,
                submission=data["submission"],
            ),
        )

    def adjust_stock_view(self, request: AuthenticatedHttpRequest, object_id: str) -> HttpResponse:
        return self._stock_change_view(
            request,
            object_id,
            title="Adjust stock",
            form_class=AdjustStockForm,
            change=lambda product, data, user: stock.adjust_stock(
                product_id=product.pk,
                delta=data["delta"],
                reason=data["reason"],
                user=user,
                submission=data["submission"],
            ),
        )

    def _stock_change_view(
        self,
        request: AuthenticatedHttpRequest,
        object_id: str,
        *,
        title: str,
        form_class: type[forms.Form],
        change: StockChange,
    ) -> HttpResponse:
        product = self.get_object(request, unquote(object_id))
        if product is None:
            # ModelAdmin's own answer for a missing object; private, so not in django-stubs.
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)  # type: ignore[attr-defined]
        if not self.has_change_permission(request, product):
            raise PermissionDenied
        form = form_class(request.POST if request.method == "POST" else None)
        if form.is_valid():
            try:
                movement = change(product, form.cleaned_data, request.user)
            except stock.StockError as exc:
                form.add_error(None, f"{capfirst(str(exc))}. Nothing was changed.")
            else:
                product.refresh_from_db(fields=["stock"])
                self.message_user(
                    request,
                    f"{product.sku}: {movement.get_kind_display().lower()} {movement.delta:+d}, "
                    f"stock on hand is now {product.stock}.",
                    messages.SUCCESS,
                )
                return redirect("admin:orders_product_change", product.pk)
        context = {
            **self.admin_site.each_context(request),
            "title": f"{title}: {product}",
            "submit_label": title,
            "opts": self.opts,
            "original": product,
            "form": form,
        }
        return TemplateResponse(request, "admin/orders/product/stock_change.html", context)


@admin.register(StockMovement)
class StockMovementAdmin(admin.ModelAdmin):
    """The stock ledger, read-only: rows are written by orders.stock alone."""

    list_display = ("product", "kind", "delta", "reason", "order", "created_by", "created_at")
    list_filter = ("kind", "created_at")
    list_select_related = ("product", "order", "created_by")
    search_fields = ("product__sku", "product__name", "reason", "order__id")
    date_hierarchy = "created_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: StockMovement | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: StockMovement | None = None) -> bool:
        return False


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
    list_display = ("id", "owner", "status", "hold_reason", "total", "currency", "created_at")
    list_filter = ("status",)
    search_fields = ("id", "owner__username", "idempotency_key")
    # Status changes only through services, never by editing the row.
    readonly_fields = (
        "owner",
        "status",
        "hold_reason",
        "total",
        "currency",
        "idempotency_key",
        "created_at",
        "updated_at",
    )
    inlines = [OrderItemInline, OrderEventInline]
    actions = ["retry_held", "fail_held"]

    def _resolve_holds(
        self, request: HttpRequest, queryset: QuerySet[Order], service: Callable[..., Order], done: str
    ) -> None:
        changed, refused = 0, []
        for order_id in queryset.order_by("pk").values_list("pk", flat=True):
            try:
                service(order_id=order_id)
                changed += 1
            except (order_services.NotOnHold, order_services.PaymentTaken, order_services.ProviderNotConfirmed) as exc:
                refused.append(str(exc))
        if changed:
            self.message_user(request, f"{changed} order(s) {done}.", messages.SUCCESS)
        for reason in refused:
            self.message_user(request, reason, messages.WARNING)

    @admin.action(description="Retry the step that is on hold", permissions=["change"])
    def retry_held(self, request: HttpRequest, queryset: QuerySet[Order]) -> None:
        self._resolve_holds(
            request, queryset, order_services.retry_held_order, "sent back to the step they were held at"
        )

    @admin.action(description="Fail the held payment and release the stock", permissions=["change"])
    def fail_held(self, request: HttpRequest, queryset: QuerySet[Order]) -> None:
        self._resolve_holds(request, queryset, order_services.fail_held_order, "failed, stock released")
