"""Reads of orders and the catalogue for pages and the API alike: only what the caller may see, loaded once.

Writes go through orders/services.py; these return querysets or one object (None when the caller
may not see it), never an HTTP answer: the view or API decides that.
"""

from collections.abc import Iterable
from typing import TYPE_CHECKING

from django.db.models import Q, QuerySet

from core.db import one_snapshot
from payments.models import Payment, Refund

from .models import Order, Product

if TYPE_CHECKING:
    from django.contrib.auth.models import User

# What an order's page and its JSON show: its lines, its history, its payment and the refunds of it.
ORDER_DETAIL = ("items", "events", "payments", "payments__refunds")


def product_list(*, ordering: str = "name", search: str = "") -> QuerySet[Product]:
    """The catalogue; `search` keeps the products whose name or sku contains it (any case)."""
    products = Product.objects.order_by(ordering, "pk")
    if search:
        products = products.filter(Q(name__icontains=search) | Q(sku__icontains=search))
    return products


def product_get(*, sku: str) -> Product | None:
    return Product.objects.filter(sku=sku).first()


def products_by_sku(*, skus: Iterable[str]) -> dict[str, Product]:
    """The products of these skus, by sku; a sku no longer sold is missing from the answer."""
    return Product.objects.in_bulk(list(skus), field_name="sku")


def order_list_for(*, owner: "User", prefetch: tuple[str, ...] = ORDER_DETAIL) -> QuerySet[Order]:
    """The owner's orders, newest first, with what their pages show (`prefetch`: the list page shows only lines)."""
    return Order.objects.filter(owner=owner).prefetch_related(*prefetch)


def order_get_by_key(*, owner: "User", idempotency_key: str) -> Order | None:
    """The owner's order placed with this idempotency key (a submitted checkout), or None."""
    if not idempotency_key:
        return None
    return Order.objects.filter(owner=owner, idempotency_key=idempotency_key).first()


def order_status_for(*, owner: "User", order_id: int) -> str | None:
    """The status of the owner's order, or None for another owner's or a missing one."""
    return Order.objects.filter(owner=owner, pk=order_id).values_list("status", flat=True).first()


def order_was_charged(*, owner: "User", order_id: int) -> bool:
    """Whether the owner's order has a payment that succeeded (whatever was refunded of it since)."""
    return Payment.objects.filter(order_id=order_id, order__owner=owner, status=Payment.Status.SUCCEEDED).exists()


def order_get_for(*, owner: "User", order_id: int) -> Order | None:
    """The owner's order with its lines, history, payment and refunds, all as of one moment (a refund that
    succeeds meanwhile is not read as done beside the order's status from before it); None for another
    owner's or a missing one."""
    with one_snapshot():
        return order_list_for(owner=owner).filter(pk=order_id).first()


def order_get_visible_to(*, user: "User", order_id: int) -> Order | None:
    """The order as staff see it (any order) or its owner does; None for anyone else, as for a missing one."""
    orders = Order.objects.all() if user.is_staff else Order.objects.filter(owner=user)
    return orders.filter(pk=order_id).first()


def order_refunds(order: Order) -> list[Refund]:
    """The refunds of the order's payment, oldest first, from the prefetched `payments__refunds` when loaded."""
    return [refund for payment in order.payments.all() for refund in payment.refunds.all()]


def refund_list_for(*, user: "User", order_id: int) -> QuerySet[Refund] | None:
    """The refunds of an order its owner (or staff) may see, oldest first; None when they may not see the order."""
    if order_get_visible_to(user=user, order_id=order_id) is None:
        return None
    return Refund.objects.filter(payment__order_id=order_id).order_by("created_at", "id")
