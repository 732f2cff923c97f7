"""The shopper's cart: `{sku: quantity}` in the session, for visitors and signed-in shoppers alike.

A signed-in shopper's cart is also kept with the account (SavedCart, written on every change):
at sign-in the account's cart comes back and the visitor's lines are added to it
(orders/receivers.py), so the cart follows the shopper from one device to another.

A change is checked against the rules of an order (orders.services: at most MAX_ITEMS products,
1 to MAX_QUANTITY of each, skus the catalogue sells) and against the stock shown, so a cart can be
placed as it is. The catalogue can change after a line was added: a product no longer sold or
short of stock is shown with its problem (CartLine.problem), and checkout waits until the shopper
fixes it. The session holds only skus and quantities; prices and names are read when shown.
"""

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.sessions.backends.base import SessionBase
from django.http import HttpRequest

from . import selectors
from .models import Product, SavedCart
from .services import MAX_ITEMS, MAX_QUANTITY

SESSION_KEY = "cart"
SKU_MAX_LENGTH = Product._meta.get_field("sku").max_length or 64


class CartRefused(Exception):
    """A change of the cart the rules refuse; the message is for the shopper."""


@dataclass(frozen=True)
class CartLine:
    sku: str
    quantity: int
    product: Product | None  # None: no longer sold

    @property
    def line_total(self) -> Decimal:
        return self.product.price * self.quantity if self.product else Decimal("0.00")

    @property
    def problem(self) -> str:
        """What stops this line from being ordered, in words for the shopper ("" when nothing does)."""
        if self.product is None:
            return "This product is no longer sold: remove it to check out."
        if self.product.stock == 0:
            return "Sold out: remove it to check out."
        if self.quantity > self.product.stock:
            return f"Only {self.product.stock} left: lower the quantity to check out."
        return ""


@dataclass(frozen=True)
class CartSummary:
    lines: list[CartLine]
    subtotal: Decimal
    shipping: Decimal
    total: Decimal

    @property
    def units(self) -> int:
        return sum(line.quantity for line in self.lines)

    @property
    def problems(self) -> list[CartLine]:
        return [line for line in self.lines if line.problem]


def _valid_quantities(raw: object) -> dict[str, int]:
    """What the session holds, as the rules allow it: anything else there (an older format, a bug) is dropped."""
    if not isinstance(raw, dict):
        return {}
    kept: dict[str, int] = {}
    for sku, quantity in raw.items():
        if len(kept) >= MAX_ITEMS:
            break
        if isinstance(sku, str) and 0 < len(sku) <= SKU_MAX_LENGTH and type(quantity) is int:
            if 0 < quantity <= MAX_QUANTITY:
                kept[sku] = quantity
    return kept


def _check_quantity(quantity: int, *, minimum: int) -> None:
    if type(quantity) is not int or not minimum <= quantity <= MAX_QUANTITY:
        raise CartRefused(f"The quantity must be a whole number from {minimum} to {MAX_QUANTITY}.")


def _check_stock(product: Product, quantity: int) -> None:
    if product.stock == 0:
        raise CartRefused(f"{product.name} is sold out.")
    if quantity > product.stock:
        raise CartRefused(f"Only {product.stock} of {product.name} left: you can have at most {product.stock}.")


