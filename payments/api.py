"""The payment methods API: cards tokenised at the provider, listed and removed by their owner, and the card of a
subscription."""

from datetime import date, datetime
from typing import Annotated

from django.db.models import QuerySet
from django.http import Http404
from ninja import Field, Router, Schema, Status
from ninja.pagination import paginate
from pydantic import ConfigDict, StrictInt, StringConstraints

from core.pagination import bounded_pagination
from core.types import ApiRequest

from . import selectors, services
from .models import PaymentMethod, Subscription

router = Router(tags=["payment methods"])

Pagination = bounded_pagination(default_limit=100)


class CardIn(Schema):
    """A card to tokenise: its number and CVC go to the provider and nowhere else."""

    model_config = ConfigDict(extra="forbid")

    # Digits, with the spaces or dashes people type; the provider checks the rest (Luhn).
    number: Annotated[str, StringConstraints(min_length=12, max_length=30, pattern=r"^[0-9 -]+$")]
    exp_month: StrictInt = Field(ge=1, le=12)
    exp_year: StrictInt = Field(ge=2000, le=2100)
    cvc: Annotated[str, StringConstraints(pattern=r"^[0-9]{3,4}$")]


class PaymentMethodOut(Schema):
    id: int
    brand: str
    last4: str
    exp_month: int
    exp_year: int
    created_at: datetime


class ErrorOut(Schema):
    detail: list[dict] | str


@router.get("/payment-methods/", response=list[PaymentMethodOut], summary="List my cards")
@paginate(Pagination)
def list_payment_methods(request: ApiRequest) -> QuerySet[PaymentMethod]:
    return selectors.payment_methods_for(owner=request.auth)


@router.post(
    "/payment-methods/",
    response={201: PaymentMethodOut, 422: ErrorOut, 503: ErrorOut},
    summary="Add a card (tokenised at the payment provider)",
)
def add_payment_method(request: ApiRequest, payload: CardIn) -> Status[PaymentMethod]:
    """Only the provider's token, the brand, the last four digits and the expiry are kept.

    A card the provider refuses is a 422 naming the field; 503 (with Retry-After) when the provider cannot answer.
    """
    card = services.add_card(
        owner=request.auth,
        number=payload.number,
        exp_month=payload.exp_month,
        exp_year=payload.exp_year,
        cvc=payload.cvc,
    )
    return Status(201, card)


@router.delete(
    "/payment-methods/{payment_method_id}/",
    response={204: None, 404: ErrorOut},
    summary="Remove one of my cards (orders paid with it keep it)",
)
def remove_payment_method(request: ApiRequest, payment_method_id: int) -> Status[None]:
    try:
        services.remove_payment_method(owner=request.auth, payment_method_id=payment_method_id)
    except services.UnknownPaymentMethod:
        raise Http404("no such payment method") from None
    return Status(204, None)


class SubscriptionOut(Schema):
    id: int
    plan: str = Field(alias="plan.code")
    status: str
    payment_method_id: int | None
    current_period_end: date
    # Dunning (payments/dunning.py): declined tries of the due period, and when the next one runs.
    failed_attempts: int
    next_retry_at: datetime | None


@router.put(
    "/subscriptions/{subscription_id}/payment-method/{payment_method_id}/",
    response={200: SubscriptionOut, 404: ErrorOut, 409: ErrorOut},
    summary="Charge one of my subscriptions to one of my cards (a past-due one is tried again at once)",
)
def set_subscription_payment_method(request: ApiRequest, subscription_id: int, payment_method_id: int) -> Subscription:
    """Another owner's subscription or card, or a removed card, is a 404; a cancelled subscription a 409.

    Sending it again while the retry it started is under way retries nothing more.
    """
    try:
        return services.set_subscription_payment_method(
            owner=request.auth, subscription_id=subscription_id, payment_method_id=payment_method_id
        )
    except (services.UnknownSubscription, services.UnknownPaymentMethod):
        raise Http404("no such subscription or payment method") from None
