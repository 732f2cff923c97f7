"""Staff operators for the admin tests: staff users holding only the permissions a test names."""

from typing import Any

from django.contrib.auth.models import Permission
from django.test import Client

from tests.factories import UserFactory


def staff_client(client: Client, app_label: str, *codenames: str, **user_fields: Any) -> Client:
    """`client` signed in as a new staff user (not a superuser) with `app_label`'s permissions `codenames`."""
    staff = UserFactory(is_staff=True, **user_fields)
    staff.user_permissions.set(Permission.objects.filter(content_type__app_label=app_label, codename__in=codenames))
    client.force_login(staff)
    return client
