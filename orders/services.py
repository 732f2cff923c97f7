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
from django.db.models import F, prefetch_related_objects

from accounts.services import clean_address
from core.db import set_prefetched
from core.errors import ApplicationError
from integrations import warehouse
from integrations.errors import ProviderUnavailable
from payments import refunds as payment_refunds
from payments import selectors as payment_selectors
from payments import services as payment_services
from payments.models import Payment, Refund

from . import pipeline, selectors, stock
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
    answer_now: bool = False,
) -> Order:
    """Create a pending order with prices copied from the catalogue; its processing is an outbox item of its commit.

    The same idempotency key from the same owner returns the first order (also when
    two requests race); the same key with other items raises IdempotencyKeyReused.
    `payment_method_id` must name one of the owner's cards (else UnknownPaymentMethod, 404);
    the order is charged to it. `shipping_address` (accounts.services.clean_address's fields,
    else InvalidAddress) is copied onto the order, which then pays the flat SHIPPING_FEE on top
    of its lines. `answer_now`: a new order comes with its lines, first event and (no) payment loaded from the
    rows just written, as selectors.ORDER_DETAIL would read them, for an answer built at once (loaded, they are
    not read again, so they go stale as the order moves on).
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
            lines = OrderItem.objects.bulk_create(
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
            event = pipeline.start(order)
    except IntegrityError:
        # A concurrent request with the same key won the unique constraint.
        if not idempotency_key:
            raise
        existing = _existing_for_key(owner, idempotency_key, wanted, payment_method_id)
        if existing is None:
            raise
        return existing
    if answer_now:
        set_prefetched(order, items=lines, events=[event], payments=[])
    return order


def _lock_order(order_id: int, *, with_card: bool = False) -> Order | None:
    orders = Order.objects.select_for_update(of=("self",))
    if with_card:
        orders = orders.select_related("payment_method")
    return orders.filter(pk=order_id).first()


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

    The payment is claimed (and its call counted) under the order's lock (cancel_order takes the
    same lock and refuses once a payment exists) and committed; the provider is called outside any
    transaction; its answer and the order's move then commit together. An order whose total is zero
    is paid without a payment. Raises integrations.errors.ProviderUnavailable when the provider could
    not answer; retrying is safe.
    """
    counted = False
    with transaction.atomic():
        # With its card (the claim copies it; the provider is given its token): not read again before the call.
        order = _lock_order(order_id, with_card=True)
        if order is None:
            logger.warning("charge_order: order %s does not exist", order_id)
            return None
        payment = Payment.objects.select_related("payment_method").filter(order=order).first()
        if payment is None:
            if order.status != Order.Status.CONFIRMED:
                return order
            if order.total == 0:
                return pipeline.set_status(order, Order.Status.PAID, note="nothing to charge: total is zero")
            payment, counted = payment_services.claim_order_payment(order=order), True
    if payment.status in Payment.FINAL:
        # Recorded before (a webhook, or a delivery that died before it moved the order): apply it.
        return apply_payment_outcome(order_id=order_id, payment=payment)
    # The payment as claimed or read under the lock just now: not read again before the call.
    outcome = payment_services.call_provider(payment, counted=counted)
    with transaction.atomic():
        # The order's lock, then the payment's (record_outcome), as every path that takes both does.
        order = _lock_order(order_id)
        payment = payment_services.record_outcome(payment.pk, outcome)
        return _apply_payment_outcome(order, payment)


def apply_payment_outcome(*, order_id: int, payment: Payment) -> Order | None:
    """Move the order as its payment's outcome says. Idempotent; a payment still processing changes nothing."""
    with transaction.atomic():
        return _apply_payment_outcome(_lock_order(order_id), payment)


def _apply_payment_outcome(order: Order | None, payment: Payment) -> Order | None:
    """apply_payment_outcome, for an order locked by the caller (None: it is gone)."""
    if order is None:
        return None
    waiting = order.status == Order.Status.CONFIRMED or _held_from(order, Order.Status.CONFIRMED)
    if order.status == Order.Status.EXPIRED and payment.status == Payment.Status.SUCCEEDED:
        _refund_late_payment(order, payment)
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


def _refund_late_payment(order: Order, payment: Payment) -> None:
    """A charge that succeeded after its order expired is given back in full, once (its submission decides).

    What staff refunded of it meanwhile is not refunded twice: only what is left, if anything.
    """
    if payment_refunds.refundable(payment) <= 0:
        return
    refund, created = payment_refunds.claim_refund(
        payment_id=payment.pk,
        amount=None,
        reason=Refund.Reason.PAID_AFTER_EXPIRY,
        note=f"order {order.pk} expired before its payment succeeded",
        submission="paid-after-expiry",
    )
    if created:
        logger.warning("order %s: paid after it expired; refund %s requested", order.pk, refund.pk)


