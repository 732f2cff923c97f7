import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, QueryDict
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils.text import capfirst

from core.errors import ApplicationError
from core.types import AuthenticatedHttpRequest
from payments import refunds as payment_refunds
from payments.models import Refund

from . import services as order_services
from . import stock
from .models import Order, OrderEvent, Product, StockMovement

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


# --- The operator view: an order, all that happened to it, and what staff may do about it ----------


@dataclass(frozen=True)
class DeadLetter:
    """A dead letter about an order as its page lists it: found by ops, which orders may not import."""

    pk: int
    task_name: str
    about: str
    exception: str
    failed_at: datetime
    resolved: bool
    url: str


@dataclass(frozen=True)
class DeadLetters:
    letters: list[DeadLetter]
    # All of them in the admin that keeps them, where they are requeued or resolved.
    list_url: str


# Finders of an order's dead letters, registered by the apps that keep them (ops/admin.py): the layers
# (pyproject's import-linter contracts) put ops above orders, so orders asks without importing it.
dead_letter_finders: list[Callable[[Order], DeadLetters]] = []

# What staff acting on a hold may be told instead of a changed order.
HOLD_REFUSALS = (order_services.NotOnHold, order_services.PaymentTaken, order_services.ProviderNotConfirmed)


CONFIRM_ALL = "tick the box to confirm the refund of all that is left"


def unconfirmed_refund_all(order: Order, ticked: str) -> str | None:
    """Why a "refund all" may not go ahead, or None: its box must be ticked, for the amount left now.

    The box sends the amount left when the page was shown; another refund since (a colleague, the API) makes the page
    stale, and staff confirmed an amount that is no longer what "all" means. An order without a payment is the
    service's to refuse.
    """
    payment = order.payments.first()
    if payment is None:
        return None
    try:
        shown = payment_refunds.clean_amount(ticked)
    except payment_refunds.InvalidRefundAmount:
        return CONFIRM_ALL
    left = payment_refunds.refundable(payment)
    if shown != left:
        return (
            f"{left} {payment.currency} is left to refund now, not the {ticked} the page showed (it changed since); "
            "look at the order again"
        )
    return None


class RefundForm(OnceForm):
    """One of the order page's refunds; the service checks the amount and the lines and says what is wrong."""

    kind = forms.ChoiceField(
        choices=[("all", "All that is left"), ("amount", "An amount"), ("lines", "Lines")], widget=forms.HiddenInput
    )
    # Text, not a DecimalField: refund_order's own check (two decimals, positive, within what is left) answers.
    amount = forms.CharField(max_length=40, required=False)
    note = forms.CharField(max_length=255, required=False, help_text="Why, for the order's history.")
    # "All that is left": the box ticked sends the amount left as the page showed it (unconfirmed_refund_all).
    confirm = forms.CharField(max_length=40, required=False, error_messages={"max_length": CONFIRM_ALL})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Money: a form without its one-time token could refund twice when posted twice.
        self.fields["submission"].required = True


def posted_lines(data: QueryDict) -> dict[str, Any]:
    """The units typed in per line, {order item id: quantity}; empty and zero left out, anything else as typed."""
    lines: dict[str, Any] = {}
    for key, values in data.lists():
        text = values[-1].strip() if values else ""
        if not key.startswith("line_") or not text:
            continue
        quantity: Any = int(text) if re.fullmatch(r"-?\d{1,9}", text) else text
        if quantity != 0:
            lines[key.removeprefix("line_")] = quantity
    return lines


