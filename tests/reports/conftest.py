import csv
import io

import pytest
from django.test import Client

from accounts.services import issue_api_token
from tests.factories import UserFactory


@pytest.fixture(autouse=True)
def private_media(settings, tmp_path):
    """Report files go to this test's own directory."""
    settings.MEDIA_ROOT = tmp_path / "media"
    return settings.MEDIA_ROOT


@pytest.fixture
def staff(db):
    return UserFactory(is_staff=True)


@pytest.fixture
def client_of():
    """Factory: a test client signed in as the user (session auth)."""

    def make(user, **kwargs) -> Client:
        client = Client(**kwargs)
        client.force_login(user)
        return client

    return make


@pytest.fixture
def bearer_client_of():
    """Factory: a test client that sends the user's bearer token."""

    def make(user) -> Client:
        client = Client()
        client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {issue_api_token(user=user)}"
        return client

    return make


def csv_rows(report) -> list[dict]:
    with report.file.open("rb") as handle:
        return list(csv.DictReader(io.StringIO(handle.read().decode("utf-8"))))