class Cart:
    """The cart of one session. Each change is saved in the session at once, and with the account of `owner`."""

    def __init__(self, session: SessionBase, owner: Any = None):
        self.session = session
        self.owner = owner

    @property
    def quantities(self) -> dict[str, int]:
        return _valid_quantities(self.session.get(SESSION_KEY))

    def __len__(self) -> int:
        return len(self.quantities)

    def _save(self, quantities: dict[str, int]) -> None:
        if quantities:
            self.session[SESSION_KEY] = quantities
        else:
            self.session.pop(SESSION_KEY, None)
        if self.owner is not None:
            SavedCart.objects.update_or_create(owner=self.owner, defaults={"quantities": quantities})

    def restore_saved(self) -> None:
        """Put the account's saved cart in the session (at sign-in, before the visitor's lines are added)."""
        saved = SavedCart.objects.filter(owner=self.owner).values_list("quantities", flat=True).first()
        quantities = _valid_quantities(saved)
        if quantities:
            self.session[SESSION_KEY] = quantities

    def _product(self, sku: str) -> Product:
        product = selectors.product_get(sku=sku) if 0 < len(sku) <= SKU_MAX_LENGTH else None
        if product is None:
            raise CartRefused(f"There is no product with the sku {sku[:SKU_MAX_LENGTH]!r}.")
        return product

    def add(self, *, sku: str, quantity: int) -> Product:
        """Add `quantity` of a product to its line (made if new). Raises CartRefused."""
        _check_quantity(quantity, minimum=1)
        product = self._product(sku)
        quantities = self.quantities
        if sku not in quantities and len(quantities) >= MAX_ITEMS:
            raise CartRefused(f"A cart holds at most {MAX_ITEMS} different products.")
        wanted = quantities.get(sku, 0) + quantity
        if wanted > MAX_QUANTITY:
            raise CartRefused(f"You can order at most {MAX_QUANTITY} of one product.")
        _check_stock(product, wanted)
        quantities[sku] = wanted
        self._save(quantities)
        return product

    def set(self, *, sku: str, quantity: int) -> Product | None:
        """Set a line's quantity (0 removes it). Raises CartRefused; returns the product (None once removed)."""
        _check_quantity(quantity, minimum=0)
        if quantity == 0:
            self.remove(sku=sku)
            return None
        quantities = self.quantities
        if sku not in quantities:
            raise CartRefused("That product is not in your cart.")
        product = self._product(sku)
        _check_stock(product, quantity)
        quantities[sku] = quantity
        self._save(quantities)
        return product

    def remove(self, *, sku: str) -> None:
        quantities = self.quantities
        if quantities.pop(sku, None) is None:
            raise CartRefused("That product is not in your cart.")
        self._save(quantities)

    def clear(self) -> None:
        self._save({})

    def merge(self, other: Mapping[str, object], *, add_up: bool = True) -> list[str]:
        """Take another cart's lines into this one: quantities add up (or, `add_up=False`, the larger one stays).

        Capped by the rules; a sku no longer sold and lines past MAX_ITEMS are left out. Returns what
        was left out or lowered, in words for the shopper.
        """
        quantities = self.quantities
        incoming = _valid_quantities(dict(other))
        known = selectors.products_by_sku(skus=incoming)
        notes = []
        for sku, quantity in sorted(incoming.items()):
            if sku not in known:
                notes.append(f"{sku} is no longer sold and was left out.")
                continue
            if sku not in quantities and len(quantities) >= MAX_ITEMS:
                notes.append(f"{known[sku].name} was left out: a cart holds at most {MAX_ITEMS} products.")
                continue
            current = quantities.get(sku, 0)
            wanted = current + quantity if add_up else max(current, quantity)
            if wanted > MAX_QUANTITY:
                notes.append(f"{known[sku].name}: lowered to {MAX_QUANTITY}, the most one order takes.")
                wanted = MAX_QUANTITY
            quantities[sku] = wanted
        self._save(quantities)
        return notes

    def summary(self) -> CartSummary:
        """The lines with their products (one query), the subtotal, the flat shipping fee and the total."""
        quantities = self.quantities
        products = selectors.products_by_sku(skus=quantities) if quantities else {}
        lines = [CartLine(sku=sku, quantity=qty, product=products.get(sku)) for sku, qty in quantities.items()]
        lines.sort(key=lambda line: (line.product.name if line.product else line.sku, line.sku))
        subtotal = sum((line.line_total for line in lines), Decimal("0.00"))
        # orders.services.place_order charges it on every order shipped to an address, as checkout's are.
        shipping = Decimal(settings.SHIPPING_FEE) if lines else Decimal("0.00")
        return CartSummary(lines=lines, subtotal=subtotal, shipping=shipping, total=subtotal + shipping)

    def digest(self) -> str:
        """A short fingerprint of the lines: a review placed later must still match the cart."""
        return hashlib.sha256(json.dumps(self.items()).encode()).hexdigest()[:32]

    def items(self) -> list[tuple[str, int]]:
        """The lines as orders.services.place_order takes them."""
        return sorted(self.quantities.items())


def cart_for(request: HttpRequest) -> Cart:
    """The request's cart, kept with the account too when the shopper is signed in."""
    user = getattr(request, "user", None)
    return Cart(request.session, owner=user if user is not None and user.is_authenticated else None)
