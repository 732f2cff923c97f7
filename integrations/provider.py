"""The payment provider's client: charges and refunds, once per idempotency key.

Every charge and refund carries a stored idempotency key, so a retry of the same call can never
act twice on the provider's side. Connection errors, timeouts, the call deadline, 408/409/425/429
(not now) and 5xx become ProviderUnavailable, which is retryable; a decline (402) is CardDeclined,
a refused refund (400, 404) is RefundRefused, and any other 4xx is ProviderRejected, all permanent.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TypeVar
from urllib.parse import quote, urlencode

from django.conf import settings

from . import http
from .errors import ProviderRejected, ProviderUnavailable, is_transient

__all__ = [
    "Card",
    "CardDeclined",
    "Charge",
    "InvalidCard",
    "ProviderRejected",
    "ProviderUnavailable",
    "Refund",
    "RefundRefused",
    "charge",
    "list_charges",
    "list_refunds",
    "refund",
    "retrieve_charge",
    "retrieve_refund",
    "tokenize_card",
]


class CardDeclined(ProviderRejected):
    def __init__(self, charge_id: str, reason: str = "card_declined"):
        self.charge_id = charge_id
        self.reason = reason
        super().__init__(f"charge {charge_id or '?'} declined: {reason}")


class InvalidCard(ProviderRejected):
    """The provider refused to tokenise the card; `field` names the part (number, exp_month, exp_year, cvc)."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class RefundRefused(ProviderRejected):
    """The provider refused the refund for good; `code` is its reason: resource_missing (no such charge),
    charge_not_refundable, amount_too_large, currency_mismatch, or a bad field's code."""

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message
        super().__init__(f"refund refused: {code}: {message}")


@dataclass(frozen=True)
class Card:
    """A tokenised card: what the shop may keep of it."""

    token: str
    brand: str
    last4: str
    exp_month: int
    exp_year: int


@dataclass(frozen=True)
class Charge:
    id: str
    status: str
    amount: Decimal
    currency: str
    reference: str
    # The key it was made under: the one charge under a reference that is the shop's own (others may
    # reuse the reference as theirs). Empty when the provider does not say.
    idempotency_key: str = ""
    # What the provider has given back of it (succeeded refunds).
    amount_refunded: Decimal = Decimal("0")


@dataclass(frozen=True)
class Refund:
    id: str
    status: str  # "succeeded" | "pending" | "failed"
    amount: Decimal
    currency: str
    charge_id: str
    reference: str
    idempotency_key: str = ""


# What a list of the provider's yields: its items have an `id`, the cursor to the next page.
_Item = TypeVar("_Item", Charge, Refund)


def _url(path: str) -> str:
    return f"{settings.PAYMENT_PROVIDER_URL.rstrip('/')}{path}"


def _charge_from(data: dict) -> Charge:
    return Charge(
        id=data["id"],
        status=data["status"],
        amount=Decimal(str(data["amount"])),
        currency=data["currency"],
        reference=data.get("reference", ""),
        idempotency_key=data.get("idempotency_key") or "",
        amount_refunded=Decimal(str(data.get("amount_refunded") or "0")),
    )


def _refund_from(data: dict) -> Refund:
    return Refund(
        id=data["id"],
        status=data["status"],
        amount=Decimal(str(data["amount"])),
        currency=data["currency"],
        charge_id=data["charge"],
        reference=data.get("reference", ""),
        idempotency_key=data.get("idempotency_key") or "",
    )


def charge(*, amount: Decimal, currency: str, reference: str, idempotency_key: str, payment_method: str = "") -> Charge:
    """Charge `amount` once per idempotency key, to the tokenised card `payment_method` when given.

    Raises CardDeclined (its reason the provider's decline code: card_declined,
    insufficient_funds), ProviderRejected or ProviderUnavailable.
    """
    body = {"amount": str(amount), "currency": currency, "reference": reference}
    if payment_method:
        body["payment_method"] = payment_method
    reply = http.send("POST", _url("/v1/charges"), json=body, headers={"Idempotency-Key": idempotency_key})
    if is_transient(reply.status_code):
        raise ProviderUnavailable(f"/v1/charges: HTTP {reply.status_code}")
    if reply.status_code == 402:
        error = reply.error()
        reason = error.get("decline_code") or error.get("type") or "card_declined"
        raise CardDeclined((error.get("charge") or {}).get("id", ""), str(reason)[:100])
    if reply.status_code not in (200, 201):
        raise ProviderRejected(f"charge {idempotency_key}: HTTP {reply.status_code} {reply.error()}")
    return _charge_from(reply.json())