def shipment_id(events: list[OrderEvent]) -> str:
    """The warehouse's shipment id, as the hand-over's event recorded it ("shipment <id>")."""
    for event in reversed(events):
        if event.to_status == Order.Status.FULFILLED and event.note.startswith("shipment "):
            return event.note.removeprefix("shipment ")
    return ""


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    list_display = ("id", "owner", "status", "hold_reason", "total", "currency", "created_at")
    list_filter = ("status",)
    search_fields = ("id", "owner__username", "owner__email", "idempotency_key", "fulfillment_key")
    fields = (
        "owner",
        "status",
        "hold_reason",
        "total",
        "shipping_fee",
        "currency",
        "payment_method",
        "ship_to",
        "idempotency_key",
        "fulfillment_key",
        "created_at",
        "updated_at",
    )
    # Nothing on an order is edited here: its status and money change only through services (the page's actions).
    readonly_fields = fields
    actions = ["retry_held", "fail_held"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # orders are placed by shoppers (orders.services.place_order)

    def has_delete_permission(self, request: HttpRequest, obj: Order | None = None) -> bool:
        return False  # payments, refunds and stock movements keep pointing at it

    def save_model(self, request: HttpRequest, obj: Order, form: forms.ModelForm, change: bool) -> None:
        # No field is editable; a full save would write back columns a service may have changed meanwhile.
        return

    def get_queryset(self, request: HttpRequest) -> QuerySet[Order]:
        return super().get_queryset(request).select_related("owner", "payment_method")

    @admin.display(description="ships to")
    def ship_to(self, order: Order) -> str:
        address = order.shipping_address or {}
        return ", ".join(str(value) for value in address.values() if value) or "-"

    def get_urls(self) -> list[URLPattern]:
        action_urls = [
            path("<path:object_id>/refund/", self.admin_site.admin_view(self.refund_view), name="orders_order_refund"),
            path(
                "<path:object_id>/retry-hold/",
                self.admin_site.admin_view(self.retry_hold_view),
                name="orders_order_retry_hold",
            ),
            path(
                "<path:object_id>/fail-hold/",
                self.admin_site.admin_view(self.fail_hold_view),
                name="orders_order_fail_hold",
            ),
        ]
        # Before the defaults: their "<path:object_id>/" would swallow these.
        return action_urls + super().get_urls()

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Order | None = None,
    ) -> HttpResponse:
        if obj is not None:
            context.update(self.operator_view(request, obj))
        # Read-only: the page's forms act, through services; there is nothing to save.
        context.update(show_save=False, show_save_and_continue=False, show_save_and_add_another=False)
        return super().render_change_form(request, context, add, change, form_url, obj)

    def operator_view(self, request: HttpRequest, order: Order) -> dict[str, Any]:
        """Everything about the order the page shows, and which of the actions apply to it now."""
        items = list(order.items.all())
        events = list(order.events.all())
        payment = order.payments.select_related("payment_method").first()
        refunds = list(
            Refund.objects.filter(payment__order=order).select_related("requested_by").order_by("created_at", "id")
        )
        skus = {str(item.pk): item.sku for item in items}
        refund_rows = [
            (refund, ", ".join(f"{units} × {skus.get(line, f'line {line}')}" for line, units in refund.lines.items()))
            for refund in refunds
        ]
        left = payment_refunds.refundable(payment) if payment is not None else Decimal("0.00")
        may_act = self.has_change_permission(request, order)
        origin = order.held_from
        can_refund = may_act and left > 0 and order.status in order_services.REFUNDABLE_STATUSES
        found = [letters for find in dead_letter_finders if (letters := find(order)).letters]
        return {
            "items": items,
            "events": events,
            "payment": payment,
            "refunded": payment_refunds.refunded(payment, statuses=(Refund.Status.SUCCEEDED,)) if payment else None,
            "refund_left": left,
            "refunds": refund_rows,
            "shipment_id": shipment_id(events),
            "movements": order.stock_movements.select_related("product", "created_by"),
            "dead_letters": [letter for letters in found for letter in letters.letters],
            "dead_letter_lists": [letters.list_url for letters in found],
            "can_refund": can_refund,
            "refund_forms": {
                kind: RefundForm(initial={"kind": kind}, auto_id=f"id_refund_{kind}_%s")
                for kind in ("all", "amount", "lines")
            }
            if can_refund
            else {},
            "lines_left": [item for item in items if item.quantity_to_ship] if can_refund else [],
            "held_from": origin,
            "can_retry_hold": may_act and origin is not None,
            "can_fail_hold": may_act and origin == Order.Status.CONFIRMED,
            "order_actions_apply": can_refund or (may_act and origin is not None),
        }

    def _order_to_act_on(self, request: HttpRequest, object_id: str) -> Order | None:
        """The order a POST acts on, when the user may change it (PermissionDenied otherwise); None when it is gone."""
        order = self.get_object(request, unquote(object_id))
        if order is not None and not self.has_change_permission(request, order):
            raise PermissionDenied
        return order

    def refund_view(self, request: AuthenticatedHttpRequest, object_id: str) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        order = self._order_to_act_on(request, object_id)
        if order is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)  # type: ignore[attr-defined]
        self._refund(request, order)
        return redirect("admin:orders_order_change", order.pk)

    def _refund(self, request: AuthenticatedHttpRequest, order: Order) -> None:
        form = RefundForm(request.POST)
        if not form.is_valid():
            problems = "; ".join(f"{name}: {' '.join(map(str, errors))}" for name, errors in form.errors.items())
            self.message_user(request, f"Nothing was refunded: {problems}", messages.ERROR)
            return
        data = form.cleaned_data
        # Whether this form's token already refunded is decided by the service; this is for the message, and so that
        # a "refund all" sent twice is told it was sent, not that nothing is left.
        sent_before = Refund.objects.filter(payment__order=order, submission=data["submission"]).exists()
        amount: str | None = None
        lines: dict[str, Any] | None = None
        if data["kind"] == "all":
            if not sent_before and (refused := unconfirmed_refund_all(order, data["confirm"])):
                self.message_user(request, f"Nothing was refunded: {refused}.", messages.ERROR)
                return
            # The amount confirmed, checked again by the service under the payment's lock: a refund committed since
            # the check above makes it more than is left (refused), never a smaller "all" nobody confirmed. Equal
            # to what is left, it is "all" to the service (before the hand-over: the order cancelled).
            amount = data["confirm"] or None
        elif data["kind"] == "amount":
            if not data["amount"]:
                self.message_user(request, "Nothing was refunded: enter the amount to refund.", messages.ERROR)
                return
            amount = data["amount"]
        elif data["kind"] == "lines":
            # Never empty: the service reads no lines as "all that is left".
            lines = posted_lines(request.POST)
            if not lines:
                self.message_user(request, "Nothing was refunded: enter how many units of which line.", messages.ERROR)
                return
        try:
            refund = order_services.refund_order(
                order_id=order.pk,
                amount=amount,
                lines=lines,
                note=data["note"],
                requested_by=request.user,
                submission=data["submission"],
            )
        except ApplicationError as exc:
            self.message_user(request, f"{capfirst(str(exc))}. Nothing was refunded.", messages.ERROR)
            return
        if sent_before:
            self.message_user(
                request,
                f"This form was already sent: refund #{refund.pk} of {refund.amount} {refund.currency} "
                "was requested then, nothing more now.",
                messages.WARNING,
            )
            return
        order.refresh_from_db(fields=["status"])
        cancelled = " The order was cancelled and its stock put back." if order.status == Order.Status.CANCELLED else ""
        self.message_user(
            request,
            f"Refund #{refund.pk} of {refund.amount} {refund.currency} requested: the provider is asked now."
            + cancelled,
            messages.SUCCESS,
        )

    def retry_hold_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return self._hold_view(request, object_id, order_services.retry_held_order, "Retried")

    def fail_hold_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return self._hold_view(request, object_id, order_services.fail_held_order, "Payment failed, stock released")

    def _hold_view(
        self, request: HttpRequest, object_id: str, service: Callable[..., Order], done: str
    ) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        order = self._order_to_act_on(request, object_id)
        if order is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)  # type: ignore[attr-defined]
        try:
            changed = service(order_id=order.pk)
        except HOLD_REFUSALS as exc:
            self.message_user(request, f"{capfirst(str(exc))}.", messages.WARNING)
        else:
            # A held charge may be settled by the provider's answer instead: the status says where it went.
            self.message_user(request, f"{done}: order {order.pk} is now {changed.status}.", messages.SUCCESS)
        return redirect("admin:orders_order_change", order.pk)

    def _resolve_holds(
        self, request: HttpRequest, queryset: QuerySet[Order], service: Callable[..., Order], done: str
    ) -> None:
        changed, refused = 0, []
        for order_id in queryset.order_by("pk").values_list("pk", flat=True):
            try:
                service(order_id=order_id)
                changed += 1
            except HOLD_REFUSALS as exc:
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
