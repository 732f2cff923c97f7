"""Reads of an account for pages and the API: an owner sees only their own."""

from typing import TYPE_CHECKING

from django.db.models import QuerySet

from .models import Address, ApiToken
from .services import UnknownAddress

if TYPE_CHECKING:
    from django.contrib.auth.models import User


def addresses_for(*, owner: "User") -> QuerySet[Address]:
    return Address.objects.filter(owner=owner)


def address_get_for(*, owner: "User", address_id: int) -> Address:
    """One of the owner's addresses; another owner's or none raises UnknownAddress (404)."""
    found = addresses_for(owner=owner).filter(pk=address_id).first()
    if found is None:
        raise UnknownAddress("no such address")
    return found


def api_tokens_for(*, owner: "User") -> QuerySet[ApiToken]:
    """The owner's API tokens, newest first (their names and dates: the tokens themselves are never stored)."""
    return ApiToken.objects.filter(user=owner)
