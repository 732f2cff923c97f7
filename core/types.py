"""Types for the apps' annotations; nothing here changes what runs."""

from django.contrib.auth.models import User
from django.http import HttpRequest


class AuthenticatedHttpRequest(HttpRequest):
    """The request of a view behind `login_required`: its user is signed in (django-stubs' recipe)."""

    user: User


class ApiRequest(HttpRequest):
    """The request of an authenticated API operation: django-ninja sets `auth` to what the authenticator returned."""

    auth: User
