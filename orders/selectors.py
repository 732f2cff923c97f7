"""Reads of orders and the catalogue for pages and the API alike: only what the caller may see, loaded once.

Writes go through orders/services.py; these return querysets or one object (None when the caller
may not see it), never an HTTP answer: the view or API decides that.
"""

from typing import TYPE_CHECKING

from django.db.models import QuerySet

from .models import Order, Product

if TYPE_CHECKING:
    from django.contrib.auth.models import User

# What an order's page and its JSON show: its lines, its history and its payment.
ORDER_DETAIL = ("items", "events", "payments")


def product_list(*, ordering: str = "name") -> QuerySet[Product]:
    return Product.objects.order_by(ordering)


def order_list_for(*, owner: "User", prefetch: tuple[str, ...] = ORDER_DETAIL) -> QuerySet[Order]:
    """The owner's orders, newest first, with what their pages show (`prefetch`: the list page shows only lines)."""
    return Order.objects.filter(owner=owner).prefetch_related(*prefetch)


def order_get_for(*, owner: "User", order_id: int) -> Order | None:
    """The owner's order with its lines, history and payment; None for another owner's or a missing one."""
    return order_list_for(owner=owner).filter(pk=order_id).first()
