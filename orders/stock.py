"""Stock on hand changes only here, by delta, each change recorded as a StockMovement.

Every write is a conditional UPDATE with F(), so a change never works from a stale
read and stock never goes below zero. Products are always updated in pk order.
"""

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from django.db import IntegrityError, transaction
from django.db.models import F, OuterRef, Subquery, Sum
from django.db.models.functions import Coalesce

from .models import Order, Product, StockMovement

if TYPE_CHECKING:
    from django.contrib.auth.models import User


class StockError(Exception):
    """Base of the errors a caller can show to the operator."""


class InvalidStockChange(StockError):
    pass


class InsufficientStock(StockError):
    def __init__(self, *, product_id: int, delta: int, on_hand: int):
        self.product_id = product_id
        self.delta = delta
        self.on_hand = on_hand
        super().__init__(f"cannot take {-delta} units: only {on_hand} in stock")


def _once_per_submission(submission: str, change: Callable[[], StockMovement]) -> StockMovement:
    """Run a staff stock change once per form submission: a second post of the same form returns the first movement.

    The unique constraint on StockMovement.submission decides between two concurrent posts; the
    loser's stock update rolls back with its failed insert.
    """
    if submission and (done := StockMovement.objects.filter(submission=submission).first()):
        return done
    try:
        with transaction.atomic():
            return change()
    except IntegrityError:
        done = StockMovement.objects.filter(submission=submission).first() if submission else None
        if done is None:
            raise
        return done


def receive_stock(
    *, product_id: int, quantity: int, reason: str = "", user: "User | None" = None, submission: str = ""
) -> StockMovement:
    """Add received units to the product's stock on hand; record a `received` movement (once per `submission`)."""
    if type(quantity) is not int or quantity <= 0:
        raise InvalidStockChange("the received quantity must be a whole number above zero")

    def change() -> StockMovement:
        if not Product.objects.filter(pk=product_id).update(stock=F("stock") + quantity):
            raise Product.DoesNotExist(f"no product {product_id}")
        return StockMovement.objects.create(
            product_id=product_id,
            delta=quantity,
            kind=StockMovement.Kind.RECEIVED,
            reason=reason,
            created_by=user,
            submission=submission,
        )

    return _once_per_submission(submission, change)


def adjust_stock(
    *, product_id: int, delta: int, reason: str, user: "User | None" = None, submission: str = ""
) -> StockMovement:
    """Correct the product's stock on hand by delta (a count, breakage); record an `adjusted` movement.

    Once per `submission`. Raises InsufficientStock when a negative delta is larger than the stock on hand.
    """
    if type(delta) is not int or delta == 0:
        raise InvalidStockChange("the adjustment must be a whole number other than zero")
    if not reason.strip():
        raise InvalidStockChange("an adjustment needs a reason")

    def change() -> StockMovement:
        updated = Product.objects.filter(pk=product_id, stock__gte=max(-delta, 0)).update(stock=F("stock") + delta)
        if not updated:
            on_hand = Product.objects.filter(pk=product_id).values_list("stock", flat=True).first()
            if on_hand is None:
                raise Product.DoesNotExist(f"no product {product_id}")
            raise InsufficientStock(product_id=product_id, delta=delta, on_hand=on_hand)
        return StockMovement.objects.create(
            product_id=product_id,
            delta=delta,
            kind=StockMovement.Kind.ADJUSTED,
            reason=reason,
            created_by=user,
            submission=submission,
        )

    return _once_per_submission(submission, change)


