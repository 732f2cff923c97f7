"""Order business rules: placing, reserving stock, cancelling.

Status changes happen only here, under the order's row lock, each with an
OrderEvent. Locks are always taken order first, then products by pk.
"""

import logging
import secrets
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import IntegrityError, transaction

from accounts.services import clean_address
from core.errors import ApplicationError
from integrations import warehouse
from integrations.errors import ProviderUnavailable
from payments import selectors as payment_selectors
from payments import services as payment_services
from payments.models import Payment

from . import pipeline, stock
from .models import Order, OrderItem, Product

if TYPE_CHECKING:
    from django.contrib.auth.models import User

logger = logging.getLogger(__name__)

MAX_ITEMS = 50
MAX_QUANTITY = 1000


class OrderError(ApplicationError):
    """Base of the errors a caller can show to the shopper."""

    field = "items"


class InvalidItems(OrderError):
    code = "invalid_items"


class UnknownProduct(OrderError):
    code = "unknown_sku"

    def __init__(self, skus: Iterable[str]):
        self.skus = sorted(skus)
        super().__init__(f"unknown sku: {', '.join(self.skus)}")


class IdempotencyKeyReused(OrderError):
    code = "idempotency_key_reused"
    field = "idempotency_key"

    def __init__(self) -> None:
        super().__init__("this Idempotency-Key was already used for an order with other items or another card")


class OrderNotCancellable(OrderError):
    code = "not_cancellable"
    status = 409
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


def _existing_for_key(
    owner: "User", idempotency_key: str, items: list[ItemSpec], payment_method_id: int | None
) -> Order | None:
    order = Order.objects.filter(owner=owner, idempotency_key=idempotency_key).first()
    if order is not None and (order.payment_method_id != payment_method_id or not _same_items(order, items)):
        raise IdempotencyKeyReused()
    return order