def cancel_order(*, order_id: int, owner: "User", answer_now: bool = False) -> Order:
    """Cancel the owner's order; stock is released.

    Before payment: while pending or confirmed and no charge is under way. Once paid: while the
    warehouse does not have it yet (no hand-over started), and the whole charge is refunded.
    `answer_now`: the order comes with what selectors.ORDER_DETAIL loads, read before the commit under its
    lock, so its refunds belong to its status (read after it, a refund that succeeded meanwhile showed beside
    "cancelled").
    """
    with transaction.atomic():
        order = Order.objects.select_for_update().get(pk=order_id, owner=owner)
        if _not_handed_over(order):
            _cancel_paid(order, reason=Refund.Reason.CANCELLED_BY_SHOPPER, note="cancelled by owner", by=owner)
        else:
            # A claimed payment means the provider may already be charging: too late to cancel.
            if not order.can_cancel or order.payments.exists():
                raise OrderNotCancellable(order)
            if order.status == Order.Status.CONFIRMED:
                _release_stock(order)
            pipeline.set_status(order, Order.Status.CANCELLED, note="cancelled by owner")
        if answer_now:
            prefetch_related_objects([order], *selectors.ORDER_DETAIL)
    return order


def _not_handed_over(order: Order) -> bool:
    """Paid (or held on its way to the warehouse) and no hand-over started: the goods are still ours to keep."""
    return not order.fulfillment_key and _awaits_shipment(order)


def _cancel_paid(
    order: Order,
    *,
    reason: str,
    note: str,
    by: "User | None",
    submission: str = "",
    lines: dict[str, int] | None = None,
) -> Refund | None:
    """A paid order the warehouse does not have: stock released, cancelled, all that is left of its charge refunded.

    None for an order paid without a payment (its total was zero): nothing to give back. Call
    while holding the order's row lock.
    """
    payment = Payment.objects.filter(order=order).first()
    refund = None
    if payment is not None:
        # `lines`, when every line was named: kept as asked, so the same request made again is recognised.
        refund, _ = payment_refunds.claim_refund(
            payment_id=payment.pk,
            amount=None,
            reason=reason,
            lines=lines,
            note=note,
            requested_by=by,
            submission=submission,
        )
        note = f"{note}; refund {refund.pk} of {refund.amount} requested"
    _release_stock(order)
    pipeline.set_status(order, Order.Status.CANCELLED, note=note)
    return refund


# --- After the sale: refunds ------------------------------------------------------------


class InvalidRefundLines(OrderError):
    code = "invalid_lines"
    field = "lines"


REFUNDABLE_STATUSES = (
    Order.Status.PAID,
    Order.Status.FULFILLED,
    Order.Status.PARTIALLY_REFUNDED,
    Order.Status.CANCELLED,
    Order.Status.EXPIRED,
    Order.Status.ON_HOLD,
)


def _lines_to_refund(
    order: Order, order_items: list[OrderItem], lines: dict[str, int]
) -> tuple[dict[OrderItem, int], Decimal]:
    """The order's items and units a line refund names, checked, and what they cost."""
    if not isinstance(lines, dict) or not lines or len(lines) > MAX_ITEMS:
        raise InvalidRefundLines("name at least one line of the order, {item id: quantity}")
    items = {str(item.pk): item for item in order_items}
    chosen: dict[OrderItem, int] = {}
    for item_id, quantity in lines.items():
        item = items.get(str(item_id))
        if item is None:
            raise InvalidRefundLines(f"order {order.pk} has no line {str(item_id)[:20]!r}")
        if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity <= 0:
            raise InvalidRefundLines(f"line {item.pk}: the quantity must be a positive whole number")
        if quantity > item.quantity - item.refunded_quantity:
            raise InvalidRefundLines(
                f"line {item.pk}: {quantity} is more than the {item.quantity - item.refunded_quantity} not refunded yet"
            )
        chosen[item] = quantity
    return chosen, sum((item.unit_price * quantity for item, quantity in chosen.items()), Decimal("0.00"))


