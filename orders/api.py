"""The orders API: JSON in and out, described by OpenAPI at /api/docs."""

from datetime import datetime
from decimal import Decimal
from typing import Annotated

from django.db.models import QuerySet, prefetch_related_objects
from django.http import Http404, HttpRequest
from ninja import Field, Header, Router, Schema, Status
from ninja.errors import ValidationError
from ninja.pagination import paginate
from pydantic import ConfigDict, StrictInt, StringConstraints, field_validator, model_validator

from accounts import selectors as account_selectors
from accounts.api import AddressIn
from core.pagination import bounded_pagination
from core.types import ApiRequest

from . import selectors, services
from .models import Order, Product

router = Router(tags=["orders"])

# No control characters: PostgreSQL refuses NUL in text, and no real sku holds one.
Sku = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")
]


Pagination = bounded_pagination(default_limit=100)


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
    sku: str
    name: str
    unit_price: Decimal
    quantity: int


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
    idempotency_key: Annotated[
        str, Header(alias="Idempotency-Key", min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")
    ] = "",
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
    # The order in hand, with what OrderOut shows of it loaded: not read again by owner and id.
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
    summary="Cancel one of my orders while it is pending or confirmed",
)
def cancel_order(request: ApiRequest, order_id: int) -> Order:
    try:
        # Read once, under its lock, by owner: another owner's order is a 404 like a missing one.
        order = services.cancel_order(order_id=order_id, owner=request.auth)
    except Order.DoesNotExist:
        raise Http404("no such order") from None
    prefetch_related_objects([order], *selectors.ORDER_DETAIL)
    return order
