import uuid
from datetime import timedelta
from typing import cast

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, QueryDict
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from core.types import AuthenticatedHttpRequest

from . import selectors, services
from .forms import OrderForm
from .models import Order


def home(request: HttpRequest) -> HttpResponse:
    return render(request, "orders/home.html", {"products": selectors.product_list()})


@login_required
def order_list(request: AuthenticatedHttpRequest) -> HttpResponse:
    orders = selectors.order_list_for(owner=request.user, prefetch=("items",))[:100]
    return render(request, "orders/order_list.html", {"orders": orders})


@login_required
def order_new(request: AuthenticatedHttpRequest) -> HttpResponse:
    products = list(selectors.product_list())
    if request.method == "POST":
        form = OrderForm(request.POST, products=products)
        if form.is_valid():
            try:
                order = services.place_order(
                    owner=request.user,
                    items=form.cleaned_data["items"],
                    idempotency_key=form.cleaned_data["idempotency_key"],
                )
            except services.OrderError as exc:
                form.add_error(None, str(exc))
            else:
                messages.success(request, f"Order #{order.pk} placed.")
                return redirect("orders:detail", order_id=order.pk)
        if form.has_error("idempotency_key"):
            # The posted key can never pass; a fresh one lets the shopper submit the form again.
            data = cast(QueryDict, form.data).copy()  # a bound form's data is the request's QueryDict
            data["idempotency_key"] = uuid.uuid4().hex
            form.data = data
        status = 400
    else:
        form = OrderForm(initial={"idempotency_key": uuid.uuid4().hex}, products=products)
        status = 200
    return render(request, "orders/order_new.html", {"form": form}, status=status)


# A step still running after this long gets a "taking longer than usual" line instead of a bare spinner.
SLOW_AFTER = timedelta(seconds=60)
BUSY = (Order.Status.PENDING, Order.Status.CONFIRMED, Order.Status.PAID)


def _sold_out(order: Order) -> str:
    """The names of the lines a rejection found short, from its event's note ("out of stock: SKU, ...")."""
    note = next((event.note for event in order.events.all() if event.to_status == Order.Status.REJECTED), "")
    skus = set(note.partition(": ")[2].split(", "))
    return ", ".join(item.name for item in order.items.all() if item.sku in skus)


@login_required
def order_detail(request: AuthenticatedHttpRequest, order_id: int) -> HttpResponse:
    order = selectors.order_get_for(owner=request.user, order_id=order_id)
    if order is None:
        raise Http404("no such order")
    context = {
        "order": order,
        "payment": order.payment,
        "sold_out": _sold_out(order) if order.status == Order.Status.REJECTED else "",
        "slow": order.status in BUSY and timezone.now() - order.updated_at > SLOW_AFTER,
        "slow_after_seconds": int(SLOW_AFTER.total_seconds()),
    }
    return render(request, "orders/order_detail.html", context)


@login_required
@require_POST
def order_cancel(request: AuthenticatedHttpRequest, order_id: int) -> HttpResponse:
    try:
        services.cancel_order(order_id=order_id, owner=request.user)
    except Order.DoesNotExist:
        raise Http404("no such order") from None
    except services.OrderNotCancellable as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Order #{order_id} cancelled.")
    return redirect("orders:detail", order_id=order_id)