def refund_order(
    *,
    order_id: int,
    amount: Decimal | str | None = None,
    lines: dict[str, int] | None = None,
    note: str = "",
    requested_by: "User | None" = None,
    submission: str = "",
) -> Refund:
    """Staff refund a paid order: all that is left (no amount, no lines), an amount, or lines (their price).

    Lines refunded before the warehouse has the order are not shipped and their stock goes back
    on hand; refunding all that is left before then cancels the order. The refund is claimed in
    this transaction under the order's and the payment's row locks (never more than was
    charged), and given back by `payments.tasks.refund_payment`. The same `submission` refunds once.
    Raises NotRefundable, RefundTooLarge, InvalidRefundAmount, InvalidRefundLines, and RefundKeyReused
    for a `submission` used before with another amount or other lines.
    """
    with transaction.atomic():
        order = _lock_order(order_id)
        payment = Payment.objects.filter(order_id=order_id).first() if order is not None else None
        # A request made again (its form token, its Idempotency-Key) gets its refund, whatever the order is now.
        if payment is not None and submission:
            if done := Refund.objects.filter(payment=payment, submission=submission).first():
                return _same_request(done, amount=amount, lines=lines)
        if order is None or payment is None:
            raise payment_refunds.NotRefundable(f"order {order_id} has no payment to refund")
        if payment.status != Payment.Status.SUCCEEDED or order.status not in REFUNDABLE_STATUSES:
            # Before the amount is looked at: nothing to give back is a 409 whatever was asked.
            raise payment_refunds.NotRefundable(f"order {order_id} is {order.status}, its payment {payment.status}")
        if payment_refunds.refundable(payment) <= 0:
            raise payment_refunds.NotRefundable(f"order {order_id}: all of its payment is refunded or being refunded")
        order_items = list(order.items.all())
        chosen, lines_total = _lines_to_refund(order, order_items, lines) if lines else ({}, Decimal("0.00"))
        if chosen and amount is None:
            amount = lines_total
        before_hand_over = _not_handed_over(order)
        if chosen:
            # Every unit not refunded yet is named: nothing would be left to ship.
            everything = all(item.quantity_to_ship == chosen.get(item, 0) for item in order_items)
        else:
            everything = amount is None or payment_refunds.clean_amount(amount) == payment_refunds.refundable(payment)
        if before_hand_over and everything:
            # Nothing left to ship: the order is cancelled and all that is left is refunded (its shipping too);
            # lines named are counted as refunded, as any line refund's are (a failure counts them back).
            _count_refunded(chosen)
            cancelled = _cancel_paid(
                order,
                reason=Refund.Reason.STAFF,
                note=note or "refunded in full by staff",
                by=requested_by,
                submission=submission,
                lines={str(item.pk): quantity for item, quantity in chosen.items()},
            )
            assert cancelled is not None  # its payment exists: checked above
            return cancelled
        refund, created = payment_refunds.claim_refund(
            payment_id=payment.pk,
            amount=None if amount is None else payment_refunds.clean_amount(amount),
            reason=Refund.Reason.STAFF,
            lines={str(item.pk): quantity for item, quantity in chosen.items()},
            note=note,
            requested_by=requested_by,
            submission=submission,
        )
        if created and chosen:
            _count_refunded(chosen)
            if before_hand_over:
                stock.release_units(order=order, units={item.product_id: quantity for item, quantity in chosen.items()})
    return refund


def _count_refunded(chosen: dict[OrderItem, int]) -> None:
    for item, quantity in chosen.items():
        OrderItem.objects.filter(pk=item.pk).update(refunded_quantity=F("refunded_quantity") + quantity)


class RefundKeyReused(OrderError):
    code = "idempotency_key_reused"
    field = "idempotency_key"

    def __init__(self) -> None:
        super().__init__("this Idempotency-Key was already used for a refund of another amount or other lines")


def _same_request(refund: Refund, *, amount: Decimal | str | None, lines: dict[str, int] | None) -> Refund:
    """The refund a repeated request made; RefundKeyReused when the request names another amount or other lines."""
    asked_lines = {str(item_id): quantity for item_id, quantity in (lines or {}).items()}
    if (lines is not None and asked_lines != refund.lines) or (
        lines is None and amount is not None and payment_refunds.clean_amount(amount) != refund.amount
    ):
        raise RefundKeyReused()
    return refund


def apply_refund(*, refund: Refund) -> Order | None:
    """A refund of an order's payment got its outcome: the order says what was given back. Idempotent.

    Succeeded: see `_status_after_refunds`. Failed (nothing given back): the units of its lines
    count as not refunded again, so staff can refund them again (units that went back on hand
    before the hand-over stay there: `released` movements, not shipped). Call inside the
    refund's transaction.
    """
    payment = refund.payment
    order = _lock_order(payment.order_id) if payment.order_id else None
    if order is None:
        return None
    if refund.status == Refund.Status.FAILED:
        for item_id, quantity in refund.lines.items():
            OrderItem.objects.filter(pk=item_id, order=order, refunded_quantity__gte=quantity).update(
                refunded_quantity=F("refunded_quantity") - quantity
            )
        return order
    if refund.status == Refund.Status.SUCCEEDED:
        _status_after_refunds(order, payment, note=f"refund {refund.pk} of {refund.amount} {refund.currency} succeeded")
    return order


