"""Reads of payments for pages and the API: an owner sees only their own."""

from typing import TYPE_CHECKING

from django.db.models import QuerySet

from .models import PaymentMethod
from .services import UnknownPaymentMethod

if TYPE_CHECKING:
    from django.contrib.auth.models import User


def payment_methods_for(*, owner: "User") -> QuerySet[PaymentMethod]:
    """The owner's cards, newest first, without the removed ones."""
    return PaymentMethod.objects.filter(owner=owner, removed_at__isnull=True)


def payment_method_get_for(*, owner: "User", payment_method_id: int) -> PaymentMethod:
    """One of the owner's cards; another owner's, a removed one or none at all raises UnknownPaymentMethod (404)."""
    found = payment_methods_for(owner=owner).filter(pk=payment_method_id).first()
    if found is None:
        raise UnknownPaymentMethod("no such payment method")
    return found
