"""Request parsing: every bad input becomes a ValidationError naming the field, never a 500."""

import json
import math
import re
from typing import Any

MAX_BODY_BYTES = 64 * 1024
MAX_AMOUNT_MINOR = 10**12
MAX_ORDER_ID = 2**63 - 1
MAX_KEY_LENGTH = 255
MAX_TEXT_LENGTH = 500
MAX_METADATA_KEYS = 50
MAX_ITEMS = 500

# [0-9], not \d: \d also matches non-ASCII digits.
_AMOUNT_RE = re.compile(r"[0-9]{1,13}(\.[0-9]{1,2})?")
_CURRENCY_RE = re.compile(r"[A-Za-z]{3}")
# Visible ASCII only: a key travels in an HTTP header and is compared byte for byte.
_KEY_RE = re.compile(r"[\x21-\x7e]+")
_PAYMENT_METHOD_ID_RE = re.compile(r"pm_[0-9a-f]{24}")
_CARD_NUMBER_RE = re.compile(r"[0-9]{12,19}")
_CVC_RE = re.compile(r"[0-9]{3,4}")


class ValidationError(Exception):
    """Bad input; `field` names the offending field (None when the body as a whole is wrong)."""

    def __init__(self, field: str | None, message: str, code: str = "invalid_request", *, status: int = 400):
        super().__init__(message)
        self.field = field
        self.message = message
        self.code = code
        self.status = status


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; NaN/Infinity and non-UTF-8 bodies are rejected."""
    if not raw.strip():
        raise ValidationError(None, "request body must be a JSON object", code="invalid_json")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValidationError(None, "request body is not valid UTF-8 JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ValidationError(None, "request body must be a JSON object", code="invalid_json")
    return data


def parse_idempotency_key(value: str | None) -> str:
    """The `Idempotency-Key` header, required on every create."""
    if value is None or not value.strip():
        raise ValidationError(
            "Idempotency-Key", "the Idempotency-Key header is required", code="missing_idempotency_key"
        )
    value = value.strip()
    if len(value) > MAX_KEY_LENGTH or not _KEY_RE.fullmatch(value):
        raise ValidationError(
            "Idempotency-Key",
            f"the Idempotency-Key header must be 1-{MAX_KEY_LENGTH} visible ASCII characters",
            code="invalid_idempotency_key",
        )
    return value


def _reject_unknown(data: dict[str, Any], allowed: set[str], prefix: str = "") -> None:
    for name in data:
        if name not in allowed:
            raise ValidationError(f"{prefix}{name}", f"unknown field {prefix}{name!r}", code="unknown_field")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _required_text(data: dict[str, Any], name: str, *, field: str | None = None) -> str:
    field = field or name
    value = data.get(name)
    if value is None:
        raise ValidationError(field, f"{field} is required", code="missing_field")
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(field, f"{field} must be a non-empty string", code="invalid_type")
    if len(value) > MAX_TEXT_LENGTH:
        raise ValidationError(field, f"{field} must be at most {MAX_TEXT_LENGTH} characters", code="too_long")
    return value


def _scalar_map(value: Any, field: str) -> dict[str, Any]:
    """An object of string keys to strings, finite numbers, booleans or null (no nesting)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError(field, f"{field} must be an object", code="invalid_type")
    if len(value) > MAX_METADATA_KEYS:
        raise ValidationError(field, f"{field} may hold at most {MAX_METADATA_KEYS} keys", code="too_long")
    for key, item in value.items():
        if isinstance(item, float) and not math.isfinite(item):
            raise ValidationError(f"{field}.{key}", f"{field}.{key} must be a finite number", code="invalid_type")
        if not (item is None or isinstance(item, str | int | float | bool)):
            raise ValidationError(
                f"{field}.{key}", f"{field}.{key} must be a string, number, boolean or null", code="invalid_type"
            )
    return value