def reserve_for_order(*, order: Order) -> list[str]:
    """Take every item of the order from stock, one `reserved` movement each; return the skus that are short.

    All or nothing: when any item is short, nothing is taken or recorded. Call while
    holding the order's row lock, once per order (a second call reserves again).

    The products are locked first, in id order as every reservation takes them (two orders never wait
    on each other in turn), checked here, and taken in one UPDATE, by delta: three statements whatever
    the number of lines, and no savepoint to undo a partial take (issue 18: one UPDATE a line before).
    """
    items = list(order.items.order_by("product_id"))
    products = {
        product.pk: product
        # FOR NO KEY UPDATE, the lock the UPDATE takes: a line being inserted meanwhile takes a KEY SHARE lock on
        # its product (the foreign key's check), which FOR UPDATE would block, and an order placed for the same
        # products in another order would deadlock with this reservation.
        for product in Product.objects.select_for_update(no_key=True)
        .filter(pk__in={item.product_id for item in items})
        .order_by("pk")
        .only("pk", "stock")
    }
    short: list[str] = []
    taken: Counter[int] = Counter()
    for item in items:
        product = products.get(item.product_id)
        if product is None or product.stock - taken[item.product_id] < item.quantity:
            short.append(item.sku)
        else:
            taken[item.product_id] += item.quantity
    if short:
        return short
    for product_id, quantity in taken.items():
        # By delta, as every stock change (stock = stock - n): never an absolute number read earlier.
        products[product_id].stock = F("stock") - quantity
    Product.objects.bulk_update(products.values(), ["stock"])
    StockMovement.objects.bulk_create(
        StockMovement(product_id=item.product_id, delta=-item.quantity, kind=StockMovement.Kind.RESERVED, order=order)
        for item in items
    )
    return []


def held_by_order(*, order: Order) -> Counter[int]:
    """The units the order holds of each product: its `reserved` movements less its `released` ones."""
    rows = (
        StockMovement.objects.filter(order=order, kind__in=[StockMovement.Kind.RESERVED, StockMovement.Kind.RELEASED])
        .values("product_id")
        .annotate(net=Sum("delta"))
        .values_list("product_id", "net")
    )
    return Counter({product_id: -net for product_id, net in rows if net < 0})


def units_to_ship(*, order: Order) -> list[tuple[str, int]]:
    """(sku, units) of each line less what the order's `released` movements gave back of its product, in one read."""
    released = (
        StockMovement.objects.filter(order=order, kind=StockMovement.Kind.RELEASED, product_id=OuterRef("product_id"))
        .values("product_id")
        .annotate(total=Sum("delta"))
        .values("total")
    )
    lines = order.items.annotate(released=Coalesce(Subquery(released), 0)).values_list("sku", "quantity", "released")
    return [(sku, quantity - released) for sku, quantity, released in lines]


def release_for_order(*, order: Order) -> None:
    """Give back what the order still holds by its `reserved` movements, one `released` movement per item.

    Releasing again gives nothing back: what was released is no longer held.
    Call while holding the order's row lock.
    """
    held = (
        StockMovement.objects.filter(order=order, kind__in=[StockMovement.Kind.RESERVED, StockMovement.Kind.RELEASED])
        .values("product_id")
        .annotate(net=Sum("delta"))
        .filter(net__lt=0)
        .order_by("product_id")
    )
    with transaction.atomic():
        released = []
        for row in held:
            Product.objects.filter(pk=row["product_id"]).update(stock=F("stock") - row["net"])
            released.append(
                StockMovement(
                    product_id=row["product_id"], delta=-row["net"], kind=StockMovement.Kind.RELEASED, order=order
                )
            )
        StockMovement.objects.bulk_create(released)


def release_units(*, order: Order, units: dict[int, int]) -> None:
    """Give back `units` ({product id: quantity}) of what the order holds, one `released` movement per product.

    Never more than the order still holds of a product (its `reserved` movements less its
    `released` ones). For lines refunded before the warehouse has them. Call while holding the
    order's row lock.
    """
    held = held_by_order(order=order)
    with transaction.atomic():
        released = []
        for product_id in sorted(units):
            quantity = min(units[product_id], held[product_id])
            if quantity <= 0:
                continue
            Product.objects.filter(pk=product_id).update(stock=F("stock") + quantity)
            released.append(
                StockMovement(product_id=product_id, delta=quantity, kind=StockMovement.Kind.RELEASED, order=order)
            )
        StockMovement.objects.bulk_create(released)
