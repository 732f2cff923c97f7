"""Order business rules: placing, reserving stock, cancelling.

Status changes happen only here, under the order's row lock, each with an
OrderEvent. Locks are always taken order first, then products by pk.
"""

import logging
import secrets
from collections.abc import Iterable, Sequence
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Exists, F, OuterRef
from django.utils import timezone

from .models import ApiToken, Order, OrderEvent, OrderItem, Product

logger = logging.getLogger(__name__)

MAX_ITEMS = 50
MAX_QUANTITY = 1000


class OrderError(Exception):
    """Base of the errors a caller can show to the shopper."""

    field = "items"


class InvalidItems(OrderError):
    pass


class UnknownProduct(OrderError):
    def __init__(self, skus: Iterable[str]):
        self.skus = sorted(skus)
        super().__init__(f"unknown sku: {', '.join(self.skus)}")


class IdempotencyKeyReused(OrderError):
    field = "Idempotency-Key"

    def __init__(self) -> None:
        super().__init__("this Idempotency-Key was already used for an order with other items")


class OrderNotCancellable(OrderError):
    field = "status"

    def __init__(self, order: Order):
        super().__init__(f"an order in status {order.status} cannot be cancelled")


ItemSpec = tuple[str, int]


def _check_items(items: Sequence[ItemSpec]) -> list[ItemSpec]:
    if not items:
        raise InvalidItems("an order needs at least one item")
    if len(items) > MAX_ITEMS:
        raise InvalidItems(f"an order holds at most {MAX_ITEMS} items")
    skus = [sku for sku, _ in items]
    if len(set(skus)) != len(skus):
        raise InvalidItems("each sku may appear only once")
    for sku, quantity in items:
        if type(quantity) is not int or not 0 < quantity <= MAX_QUANTITY:
            raise InvalidItems(f"quantity for {sku} must be a whole number from 1 to {MAX_QUANTITY}")
    return sorted(items)


def _same_items(order: Order, items: list[ItemSpec]) -> bool:
    return sorted(order.items.values_list("sku", "quantity")) == items


def _existing_for_key(owner, idempotency_key: str, items: list[ItemSpec]) -> Order | None:
    order = Order.objects.filter(owner=owner, idempotency_key=idempotency_key).first()
    if order is not None and not _same_items(order, items):
        raise IdempotencyKeyReused()
    return order


def place_order(*, owner, items: Sequence[ItemSpec], idempotency_key: str = "") -> Order:
    """Create a pending order with prices copied from the catalogue; dispatch processing after commit.

    The same idempotency key from the same owner returns the first order (also when
    two requests race); the same key with other items raises IdempotencyKeyReused.
    """
    from . import tasks

    wanted = _check_items(items)
    if idempotency_key:
        existing = _existing_for_key(owner, idempotency_key, wanted)
        if existing is not None:
            return existing
    products = Product.objects.in_bulk([sku for sku, _ in wanted], field_name="sku")
    missing = {sku for sku, _ in wanted} - products.keys()
    if missing:
        raise UnknownProduct(missing)
    try:
        with transaction.atomic():
            order = Order.objects.create(
                owner=owner,
                idempotency_key=idempotency_key,
                total=sum((products[sku].price * qty for sku, qty in wanted), Decimal("0.00")),
            )
            OrderItem.objects.bulk_create(
                OrderItem(
                    order=order,
                    product=products[sku],
                    sku=sku,
                    name=products[sku].name,
                    unit_price=products[sku].price,
                    quantity=qty,
                )
                for sku, qty in wanted
            )
            OrderEvent.objects.create(order=order, to_status=Order.Status.PENDING, note="placed")
            tasks.process_order.delay_on_commit(order.pk)
    except IntegrityError:
        # A concurrent request with the same key won the unique constraint.
        if not idempotency_key:
            raise
        existing = _existing_for_key(owner, idempotency_key, wanted)
        if existing is None:
            raise
        return existing
    return order


def _set_status(order: Order, to_status: str, note: str = "") -> None:
    """Record a status change. Call while holding the order's row lock."""
    OrderEvent.objects.create(order=order, from_status=order.status, to_status=to_status, note=note)
    order.status = to_status
    order.save(update_fields=["status", "updated_at"])
    from notifications import services as notifications

    kind = notifications.ORDER_STATUS_KINDS.get(to_status)
    if kind:
        notifications.notify(kind=kind, object_type="order", object_id=order.pk, recipient_id=order.owner_id)


def _lock_order(order_id: int) -> Order | None:
    return Order.objects.select_for_update().filter(pk=order_id).first()


def _release_stock(order: Order) -> None:
    """Give reserved units back. Call while holding the order's row lock."""
    for item in order.items.order_by("product_id"):
        Product.objects.filter(pk=item.product_id).update(stock=F("stock") + item.quantity)