def _amount_minor(data: dict[str, Any]) -> int:
    has_amount, has_minor = "amount" in data, "amount_minor" in data
    if has_amount and has_minor:
        raise ValidationError("amount", "send either amount or amount_minor, not both", code="conflicting_fields")
    if not has_amount and not has_minor:
        raise ValidationError(
            "amount", "amount (decimal string) or amount_minor (integer) is required", "missing_field"
        )
    if has_minor:
        value = data["amount_minor"]
        if not _is_int(value):
            raise ValidationError("amount_minor", "amount_minor must be an integer", code="invalid_type")
        minor = value
        field = "amount_minor"
    else:
        value = data["amount"]
        # A string, never a JSON number: money must not pass through a float.
        if not isinstance(value, str):
            raise ValidationError("amount", 'amount must be a decimal string such as "12.50"', code="invalid_type")
        if not _AMOUNT_RE.fullmatch(value.strip()):
            raise ValidationError(
                "amount",
                "amount must be a positive decimal string with at most 2 decimal places",
                code="invalid_amount",
            )
        whole, _, fraction = value.strip().partition(".")
        minor = int(whole) * 100 + int(fraction.ljust(2, "0"))
        field = "amount"
    if minor <= 0:
        raise ValidationError(field, f"{field} must be greater than zero", code="invalid_amount")
    if minor > MAX_AMOUNT_MINOR:
        raise ValidationError(field, f"{field} is too large", code="invalid_amount")
    return minor


def parse_charge(data: dict[str, Any]) -> dict[str, Any]:
    """Normalized charge parameters; `"12.50"` and `amount_minor: 1250` are the same parameters."""
    _reject_unknown(
        data, {"amount", "amount_minor", "currency", "reference", "description", "metadata", "payment_method"}
    )
    amount_minor = _amount_minor(data)
    currency = _required_text(data, "currency")
    if not _CURRENCY_RE.fullmatch(currency):
        raise ValidationError("currency", "currency must be a 3-letter ISO 4217 code", code="invalid_currency")
    reference = _required_text(data, "reference")
    description = data.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > MAX_TEXT_LENGTH):
        raise ValidationError(
            "description", f"description must be a string of at most {MAX_TEXT_LENGTH} characters", "invalid_type"
        )
    payment_method = data.get("payment_method")
    if payment_method is not None and (
        not isinstance(payment_method, str) or not _PAYMENT_METHOD_ID_RE.fullmatch(payment_method)
    ):
        raise ValidationError("payment_method", "payment_method must be a payment method id (pm_...)", "invalid_type")
    params = {
        "amount_minor": amount_minor,
        "currency": currency.upper(),
        "reference": reference,
        "description": description,
        "metadata": _scalar_map(data.get("metadata"), "metadata"),
    }
    if payment_method is not None:
        # Only when sent: the fingerprint of a charge made without one stays what it was.
        params["payment_method"] = payment_method
    return params


def parse_refund(data: dict[str, Any]) -> dict[str, Any]:
    """Normalized refund parameters: the charge, the amount to give back, its currency and the shop's reference.

    Whether the charge exists, may be refunded and has that much left is the ledger's to decide.
    """
    _reject_unknown(data, {"charge", "amount", "amount_minor", "currency", "reference"})
    charge = _required_text(data, "charge")
    amount_minor = _amount_minor(data)
    currency = _required_text(data, "currency")
    if not _CURRENCY_RE.fullmatch(currency):
        raise ValidationError("currency", "currency must be a 3-letter ISO 4217 code", code="invalid_currency")
    return {
        "charge": charge,
        "amount_minor": amount_minor,
        "currency": currency.upper(),
        "reference": _required_text(data, "reference"),
    }


def _luhn_valid(number: str) -> bool:
    total = 0
    for position, digit in enumerate(int(character) for character in reversed(number)):
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def parse_payment_method(data: dict[str, Any], *, this_year: int, this_month: int) -> dict[str, Any]:
    """A card to tokenise: `{"card": {"number", "exp_month", "exp_year", "cvc"}}`, checked as a provider would."""
    _reject_unknown(data, {"card", "metadata"})
    card = data.get("card")
    if card is None:
        raise ValidationError("card", "card is required", code="missing_field")
    if not isinstance(card, dict):
        raise ValidationError("card", "card must be an object", code="invalid_type")
    _reject_unknown(card, {"number", "exp_month", "exp_year", "cvc"}, prefix="card.")
    raw = _required_text(card, "number", field="card.number")
    # Spaces and dashes as people type them; anything else is not a card number.
    number = raw.replace(" ", "").replace("-", "")
    if not _CARD_NUMBER_RE.fullmatch(number) or not _luhn_valid(number):
        raise ValidationError("card.number", "card.number is not a valid card number", code="invalid_number")
    month: Any = card.get("exp_month")
    year: Any = card.get("exp_year")
    if not _is_int(month) or not 1 <= month <= 12:
        raise ValidationError("card.exp_month", "card.exp_month must be an integer from 1 to 12", "invalid_expiry")
    if not _is_int(year) or not 2000 <= year <= 2100:
        raise ValidationError("card.exp_year", "card.exp_year must be a four-digit year", code="invalid_expiry")
    if (year, month) < (this_year, this_month):
        raise ValidationError("card.exp_year", "the card has expired", code="expired_card")
    cvc = card.get("cvc")
    if not isinstance(cvc, str) or not _CVC_RE.fullmatch(cvc):
        raise ValidationError("card.cvc", "card.cvc must be 3 or 4 digits", code="invalid_cvc")
    return {
        "number": number,
        "exp_month": month,
        "exp_year": year,
        "metadata": _scalar_map(data.get("metadata"), "metadata"),
    }