def tokenize_card(*, number: str, exp_month: int, exp_year: int, cvc: str) -> Card:
    """Exchange a card for the provider's token; the number and CVC go no further than this call.

    Raises InvalidCard for a card the provider refuses, ProviderUnavailable when it cannot answer.
    """
    reply = http.send(
        "POST",
        _url("/v1/payment_methods"),
        json={"card": {"number": number, "exp_month": exp_month, "exp_year": exp_year, "cvc": cvc}},
    )
    if is_transient(reply.status_code):
        raise ProviderUnavailable(f"/v1/payment_methods: HTTP {reply.status_code}")
    if reply.status_code == 400:
        error = reply.error()
        field = str(error.get("field") or "card").removeprefix("card.")
        raise InvalidCard(field, str(error.get("message") or "the card was refused")[:200])
    if reply.status_code not in (200, 201):
        raise ProviderRejected(f"tokenise a card: HTTP {reply.status_code} {reply.error()}")
    data = reply.json()
    card = data["card"]
    return Card(
        token=data["id"],
        brand=card["brand"],
        last4=card["last4"],
        exp_month=card["exp_month"],
        exp_year=card["exp_year"],
    )


def _retrieve(path: str, *, name: str) -> dict:
    """GET one object at `path`; `name` stands for it in the errors.

    Raises ProviderUnavailable when the provider cannot answer now, ProviderRejected for any other non-200.
    """
    reply = http.send("GET", _url(path))
    if is_transient(reply.status_code):
        raise ProviderUnavailable(f"retrieve {name}: HTTP {reply.status_code}")
    if reply.status_code != 200:
        raise ProviderRejected(f"retrieve {name}: HTTP {reply.status_code}")
    return reply.json()


def _list_pages(
    path: str, parse: Callable[[dict], _Item], *, what: str, params: dict[str, str | int | None]
) -> Iterator[_Item]:
    """The items of the list at `path` filtered by the `params` that are not None, page by page, each made by
    `parse`; `what` names the list in the errors.

    Raises ProviderUnavailable or ProviderRejected from the page that failed; the pages before it were yielded.
    """
    query = {name: value for name, value in params.items() if value is not None}
    while True:
        reply = http.send("GET", _url(f"{path}?{urlencode(query)}"))
        if is_transient(reply.status_code):
            raise ProviderUnavailable(f"list {what}: HTTP {reply.status_code}")
        if reply.status_code != 200:
            raise ProviderRejected(f"list {what}: HTTP {reply.status_code} {reply.error()}")
        page = reply.json()
        items = [parse(item) for item in page["data"]]
        yield from items
        if not page.get("has_more") or not items:
            return
        query["starting_after"] = items[-1].id


def retrieve_charge(*, charge_id: str) -> Charge:
    """Fetch a charge as the provider has it (webhooks are verified against this)."""
    return _charge_from(_retrieve(f"/v1/charges/{charge_id}", name=charge_id))


def list_charges(
    *, created_gte: datetime | None = None, reference: str | None = None, page_size: int = 100
) -> Iterator[Charge]:
    """The provider's charges, oldest first, made at or after `created_gte` and/or under `reference`, page by page.

    Raises ProviderUnavailable or ProviderRejected from the page that failed; the pages before it were yielded.
    """
    # The provider counts whole seconds: rounding down keeps the charges of that second.
    since = None if created_gte is None else max(1, int(created_gte.timestamp()))
    params = {"limit": page_size, "created_gte": since, "reference": reference}
    yield from _list_pages("/v1/charges", _charge_from, what="charges", params=params)


def refund(*, charge_id: str, amount: Decimal, currency: str, reference: str, idempotency_key: str) -> Refund:
    """Give back `amount` of the charge `charge_id`, once per idempotency key.

    Raises RefundRefused (no such charge, not refundable, more than is left, another currency, a bad
    field), ProviderRejected (the key reused with other parameters) or ProviderUnavailable (retry with
    the same key: the refund may have been made).
    """
    body = {"charge": charge_id, "amount": str(amount), "currency": currency, "reference": reference}
    reply = http.send("POST", _url("/v1/refunds"), json=body, headers={"Idempotency-Key": idempotency_key})
    if is_transient(reply.status_code):
        raise ProviderUnavailable(f"/v1/refunds: HTTP {reply.status_code}")
    if reply.status_code in (400, 404):
        error = reply.error()
        code = str(error.get("code") or error.get("type") or "refund_refused")[:100]
        raise RefundRefused(code, str(error.get("message") or "the refund was refused")[:200])
    if reply.status_code not in (200, 201):
        raise ProviderRejected(f"refund {idempotency_key}: HTTP {reply.status_code} {reply.error()}")
    return _refund_from(reply.json())


def retrieve_refund(*, refund_id: str) -> Refund:
    """Fetch a refund as the provider has it."""
    return _refund_from(_retrieve(f"/v1/refunds/{quote(refund_id, safe='')}", name=refund_id))


def list_refunds(
    *, charge_id: str | None = None, reference: str | None = None, page_size: int = 100
) -> Iterator[Refund]:
    """The provider's refunds, oldest first, of `charge_id` and/or under `reference`, page by page.

    Raises ProviderUnavailable or ProviderRejected from the page that failed; the pages before it were yielded.
    """
    params = {"limit": page_size, "charge": charge_id, "reference": reference}
    yield from _list_pages("/v1/refunds", _refund_from, what="refunds", params=params)