def place_order(
    *,
    owner: "User",
    items: Sequence[ItemSpec],
    idempotency_key: str = "",
    payment_method_id: int | None = None,
    shipping_address: dict[str, object] | None = None,
) -> Order:
    """Create a pending order with prices copied from the catalogue; its processing is an outbox item of its commit.

    The same idempotency key from the same owner returns the first order (also when
    two requests race); the same key with other items raises IdempotencyKeyReused.
    `payment_method_id` must name one of the owner's cards (else UnknownPaymentMethod, 404);
    the order is charged to it. `shipping_address` (accounts.services.clean_address's fields,
    else InvalidAddress) is copied onto the order, which then pays the flat SHIPPING_FEE on top
    of its lines.
    """
    wanted = _check_items(items)
    address = clean_address(shipping_address) if shipping_address is not None else None
    payment_method = (
        payment_selectors.payment_method_get_for(owner=owner, payment_method_id=payment_method_id)
        if payment_method_id is not None
        else None
    )
    if idempotency_key:
        existing = _existing_for_key(owner, idempotency_key, wanted, payment_method_id)
        if existing is not None:
            return existing
    products = Product.objects.in_bulk([sku for sku, _ in wanted], field_name="sku")
    missing = {sku for sku, _ in wanted} - products.keys()
    if missing:
        raise UnknownProduct(missing)
    try:
        with transaction.atomic():
            shipping_fee = Decimal(settings.SHIPPING_FEE) if address else Decimal("0.00")
            order = Order.objects.create(
                owner=owner,
                idempotency_key=idempotency_key,
                total=sum((products[sku].price * qty for sku, qty in wanted), shipping_fee),
                payment_method=payment_method,
                shipping_address=address or {},
                shipping_fee=shipping_fee,
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
            pipeline.start(order)
    except IntegrityError:
        # A concurrent request with the same key won the unique constraint.
        if not idempotency_key:
            raise
        existing = _existing_for_key(owner, idempotency_key, wanted, payment_method_id)
        if existing is None:
            raise
        return existing
    return order


def _lock_order(order_id: int) -> Order | None:
    return Order.objects.select_for_update().filter(pk=order_id).first()


def _release_stock(order: Order) -> None:
    """Give reserved units back. Call while holding the order's row lock."""
    stock.release_for_order(order=order)


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
        short = stock.reserve_for_order(order=order)
        if short:
            return pipeline.set_status(order, Order.Status.REJECTED, note=f"out of stock: {', '.join(short)}")
        return pipeline.set_status(order, Order.Status.CONFIRMED, note="stock reserved")


def charge_order(*, order_id: int) -> Order | None:
    """Charge a confirmed order once and apply the outcome: -> paid, -> payment_failed (stock released), or on hold.

    The payment is claimed under the order's lock (cancel_order takes the same lock and
    refuses once a payment exists); the provider is called outside any transaction.
    An order whose total is zero is paid without a payment. Raises
    integrations.errors.ProviderUnavailable when the provider could not answer; retrying is safe.
    """
    with transaction.atomic():
        order = _lock_order(order_id)
        if order is None:
            logger.warning("charge_order: order %s does not exist", order_id)
            return None
        payment = Payment.objects.filter(order=order).first()
        if payment is None:
            if order.status != Order.Status.CONFIRMED:
                return order
            if order.total == 0:
                return pipeline.set_status(order, Order.Status.PAID, note="nothing to charge: total is zero")
            payment = payment_services.claim_order_payment(order=order)
    payment = payment_services.settle_payment(payment_id=payment.pk)
    return apply_payment_outcome(order_id=order_id, payment=payment)


def apply_payment_outcome(*, order_id: int, payment: Payment) -> Order | None:
    """Move the order as its payment's outcome says. Idempotent; a payment still processing changes nothing."""
    with transaction.atomic():
        order = _lock_order(order_id)
        if order is None:
            return None
        waiting = order.status == Order.Status.CONFIRMED or _held_from(order, Order.Status.CONFIRMED)
        if not waiting:
            return order
        if payment.status == Payment.Status.SUCCEEDED:
            pipeline.set_status(order, Order.Status.PAID, note="payment succeeded")
        elif payment.status == Payment.Status.DECLINED:
            _release_stock(order)
            pipeline.set_status(order, Order.Status.PAYMENT_FAILED, note=f"payment declined: {payment.failure_reason}")
        elif payment.status == Payment.Status.NEEDS_ATTENTION and order.status != Order.Status.ON_HOLD:
            pipeline.set_status(
                order,
                Order.Status.ON_HOLD,
                note=f"payment needs attention: {payment.failure_reason}",
                hold_reason=HOLD_MESSAGES[Order.Status.CONFIRMED],
            )
    return order


def cancel_order(*, order_id: int, owner: "User") -> Order:
    """Cancel the owner's order while pending or confirmed and not yet being charged; stock is released."""
    with transaction.atomic():
        order = Order.objects.select_for_update().get(pk=order_id, owner=owner)
        # A claimed payment means the provider may already be charging: too late to cancel.
        if not order.can_cancel or order.payments.exists():
            raise OrderNotCancellable(order)
        if order.status == Order.Status.CONFIRMED:
            _release_stock(order)
        pipeline.set_status(order, Order.Status.CANCELLED, note="cancelled by owner")
    return order


def sync_to_fulfillment(*, order_id: int) -> Order | None:
    """Hand a paid order to the warehouse once (its stored random key): paid (or held on the way) -> fulfilled.

    Raises integrations.errors.ProviderUnavailable when the warehouse cannot be reached (retrying
    is safe) and ProviderRejected when it refuses. Returns None when the order is gone.
    """
    order = Order.objects.filter(pk=order_id).first()
    if order is None or not _awaits_shipment(order):
        return order
    items = [{"sku": item.sku, "quantity": item.quantity} for item in order.items.all()]
    key = order.fulfillment_key or _claim_fulfillment_key(order_id)
    shipment = warehouse.create_shipment(order_id=order.pk, items=items, idempotency_key=key)
    with transaction.atomic():
        order = _lock_order(order_id)
        if order is not None and _awaits_shipment(order):
            pipeline.set_status(order, Order.Status.FULFILLED, note=f"shipment {shipment.id}")
    return order


def _claim_fulfillment_key(order_id: int) -> str:
    """The order's warehouse key, made (random) and committed before its first hand-over, kept for every retry."""
    with transaction.atomic():
        order = Order.objects.select_for_update().get(pk=order_id)
        if not order.fulfillment_key:
            order.fulfillment_key = f"ship_{secrets.token_hex(16)}"
            order.save(update_fields=["fulfillment_key"])
        return order.fulfillment_key


def _awaits_shipment(order: Order) -> bool:
    return order.status == Order.Status.PAID or _held_from(order, Order.Status.PAID)


# --- Holds: a step that cannot finish by itself ------------------------------------------

# What the shopper reads on an order held on the way from each status.
HOLD_MESSAGES: dict[str, str] = {
    Order.Status.PENDING: "We could not process your order yet. Our staff have been told and will sort it out.",
    Order.Status.CONFIRMED: (
        "Your payment could not be completed. Our staff are looking into it; you will not be charged twice."
    ),
    Order.Status.PAID: (
        "Your order is paid. Handing it to the warehouse is taking longer than usual; we keep trying automatically."
    ),
}


# What the shopper reads once a step stopped trying by itself: staff take over.
STOPPED_HOLD_MESSAGES: dict[str, str] = {
    Order.Status.PAID: (
        "Your order is paid. Handing it to the warehouse failed repeatedly; our staff have been told and will "
        "send it as soon as possible."
    ),
}


class NotOnHold(OrderError):
    code = "not_on_hold"
    status = 409
    field = "status"

    def __init__(self, order: Order | None, action: str, order_id: int | None = None):
        if order is None:
            super().__init__(f"order {order_id} does not exist: cannot {action}")
        else:
            super().__init__(f"order {order.pk} is {order.status}: cannot {action}")


def held_from(order: Order) -> str | None:
    """The status an order on hold left when it was held, or None when it is not on hold."""
    if order.status != Order.Status.ON_HOLD:
        return None
    return (
        # By id, not time: events are written by several processes whose clocks may differ.
        order.events.filter(to_status=Order.Status.ON_HOLD)
        .order_by("-id")
        .values_list("from_status", flat=True)
        .first()
    )


def _held_from(order: Order, status: str) -> bool:
    return order.status == Order.Status.ON_HOLD and held_from(order) == status


def hold_stuck_order(*, order_id: int, task_name: str, reason: str, resumes: bool = False) -> Order | None:
    """The step `task_name` failed for good: the order goes on hold, with a message the shopper can read.

    A charge step whose payment already has its outcome (recorded before the task died) applies
    it instead; an unfinished one leaves its payment in needs_attention. A step that stopped
    resuming by itself gets a hold message that no longer promises it. Idempotent.
    """
    waiting_in = {task: status for status, task in pipeline.NEXT_STEP.items()}[task_name]
    if waiting_in == Order.Status.CONFIRMED:
        payment = Payment.objects.filter(order_id=order_id).first()
        if payment is not None and payment.status in (Payment.Status.SUCCEEDED, Payment.Status.DECLINED):
            return apply_payment_outcome(order_id=order_id, payment=payment)
    with transaction.atomic():
        order = _lock_order(order_id)
        if order is None:
            return None
        if _held_from(order, waiting_in) and not resumes:
            # Held while it resumed by itself; now it has stopped: say so, staff act.
            order.hold_reason = STOPPED_HOLD_MESSAGES.get(waiting_in, HOLD_MESSAGES[waiting_in])
            order.save(update_fields=["hold_reason", "updated_at"])
            return order
        if order.status != waiting_in:
            return order
        if waiting_in == Order.Status.CONFIRMED:
            payment_services.mark_needs_attention(order_id=order.pk, reason=reason)
        note = f"{task_name.rsplit('.', 1)[-1]} failed: {reason}" + (" (tried again automatically)" if resumes else "")
        message = (
            HOLD_MESSAGES[waiting_in]
            if resumes or waiting_in != Order.Status.PAID
            else STOPPED_HOLD_MESSAGES[waiting_in]
        )
        pipeline.set_status(order, Order.Status.ON_HOLD, note=note, hold_reason=message)
    logger.warning("order %s on hold: %s", order_id, note)
    return order


class PaymentTaken(OrderError):
    code = "payment_taken"
    status = 409
    field = "status"

    def __init__(self, order: Order):
        super().__init__(f"order {order.pk}: the provider took the payment, so the order is {order.status}, not failed")


class ProviderNotConfirmed(ProviderUnavailable):
    """Staff acted on a held charge while the provider could not be asked: worth trying again."""

    def __init__(self, order_id: int, error: Exception):
        super().__init__(f"order {order_id}: the provider could not be asked what it charged ({error}); try again")


def _settle_with_provider(order_id: int) -> Payment | None:
    """Before staff act on a held charge: what did the provider do under its key? Recorded, and applied to the order."""
    payment = Payment.objects.filter(order_id=order_id).first()
    if payment is None:
        return None
    try:
        payment = payment_services.look_up_at_provider(payment_id=payment.pk)
    except ProviderUnavailable as exc:
        raise ProviderNotConfirmed(order_id, exc) from exc
    if payment.status in (Payment.Status.SUCCEEDED, Payment.Status.DECLINED):
        apply_payment_outcome(order_id=order_id, payment=payment)
    return payment


def retry_held_order(*, order_id: int) -> Order:
    """Staff: run the step that was stuck again (a charge with its payment reopened). Raises NotOnHold.

    A held charge is first looked up at the provider: a charge it made settles the order instead
    (and the order is returned as that left it).
    """
    payment = _settle_with_provider(order_id)
    with transaction.atomic():
        order = _lock_order(order_id)
        origin = held_from(order) if order is not None else None
        settled = payment is not None and payment.status in (Payment.Status.SUCCEEDED, Payment.Status.DECLINED)
        if origin is None and order is not None and settled and order.status != Order.Status.PAYMENT_FAILED:
            return order  # the provider's answer settled it (paid, or failed by its decline)
        if origin is None or order is None:  # no origin without an order
            raise NotOnHold(order, "retry", order_id)
        if origin == Order.Status.CONFIRMED:
            payment_services.reopen_payment(order_id=order.pk)
        return pipeline.set_status(order, origin, note="retried by staff")


def fail_held_order(*, order_id: int) -> Order:
    """Staff: give up on the charge of an order held on its way to payment: payment_failed, stock released.

    Refused when the provider did take the payment (the order is then paid, PaymentTaken) or
    cannot be asked (ProviderNotConfirmed): money taken is never met with a failed order.
    """
    payment = _settle_with_provider(order_id)
    with transaction.atomic():
        order = _lock_order(order_id)
        if payment is not None and payment.status == Payment.Status.SUCCEEDED and order is not None:
            raise PaymentTaken(order)
        if order is None or held_from(order) != Order.Status.CONFIRMED:
            raise NotOnHold(order, "fail its payment", order_id)
        _release_stock(order)
        return pipeline.set_status(order, Order.Status.PAYMENT_FAILED, note="payment failed by staff; stock released")