def _parse_item(item: Any, index: int) -> dict[str, Any]:
    field = f"items[{index}]"
    if not isinstance(item, dict):
        raise ValidationError(field, f"{field} must be an object", code="invalid_type")
    sku = _required_text(item, "sku", field=f"{field}.sku")
    quantity = item.get("quantity")
    if quantity is None:
        raise ValidationError(f"{field}.quantity", f"{field}.quantity is required", code="missing_field")
    if not _is_int(quantity):
        raise ValidationError(f"{field}.quantity", f"{field}.quantity must be an integer", code="invalid_type")
    if not 0 < quantity <= 1_000_000:
        raise ValidationError(f"{field}.quantity", f"{field}.quantity must be between 1 and 1000000", "invalid_value")
    # Other keys (name, unit price...) are kept as sent, as long as they are flat.
    extra = _scalar_map({k: v for k, v in item.items() if k not in ("sku", "quantity")}, field)
    return {"sku": sku, "quantity": quantity, **extra}


def parse_shipment(data: dict[str, Any]) -> dict[str, Any]:
    """Normalized shipment parameters."""
    _reject_unknown(data, {"order_id", "items", "metadata"})
    order_id = data.get("order_id")
    if order_id is None:
        raise ValidationError("order_id", "order_id is required", code="missing_field")
    if not _is_int(order_id):
        raise ValidationError("order_id", "order_id must be an integer", code="invalid_type")
    if not 0 < order_id <= MAX_ORDER_ID:
        raise ValidationError("order_id", "order_id must be a positive integer", code="invalid_value")
    items = data.get("items")
    if items is None:
        raise ValidationError("items", "items is required", code="missing_field")
    if not isinstance(items, list) or not items:
        raise ValidationError("items", "items must be a non-empty list", code="invalid_type")
    if len(items) > MAX_ITEMS:
        raise ValidationError("items", f"items may hold at most {MAX_ITEMS} entries", code="too_long")
    return {
        "order_id": order_id,
        "items": [_parse_item(item, index) for index, item in enumerate(items)],
        "metadata": _scalar_map(data.get("metadata"), "metadata"),
    }


RATE_FIELDS = ("error_rate", "timeout_rate", "decline_rate")
COUNTER_FIELDS = (
    "latency_ms",
    "fail_next",
    "fail_after_charge_next",
    "fail_after_shipment_next",
    "fail_after_refund_next",
)
MAX_LATENCY_MS = 600_000
MAX_TIMEOUT_SECONDS = 3600


def parse_faults_update(data: dict[str, Any]) -> dict[str, float | int]:
    """The fault settings to change; fields left out keep their current value."""
    _reject_unknown(data, {*RATE_FIELDS, *COUNTER_FIELDS, "timeout_seconds"})
    changes: dict[str, float | int] = {}
    for name, value in data.items():
        if name in RATE_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ValidationError(name, f"{name} must be a number between 0 and 1", code="invalid_value")
            changes[name] = float(value)
        elif name == "timeout_seconds":
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_TIMEOUT_SECONDS:
                raise ValidationError(
                    name, f"{name} must be a number between 0 and {MAX_TIMEOUT_SECONDS}", code="invalid_value"
                )
            changes[name] = float(value)
        else:
            limit = MAX_LATENCY_MS if name == "latency_ms" else 1_000_000
            if not _is_int(value) or not 0 <= value <= limit:
                raise ValidationError(name, f"{name} must be an integer between 0 and {limit}", code="invalid_value")
            changes[name] = value
    return changes


def parse_positive_int_query(value: str, field: str) -> int:
    """A query parameter that must be a positive integer."""
    if not value.isascii() or not value.isdigit() or not 0 < int(value) <= MAX_ORDER_ID:
        raise ValidationError(field, f"{field} must be a positive integer", code="invalid_value")
    return int(value)
