"""The orders API: JSON in and out, described by OpenAPI at /api/docs."""

from datetime import datetime
from decimal import Decimal
from typing import Annotated

from django.db.models import QuerySet, prefetch_related_objects
from django.http import Http404, HttpRequest
from ninja import Field, Header, Router, Schema, Status
from ninja.errors import HttpError, ValidationError
from ninja.pagination import paginate
from pydantic import ConfigDict, StrictInt, StringConstraints, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from accounts import selectors as account_selectors
from accounts.api import AddressIn
from core.pagination import bounded_pagination
from core.types import ApiRequest
from payments.models import Refund

from . import selectors, services
from .models import Order, Product

router = Router(tags=["orders"])

# No control characters: PostgreSQL refuses NUL in text, and no real sku holds one.
Sku = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")
]

# A client's retry key: printable ASCII without spaces, as HTTP headers carry it.
IdempotencyKey = Annotated[str, Header(alias="Idempotency-Key", min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")]

# A page of orders with their refunds, read as of one moment (core.db.one_snapshot).
Pagination = bounded_pagination(default_limit=100, one_moment=True)


class ItemIn(Schema):
    model_config = ConfigDict(extra="forbid")

    sku: Sku
    # Strict: "2", 2.0 and true are refused rather than coerced.
    quantity: StrictInt = Field(gt=0, le=services.MAX_QUANTITY)


class OrderIn(Schema):
    model_config = ConfigDict(extra="forbid")

    items: list[ItemIn] = Field(min_length=1, max_length=services.MAX_ITEMS)
    # Checkout: the card to charge (one of mine: POST /api/payment-methods/), and where it ships: a saved
    # address (`address_id`) or one given here (`shipping_address`), not both. Shipping adds SHIPPING_FEE.
    payment_method_id: StrictInt | None = Field(default=None, gt=0)
    address_id: StrictInt | None = Field(default=None, gt=0)
    shipping_address: AddressIn | None = None

    @model_validator(mode="after")
    def one_address(self) -> "OrderIn":
        if self.address_id is not None and self.shipping_address is not None:
            raise ValueError("send address_id or shipping_address, not both")
        return self

    @field_validator("items")
    @classmethod
    def skus_unique(cls, items: list[ItemIn]) -> list[ItemIn]:
        skus = [item.sku for item in items]
        if len(set(skus)) != len(skus):
            raise ValueError("each sku may appear only once")
        return items


class ItemOut(Schema):
    # The line's id: what a refund of lines names (`item_id`).
    id: int
    sku: str
    name: str
    unit_price: Decimal
    quantity: int
    # Units of the line given back by refunds; those refunded before the hand-over are not shipped.
    refunded_quantity: int


class EventOut(Schema):
    from_status: str
    to_status: str
    note: str
    created_at: datetime


class PaymentOut(Schema):
    status: str
    status_display: str = Field(alias="get_status_display")
    amount: Decimal
    currency: str
    provider_charge_id: str
    reference: str = Field(alias="idempotency_key")
    failure_reason: str
    updated_at: datetime


class RefundLineOut(Schema):
    item_id: int
    quantity: int


class RefundOut(Schema):
    """Money given back on the order's payment: `requested` until the provider answers, then `succeeded` or `failed`.

    A failed refund gave nothing back (staff are told); its amount can be refunded again.
    """

    id: int
    status: str
    status_display: str = Field(alias="get_status_display")
    amount: Decimal
    currency: str
    # staff, cancelled_by_shopper, or paid_after_expiry (a charge that succeeded after the order expired).
    reason: str
    reason_display: str = Field(alias="get_reason_display")
    # The order lines it gives back; empty for a refund of an amount or of everything.
    lines: list[RefundLineOut]
    created_at: datetime
    updated_at: datetime

    @staticmethod
    def resolve_lines(refund: Refund) -> list[dict[str, int]]:
        return [{"item_id": int(item_id), "quantity": quantity} for item_id, quantity in refund.lines.items()]


class CardOut(Schema):
    brand: str
    last4: str


class OrderOut(Schema):
    id: int
    status: str
    status_display: str = Field(alias="get_status_display")
    total: Decimal
    # Part of `total`: the flat fee of an order that ships to an address.
    shipping_fee: Decimal
    shipping_address: dict[str, str]
    payment_method: CardOut | None
    currency: str
    can_cancel: bool
    # Why the order is on hold, in plain words for the shopper; empty otherwise.
    hold_reason: str
    created_at: datetime
    updated_at: datetime
    items: list[ItemOut]
    events: list[EventOut]
    # The order's charge, once it is claimed: the order page's receipt follows it without a reload.
    payment: PaymentOut | None
    # What was given back of that charge, oldest first (GET /api/orders/{order_id}/refunds/ lists the same).
    refunds: list[RefundOut]

    @staticmethod
    def resolve_refunds(order: Order) -> list[Refund]:
        return selectors.order_refunds(order)


# Free text staff write for the record: no control characters but tab and line breaks (PostgreSQL refuses NUL).
Note = Annotated[str, StringConstraints(max_length=255, pattern=r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$")]


class RefundLineIn(Schema):
    model_config = ConfigDict(extra="forbid")

    # An id from the order's `items`.
    item_id: StrictInt = Field(gt=0, le=2**63 - 1)
    # Strict, as when ordering: "1", 1.0 and true are refused rather than coerced.
    quantity: StrictInt = Field(gt=0, le=services.MAX_QUANTITY)


class RefundIn(Schema):
    """`{}`: all that is left of the charge. `amount`: that much. `lines`: those units, at the price they were sold at.

    Refunding everything before the warehouse has the order cancels it (its stock goes back); lines
    refunded before then are not shipped.
    """

    model_config = ConfigDict(extra="forbid")

    # A decimal string ("10.00") or number, positive, at most two decimals. Left out, not null, for all that is left.
    amount: (
        Annotated[Decimal, Field(gt=0, max_digits=12, decimal_places=2, allow_inf_nan=False)] | SkipJsonSchema[None]
    ) = None
    lines: Annotated[list[RefundLineIn], Field(min_length=1, max_length=services.MAX_ITEMS)] | SkipJsonSchema[None] = (
        None
    )
    # Why, for the record: shown to staff, not to the shopper.
    note: Note = ""

    @field_validator("amount", "lines", mode="before")
    @classmethod
    def not_null(cls, value: object) -> object:
        # An explicit null is a client's bug more often than a wish to refund everything: say so.
        if value is None:
            raise ValueError("leave the field out to refund all that is left; null is not an amount")
        return value

    @field_validator("lines")
    @classmethod
    def items_unique(cls, lines: list[RefundLineIn] | None) -> list[RefundLineIn] | None:
        ids = [line.item_id for line in lines or []]
        if len(set(ids)) != len(ids):
            raise ValueError("each item_id may appear only once")
        return lines

    @model_validator(mode="after")
    def amount_or_lines(self) -> "RefundIn":
        if self.amount is not None and self.lines is not None:
            raise ValueError("send amount or lines, not both")
        return self


class ProductOut(Schema):
    sku: str
    name: str
    price: Decimal
    stock: int


class ErrorOut(Schema):
    detail: list[dict] | str


@router.get("/products/", response=list[ProductOut], summary="List the catalogue")
@paginate(Pagination)
def list_products(request: HttpRequest) -> QuerySet[Product]:
    return selectors.product_list(ordering="sku")


@router.post(
    "/orders/",
    response={201: OrderOut, 401: ErrorOut, 404: ErrorOut, 409: ErrorOut, 422: ErrorOut},
    summary="Place an order",
)
def create_order(
    request: ApiRequest,
    payload: OrderIn,
    idempotency_key: IdempotencyKey = "",
) -> Status[Order]:
    """Place an order. Sending the same `Idempotency-Key` again returns the same order.

    Another owner's card or address is a 404 naming the field, as one that does not exist.
    """
    address: dict[str, object] | None = None
    if payload.address_id is not None:
        address = dict(account_selectors.address_get_for(owner=request.auth, address_id=payload.address_id).snapshot())
    elif payload.shipping_address is not None:
        address = payload.shipping_address.dict()
    try:
        order = services.place_order(
            owner=request.auth,
            items=[(item.sku, item.quantity) for item in payload.items],
            idempotency_key=idempotency_key,
            payment_method_id=payload.payment_method_id,
            shipping_address=address,
            answer_now=True,
        )
    except services.UnknownProduct as exc:
        raise ValidationError(
            [
                {
                    "loc": ["body", "payload", "items", index, "sku"],
                    "msg": f"unknown sku: {item.sku}",
                    "type": "unknown_sku",
                }
                for index, item in enumerate(payload.items)
                if item.sku in exc.skus
            ]
        ) from exc
    # The order in hand, with what OrderOut shows of it loaded: a new one's from the rows just written (nothing is
    # read back), the one an Idempotency-Key sent again names from the database.
    prefetch_related_objects([order], *selectors.ORDER_DETAIL)
    return Status(201, order)


@router.get("/orders/", response=list[OrderOut], summary="List my orders")
@paginate(Pagination)
def list_orders(request: ApiRequest) -> QuerySet[Order]:
    return selectors.order_list_for(owner=request.auth)


@router.get("/orders/{order_id}/", response={200: OrderOut, 404: ErrorOut}, summary="One of my orders")
def get_order(request: ApiRequest, order_id: int) -> Order:
    order = selectors.order_get_for(owner=request.auth, order_id=order_id)
    if order is None:
        raise Http404("no such order")
    return order


@router.post(
    "/orders/{order_id}/cancel/",
    response={200: OrderOut, 404: ErrorOut, 409: ErrorOut},
    summary="Cancel one of my orders before it is handed to the warehouse; a paid one is refunded in full",
)
def cancel_order(request: ApiRequest, order_id: int) -> Order:
    """Cancel while the order is pending or confirmed and no charge is under way, or once it is paid as long as the
    warehouse does not have it yet, also when it is on hold on its way from pending or from paid (`can_cancel` says
    which). Reserved stock is released. A paid order's whole charge
    is refunded: the answer is `cancelled` with a `requested` refund in `refunds`, and the order becomes `refunded`
    once the provider has given the money back. Any other status is a 409.
    """
    try:
        # Read once, under its lock, by owner: another owner's order is a 404 like a missing one.
        order = services.cancel_order(order_id=order_id, owner=request.auth, answer_now=True)
    except Order.DoesNotExist:
        raise Http404("no such order") from None
    return order


@router.post(
    "/orders/{order_id}/refunds/",
    response={202: RefundOut, 403: ErrorOut, 404: ErrorOut, 409: ErrorOut, 422: ErrorOut},
    summary="Refund an order in full or in part (staff only)",
)
def refund_order(
    request: ApiRequest, order_id: int, payload: RefundIn, idempotency_key: IdempotencyKey = ""
) -> Status[Refund]:
    """Staff give back all that is left of an order's charge (`{}`), an `amount`, or `lines` of it.

    Answers 202 with the refund `requested`: the provider is asked after the answer, and the refund
    (in GET /api/orders/{order_id}/refunds/ and the order's `refunds`) becomes `succeeded` or `failed`;
    the order then becomes `refunded` or `partially_refunded`. Sending the same `Idempotency-Key` for the
    same order again answers with the refund it made (as it is now) and refunds nothing more; with another
    amount or other lines it is a 422.

    A shopper gets 403 on an order of their own, and 404, as for one that does not exist, on anyone
    else's. 409 when the order has no succeeded payment to refund (not paid, or already refunded in full);
    422 for an amount over what is left (`amount`) or a line that is not the order's or has fewer units
    left (`lines`).
    """
    order = selectors.order_get_visible_to(user=request.auth, order_id=order_id)
    if order is None:
        raise Http404("no such order")
    if not request.auth.is_staff:
        raise HttpError(403, "only staff may refund an order")
    # The same Idempotency-Key answers with the refund it made, even once the order is refunded in full;
    # with another amount or other lines it is a 422 (services.RefundKeyReused).
    refund = services.refund_order(
        order_id=order.pk,
        amount=payload.amount,
        lines={str(line.item_id): line.quantity for line in payload.lines} if payload.lines else None,
        note=payload.note,
        requested_by=request.auth,
        submission=idempotency_key,
    )
    return Status(202, refund)


@router.get(
    "/orders/{order_id}/refunds/",
    response={200: list[RefundOut], 404: ErrorOut},
    summary="The refunds of one of my orders",
)
def list_refunds(request: ApiRequest, order_id: int) -> list[Refund]:
    """Oldest first. Staff see those of any order; another owner's order is a 404, as one that does not exist."""
    refunds = selectors.refund_list_for(user=request.auth, order_id=order_id)
    if refunds is None:
        raise Http404("no such order")
    return list(refunds)
