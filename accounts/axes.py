"""Which name django-axes counts a failed sign-in under (AXES_USERNAME_CALLABLE)."""

from typing import Any

from django.http import HttpRequest


def username(request: HttpRequest, credentials: dict[str, Any] | None = None) -> str | None:
    """The username or email address typed: from allauth's credentials, else the form's `login` or `username`."""
    for source in (credentials or {}, getattr(request, "POST", {})):
        for key in ("username", "email", "login"):
            value = source.get(key)
            if isinstance(value, str) and value:
                return value.strip().lower()[:255]
    return None
