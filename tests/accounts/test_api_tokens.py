"""API tokens on the account page: made and shown once, listed by name, revoked by their owner only."""

import re

import pytest
from django.test import Client

from accounts import services
from accounts.models import ApiToken
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

KEY = "0" * 32


def make(client: Client, name: str = "laptop", form_key: str = KEY):
    return client.post("/accounts/tokens/", {"name": name, "form_key": form_key})


def shown_token(response) -> str:
    [token] = re.findall(r'<pre class="token">([^<]+)</pre>', response.content.decode())
    return token


def api(token: str):
    return Client().get("/api/orders/", HTTP_AUTHORIZATION=f"Bearer {token}")


def test_the_tokens_page_needs_a_signed_in_user(client):
    response = client.get("/accounts/tokens/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_a_token_is_shown_once_signs_in_to_the_api_and_only_its_digest_is_kept(client):
    user = UserFactory()
    client.force_login(user)

    response = make(client)

    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    token = shown_token(response)
    assert api(token).status_code == 200
    stored = ApiToken.objects.get(user=user)
    assert (stored.name, stored.digest) == ("laptop", ApiToken.digest_of(token))
    assert token not in client.get("/accounts/tokens/").content.decode()
    assert "laptop" in client.get("/accounts/tokens/").content.decode()


def test_a_double_submitted_form_makes_one_token(client):
    user = UserFactory()
    client.force_login(user)
    make(client)
    again = make(client)
    assert '<pre class="token">' not in again.content.decode()
    assert ApiToken.objects.filter(user=user).count() == 1


def test_a_revoked_token_signs_in_no_more_and_no_one_else_can_revoke_it(client):
    owner, other = UserFactory(), UserFactory()
    token = services.issue_api_token(user=owner, name="ci")
    record = ApiToken.objects.get(user=owner)
    client.force_login(other)

    assert client.post(f"/accounts/tokens/{record.pk}/revoke/").status_code == 404
    assert api(token).status_code == 200

    client.force_login(owner)
    assert client.get(f"/accounts/tokens/{record.pk}/revoke/").status_code == 405
    assert client.post(f"/accounts/tokens/{record.pk}/revoke/").status_code == 302
    assert api(token).status_code == 401
    assert not ApiToken.objects.exists()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"name": "x" * 101}, "name"),
        ({"name": "bad\x00name"}, "name"),
        ({"name": "tab\x07bell"}, "name"),
        ({"form_key": ""}, "form_key"),
        ({"form_key": "not-hex"}, "form_key"),
        ({"form_key": "0" * 33}, "form_key"),
        ({"form_key": "A" * 32}, "form_key"),
    ],
    ids=str,
)
def test_hostile_token_forms_make_nothing(client, fields, field):
    client.force_login(UserFactory())
    response = client.post("/accounts/tokens/", {"name": "ok", "form_key": KEY, **fields})
    assert response.status_code == 200
    assert '<pre class="token">' not in response.content.decode()
    assert not ApiToken.objects.exists()


def test_an_account_keeps_at_most_twenty_tokens(client):
    user = UserFactory()
    for n in range(services.MAX_API_TOKENS):
        services.issue_api_token(user=user, name=f"t{n}")
    client.force_login(user)
    response = make(client, form_key="1" * 32)
    assert "at most 20 tokens" in response.content.decode()
    assert ApiToken.objects.filter(user=user).count() == services.MAX_API_TOKENS


@pytest.mark.django_db(transaction=True)
def test_two_submits_of_one_form_at_the_same_moment_make_one_token():
    """A double click sends both requests before either has answered: the session cannot tell them apart."""
    from tests.concurrency import run_concurrently

    user = UserFactory()
    client = Client()
    client.force_login(user)
    cookies = client.cookies

    def submit(_: int) -> int:
        racer = Client()
        racer.cookies = cookies
        return make(racer, form_key="2" * 32).status_code

    assert run_concurrently(4, submit) == [200] * 4
    assert ApiToken.objects.filter(user=user).count() == 1
