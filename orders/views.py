import uuid

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from . import services
from .forms import OrderForm
from .models import Order, Product


def home(request):
    return render(request, "orders/home.html", {"products": Product.objects.order_by("name")})


@login_required
def order_list(request):
    orders = Order.objects.filter(owner=request.user).prefetch_related("items")[:100]
    return render(request, "orders/order_list.html", {"orders": orders})


@login_required
def order_new(request):
    products = list(Product.objects.order_by("name"))
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
            form.data = form.data.copy()
            form.data["idempotency_key"] = uuid.uuid4().hex
        status = 400
    else:
        form = OrderForm(initial={"idempotency_key": uuid.uuid4().hex}, products=products)
        status = 200
    return render(request, "orders/order_new.html", {"form": form}, status=status)


@login_required
def order_detail(request, order_id: int):
    order = get_object_or_404(
        Order.objects.prefetch_related("items", "events", "payments"), pk=order_id, owner=request.user
    )
    payment = next(iter(order.payments.all()), None)
    return render(request, "orders/order_detail.html", {"order": order, "payment": payment})


@login_required
@require_POST
def order_cancel(request, order_id: int):
    get_object_or_404(Order, pk=order_id, owner=request.user)
    try:
        services.cancel_order(order_id=order_id, owner=request.user)
    except services.OrderNotCancellable as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Order #{order_id} cancelled.")
    return redirect("orders:detail", order_id=order_id)
