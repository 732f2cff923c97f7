"""The cart at sign-in: the account's saved cart comes back, and what the visitor put in the cart is added to it."""

from typing import Any

from django.contrib import messages
from django.contrib.auth.signals import user_logged_in
from django.dispatch import receiver
from django.http import HttpRequest

from .cart import SESSION_KEY, Cart


@receiver(user_logged_in, dispatch_uid="orders.merge_cart_at_sign_in")
def merge_cart_at_sign_in(sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any) -> None:
    """Merge the visitor's cart into the account's: quantities add up, capped by the rules; saved with the account.

    django.contrib.auth.login keeps an anonymous session's data under a new key, so the visitor's
    lines are in this session; a session that belonged to someone else is emptied first, so no
    other shopper's lines are ever merged. Skus no longer sold are left out, and the shopper is told.
    """
    session = getattr(request, "session", None)
    if request is None or session is None:
        return
    visitor = session.pop(SESSION_KEY, None)
    cart = Cart(session, owner=user)
    cart.restore_saved()
    if not isinstance(visitor, dict) or not visitor:
        return
    for note in cart.merge(visitor):
        messages.warning(request, f"Your cart: {note}", fail_silently=True)