def process_order(*, order_id: int) -> Order | None:
    """Reserve stock for a pending order: pending -> confirmed, or -> rejected when short.

    Idempotent: an order that is no longer pending (or gone) is left as it is.
    """
    with transaction.atomic():
        order = _lock_order(order_id)
        if order is None:
            logger.warning("process_order: order %s does not exist", order_id)
            return None
        if order.status != Order.Status.PENDING:
            return order
        short = []
        try:
            with transaction.atomic():
                # Products in pk order so two orders never wait on each other in a cycle;
                # the conditional UPDATE is the oversell guard.
                for item in order.items.order_by("product_id"):
                    updated = Product.objects.filter(pk=item.product_id, stock__gte=item.quantity).update(
                        stock=F("stock") - item.quantity
                    )
                    if not updated:
                        short.append(item.sku)
                if short:
                    raise _OutOfStock()
        except _OutOfStock:
            _set_status(order, Order.Status.REJECTED, note=f"out of stock: {', '.join(short)}")
            return order
        _set_status(order, Order.Status.CONFIRMED, note="stock reserved")
        _dispatch_charge(order.pk)
    return order


def _dispatch_charge(order_id: int) -> None:
    from payments import tasks as payment_tasks

    payment_tasks.charge_order.delay_on_commit(order_id)


class _OutOfStock(Exception):
    """Rolls back the partial reservation of an order that cannot be filled."""


def cancel_order(*, order_id: int, owner) -> Order:
    """Cancel the owner's order while pending or confirmed and not yet being charged; stock is released."""
    with transaction.atomic():
        order = Order.objects.select_for_update().get(pk=order_id, owner=owner)
        # A claimed payment means the provider may already be charging: too late to cancel.
        if not order.can_cancel or order.payments.exists():
            raise OrderNotCancellable(order)
        if order.status == Order.Status.CONFIRMED:
            _release_stock(order)
        _set_status(order, Order.Status.CANCELLED, note="cancelled by owner")
    return order


def mark_paid(*, order_id: int) -> Order | None:
    """confirmed -> paid, then dispatch fulfillment after commit. Idempotent."""
    from . import tasks

    with transaction.atomic():
        order = _lock_order(order_id)
        if order is None or order.status != Order.Status.CONFIRMED:
            return order
        _set_status(order, Order.Status.PAID, note="payment succeeded")
        tasks.sync_to_fulfillment.delay_on_commit(order.pk)
    return order


def fail_payment(*, order_id: int, reason: str = "") -> Order | None:
    """confirmed -> payment_failed, releasing the reserved stock. Idempotent."""
    with transaction.atomic():
        order = _lock_order(order_id)
        if order is None or order.status != Order.Status.CONFIRMED:
            return order
        _release_stock(order)
        _set_status(order, Order.Status.PAYMENT_FAILED, note=f"payment declined: {reason}"[:255])
    return order


def sync_to_fulfillment(*, order_id: int) -> Order | None:
    """Hand a paid order to the warehouse once (key `shipment-order-<id>`): paid -> fulfilled.

    Raises gateway.ProviderUnavailable when the warehouse cannot be reached; retrying is safe.
    Returns None when the order is gone.
    """
    from payments import gateway

    order = Order.objects.filter(pk=order_id).first()
    if order is None or order.status != Order.Status.PAID:
        return order
    items = [{"sku": item.sku, "quantity": item.quantity} for item in order.items.all()]
    shipment = gateway.create_shipment(order_id=order.pk, items=items, idempotency_key=f"shipment-order-{order.pk}")
    with transaction.atomic():
        order = _lock_order(order_id)
        if order is not None and order.status == Order.Status.PAID:
            _set_status(order, Order.Status.FULFILLED, note=f"shipment {shipment.id}")
    return order


def redispatch_stale_orders(*, older_than: timedelta | None = None) -> list[int]:
    """Dispatch the next task again for orders stuck in pending, confirmed or paid.

    Such an order lost its message (committed while the broker was down). Harmless for
    orders whose message is merely slow: every step is idempotent.
    """
    from . import tasks

    if older_than is None:
        older_than = timedelta(seconds=settings.STALE_ORDER_SECONDS)
    cutoff = timezone.now() - older_than
    from payments import tasks as payment_tasks
    from payments.models import Payment

    next_step = {
        Order.Status.PENDING: tasks.process_order,
        Order.Status.CONFIRMED: payment_tasks.charge_order,
        Order.Status.PAID: tasks.sync_to_fulfillment,
    }
    # A charge still being retried with backoff is not lost: leave it to its own retries
    # until it has been quiet for longer than its whole retry budget.
    charge_in_flight = Payment.objects.filter(
        order=OuterRef("pk"),
        status=Payment.Status.PROCESSING,
        updated_at__gte=timezone.now() - timedelta(seconds=settings.CHARGE_RETRY_WINDOW_SECONDS),
    )
    stale = list(
        Order.objects.filter(status__in=next_step.keys(), updated_at__lt=cutoff)
        .exclude(Exists(charge_in_flight))
        .order_by("id")
        .values_list("id", "status")[:1000]
    )
    for order_id, status in stale:
        next_step[status].delay(order_id)
    if stale:
        logger.info("re-dispatched %d stale orders", len(stale))
    return [order_id for order_id, _ in stale]


def issue_api_token(*, user) -> str:
    """Create an API token for the user and return it; only its digest is stored."""
    raw = secrets.token_urlsafe(32)
    ApiToken.objects.create(user=user, digest=ApiToken.digest_of(raw))
    return raw


def user_for_token(raw: str):
    """The active user a raw API token belongs to, or None."""
    token = ApiToken.objects.select_related("user").filter(digest=ApiToken.digest_of(raw)).first()
    if token is None or not token.user.is_active:
        return None
    return token.user
