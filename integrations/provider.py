"""The payment provider's client: charges, once per idempotency key.

Every charge carries the payment's stored idempotency key, so a retry of the same call can never
act twice on the provider's side. Connection errors, timeouts, the call deadline, 408/409/425/429
(not now) and 5xx become ProviderUnavailable, which is retryable; a decline (402) is CardDeclined,
and any other 4xx is ProviderRejected, both permanent.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from urllib.parse import urlencode

from django.conf import settings

from . import http
from .errors import ProviderRejected, ProviderUnavailable, is_transient

__all__ = [
    "CardDeclined",
    "Charge",
    "ProviderRejected",
    "ProviderUnavailable",
    "charge",
    "list_charges",
    "retrieve_charge",
]


class CardDeclined(ProviderRejected):
    def __init__(self, charge_id: str, reason: str = "card_declined"):
        self.charge_id = charge_id
        self.reason = reason
        super().__init__(f"charge {charge_id or '?'} declined: {reason}")


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
    )


def charge(*, amount: Decimal, currency: str, reference: str, idempotency_key: str) -> Charge:
    """Charge `amount` once per idempotency key. Raises CardDeclined, ProviderRejected or ProviderUnavailable."""
    reply = http.send(
        "POST",
        _url("/v1/charges"),
        json={"amount": str(amount), "currency": currency, "reference": reference},
        headers={"Idempotency-Key": idempotency_key},
    )
    if is_transient(reply.status_code):
        raise ProviderUnavailable(f"/v1/charges: HTTP {reply.status_code}")
    if reply.status_code == 402:
        error = reply.error()
        raise CardDeclined((error.get("charge") or {}).get("id", ""), error.get("type", "card_declined"))
    if reply.status_code not in (200, 201):
        raise ProviderRejected(f"charge {idempotency_key}: HTTP {reply.status_code} {reply.error()}")
    return _charge_from(reply.json())


def retrieve_charge(*, charge_id: str) -> Charge:
    """Fetch a charge as the provider has it (webhooks are verified against this)."""
    reply = http.send("GET", _url(f"/v1/charges/{charge_id}"))
    if is_transient(reply.status_code):
        raise ProviderUnavailable(f"retrieve {charge_id}: HTTP {reply.status_code}")
    if reply.status_code != 200:
        raise ProviderRejected(f"retrieve {charge_id}: HTTP {reply.status_code}")
    return _charge_from(reply.json())


def list_charges(
    *, created_gte: datetime | None = None, reference: str | None = None, page_size: int = 100
) -> Iterator[Charge]:
    """The provider's charges, oldest first, made at or after `created_gte` and/or under `reference`, page by page.

    Raises ProviderUnavailable or ProviderRejected from the page that failed; the pages before it were yielded.
    """
    params: dict[str, str | int] = {"limit": page_size}
    if created_gte is not None:
        # The provider counts whole seconds: rounding down keeps the charges of that second.
        params["created_gte"] = max(1, int(created_gte.timestamp()))
    if reference is not None:
        params["reference"] = reference
    while True:
        reply = http.send("GET", _url(f"/v1/charges?{urlencode(params)}"))
        if is_transient(reply.status_code):
            raise ProviderUnavailable(f"list charges: HTTP {reply.status_code}")
        if reply.status_code != 200:
            raise ProviderRejected(f"list charges: HTTP {reply.status_code} {reply.error()}")
        page = reply.json()
        charges = [_charge_from(item) for item in page["data"]]
        yield from charges
        if not page.get("has_more") or not charges:
            return
        params["starting_after"] = charges[-1].id
