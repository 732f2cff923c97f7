"""Account rules: saved addresses, each seen and changed by its owner only."""

import re
import secrets
from typing import TYPE_CHECKING

from django.db import IntegrityError, transaction

from core.errors import ApplicationError

from .models import ADDRESS_FIELDS, Address, ApiToken

if TYPE_CHECKING:
    from django.contrib.auth.models import User

MAX_ADDRESSES = 20
MAX_API_TOKENS = 20
MAX_TOKEN_NAME_LENGTH = 100
_COUNTRY_RE = re.compile(r"[A-Z]{2}")
_POSTAL_CODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 -]{0,18}[A-Za-z0-9]|[A-Za-z0-9]")


ADDRESS_MAX_LENGTHS = {
    field.name: field.max_length for field in Address._meta.concrete_fields if field.name in ADDRESS_FIELDS
}


class InvalidAddress(ApplicationError):
    code = "invalid_address"

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


class UnknownAddress(ApplicationError):
    """No such address among the owner's (someone else's is no different): 404."""

    code = "not_found"
    field = "address"
    status = 404


def clean_address(fields: dict[str, object]) -> dict[str, str]:
    """The address fields trimmed and checked (InvalidAddress names the first bad one); unknown keys refused."""
    unknown = set(fields) - set(ADDRESS_FIELDS)
    if unknown:
        raise InvalidAddress(sorted(unknown)[0], f"unknown field {sorted(unknown)[0]!r}")
    cleaned: dict[str, str] = {}
    for name in ADDRESS_FIELDS:
        value = fields.get(name, "")
        if not isinstance(value, str):
            raise InvalidAddress(name, f"{name} must be text")
        value = " ".join(value.split())
        limit = ADDRESS_MAX_LENGTHS[name]
        if limit is not None and len(value) > limit:
            raise InvalidAddress(name, f"{name} must be at most {limit} characters")
        if not value and name != "line2":
            raise InvalidAddress(name, f"{name} is required")
        cleaned[name] = value
    cleaned["country"] = cleaned["country"].upper()
    if not _COUNTRY_RE.fullmatch(cleaned["country"]):
        raise InvalidAddress("country", "country must be a two-letter country code, such as DE or FR")
    if not _POSTAL_CODE_RE.fullmatch(cleaned["postal_code"]):
        raise InvalidAddress("postal_code", "postal_code may hold letters, digits, spaces and dashes only")
    return cleaned


def add_address(*, owner: "User", **fields: object) -> Address:
    """Save an address for the owner (at most MAX_ADDRESSES). Raises InvalidAddress."""
    cleaned = clean_address(fields)
    if Address.objects.filter(owner=owner).count() >= MAX_ADDRESSES:
        raise InvalidAddress("address", f"an account keeps at most {MAX_ADDRESSES} addresses")
    return Address.objects.create(owner=owner, **cleaned)


def delete_address(*, owner: "User", address_id: int) -> None:
    """Delete one of the owner's addresses (orders keep their copy). Raises UnknownAddress."""
    deleted, _ = Address.objects.filter(pk=address_id, owner=owner).delete()
    if not deleted:
        raise UnknownAddress("no such address")


def confirm_email_of(user: "User") -> None:
    """Mark the user's email address verified and primary, for accounts made by staff or scripts (no link to click).

    allauth refuses to sign in a user whose address was never confirmed (ACCOUNT_EMAIL_VERIFICATION).
    """
    from allauth.account.models import EmailAddress

    if user.email:
        EmailAddress.objects.update_or_create(
            user=user, email=user.email.lower(), defaults={"verified": True, "primary": True}
        )


# --- API tokens ------------------------------------------------------------------------------------


class InvalidApiToken(ApplicationError):
    code = "invalid_token"
    field = "name"


class UnknownApiToken(ApplicationError):
    """No such token among the owner's (someone else's is no different): 404."""

    code = "not_found"
    field = "token"
    status = 404


def issue_api_token(*, user: "User", name: str = "", form_key: str = "") -> str:
    """Create an API token for the user and return it (shown once: only its digest is stored).

    With `form_key` (the page form's), a second call with the same key makes nothing and returns ""
    (a unique constraint decides, also for two submits at the same moment). Raises InvalidApiToken
    for a name that is too long or holds control characters, or past MAX_API_TOKENS.
    """
    name = " ".join(name.split())
    if len(name) > MAX_TOKEN_NAME_LENGTH or not name.isprintable():
        raise InvalidApiToken(f"a token's name is at most {MAX_TOKEN_NAME_LENGTH} printable characters")
    if ApiToken.objects.filter(user=user).count() >= MAX_API_TOKENS:
        raise InvalidApiToken(f"an account keeps at most {MAX_API_TOKENS} tokens: revoke one first")
    raw = secrets.token_urlsafe(32)
    try:
        with transaction.atomic():
            ApiToken.objects.create(user=user, name=name, form_key=form_key, digest=ApiToken.digest_of(raw))
    except IntegrityError:
        if form_key and ApiToken.objects.filter(user=user, form_key=form_key).exists():
            return ""
        raise
    return raw


def user_for_token(raw: str) -> "User | None":
    """The active user a raw API token belongs to, or None."""
    token = ApiToken.objects.select_related("user").filter(digest=ApiToken.digest_of(raw)).first()
    if token is None or not token.user.is_active:
        return None
    return token.user


def revoke_api_token(*, owner: "User", token_id: int) -> None:
    """Delete one of the owner's tokens: it authenticates nothing from now on. Raises UnknownApiToken."""
    deleted, _ = ApiToken.objects.filter(pk=token_id, user=owner).delete()
    if not deleted:
        raise UnknownApiToken("no such token")