def _status_after_refunds(order: Order, payment: Payment, *, note: str) -> None:
    """Move the order by what its payment's succeeded refunds gave back. Call while holding the order's row lock.

    All of the charge: refunded (from fulfilled, partially refunded or cancelled). Part of it,
    once the warehouse has the order: partially_refunded. An order still waiting for its
    hand-over (paid, or held on the way) moves when it is fulfilled: the hand-over calls this
    again (a line refunded before it is also not shipped). An expired order stays expired.
    """
    given_back = payment_refunds.refunded(payment, statuses=(Refund.Status.SUCCEEDED,))
    if not given_back:
        return
    if given_back >= payment.amount and Order.Status.REFUNDED in pipeline.TRANSITIONS[order.status]:
        pipeline.set_status(order, Order.Status.REFUNDED, note=note)
    elif given_back < payment.amount and order.status in (Order.Status.FULFILLED, Order.Status.PARTIALLY_REFUNDED):
        pipeline.set_status(order, Order.Status.PARTIALLY_REFUNDED, note=note)


# --- Reservations that expire -------------------------------------------------------------


def expire_order(*, order_id: int) -> Order | None:
    """A confirmed order still unpaid at its reservation time: stock released, expired. Idempotent.

    Also when its charge is under way (the provider slow or away, or the payment held for
    staff): a charge that succeeds afterwards is refunded by itself (`apply_payment_outcome`).
    An order paid, failed or cancelled meanwhile is left as it is.
    """
    with transaction.atomic():
        order = _lock_order(order_id)
        if order is None:
            return None
        if order.status != Order.Status.CONFIRMED and not _held_from(order, Order.Status.CONFIRMED):
            return order
        payment = Payment.objects.filter(order=order).first()
        if payment is not None and payment.status == Payment.Status.SUCCEEDED:
            return order  # paid: its own step moves it on
        _release_stock(order)
        minutes = settings.PAYMENT_EXPIRY_SECONDS / 60
        pipeline.set_status(order, Order.Status.EXPIRED, note=f"not paid within {minutes:g} minutes; stock released")
    return order


def sync_to_fulfillment(*, order_id: int) -> Order | None:
    """Hand a paid order to the warehouse once (its stored random key): paid (or held on the way) -> fulfilled.

    Raises integrations.errors.ProviderUnavailable when the warehouse cannot be reached (retrying
    is safe) and ProviderRejected when it refuses. Returns None when the order is gone.
    """
    order, items = _claim_hand_over(order_id)
    if order is None or items is None:
        return order  # gone, handed over already, or cancelled (and refunded) before the hand-over began
    shipment = warehouse.create_shipment(order_id=order_id, items=items, idempotency_key=order.fulfillment_key)
    with transaction.atomic():
        order = _lock_order(order_id)
        if order is not None and _awaits_shipment(order):
            pipeline.set_status(order, Order.Status.FULFILLED, note=f"shipment {shipment.id}")
            # Refunds that succeeded while the hand-over was under way move it on now (one read when there are none).
            if Refund.objects.filter(payment__order=order, status=Refund.Status.SUCCEEDED).exists():
                payment = Payment.objects.get(order=order)
                _status_after_refunds(order, payment, note="refunded while it was handed over")
    return order


def _claim_hand_over(order_id: int) -> tuple[Order | None, list[dict[str, object]] | None]:
    """The order and what to ship, with its warehouse key made (random) and committed before its first hand-over
    and kept for every retry; no items (None) when it does not await shipment (gone, shipped, or cancelled by its
    shopper or refunded meanwhile).

    Decided under the order's row lock, which a cancel or a refund takes too. The lines are read under it: units
    refunded before went back on hand (an order that waits for its hand-over gave back nothing else) and are not
    shipped; a line refunded once the key is committed may be with the warehouse, so it ships and stays counted.
    """
    with transaction.atomic():
        order = _lock_order(order_id)
        if order is None or not _awaits_shipment(order):
            return order, None
        if not order.fulfillment_key:
            order.fulfillment_key = f"ship_{secrets.token_hex(16)}"
            order.save(update_fields=["fulfillment_key"])
        quantities = dict(stock.units_to_ship(order=order))
    return order, [{"sku": sku, "quantity": quantity} for sku, quantity in quantities.items() if quantity > 0]


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


def _held_from(order: Order, status: str) -> bool:
    return order.status == Order.Status.ON_HOLD and order.held_from == status


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
        origin = order.held_from if order is not None else None
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
        if order is None or order.held_from != Order.Status.CONFIRMED:
            raise NotOnHold(order, "fail its payment", order_id)
        _release_stock(order)
        return pipeline.set_status(order, Order.Status.PAYMENT_FAILED, note="payment failed by staff; stock released")
