"""Sign-up with a confirmed address, sign-in, password reset: allauth's flows, every email through the outbox, once."""

import re

import pytest
from allauth.account.models import EmailAddress
from django.contrib.auth import get_user_model
from django.core import mail
from django.test import Client

from core.models import OutboxItem
from notifications.models import OutgoingEmail
from notifications.services import send_email
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

User = get_user_model()
PASSWORD = "Saffron-tiger-88"  # noqa: S105 (a test password that passes the validators)
LINK = re.compile(r"https?://testserver(/accounts/[^\s\"<]+)")


def sign_up(client: Client, capture, **fields):
    data = {"email": "ada@example.com", "username": "ada", "password1": PASSWORD, "password2": PASSWORD, **fields}
    with capture(execute=True):
        return client.post("/accounts/signup/", data)


def link_in(message) -> str:
    [path] = LINK.findall(message.body)
    return path


def test_sign_up_sends_one_confirmation_email_through_the_outbox_and_keeps_no_usable_link(
    client, django_capture_on_commit_callbacks
):
    response = sign_up(client, django_capture_on_commit_callbacks)

    assert response.status_code == 302
    assert response["Location"] == "/accounts/confirm-email/"
    user = User.objects.get(username="ada")
    assert not EmailAddress.objects.get(user=user).verified
    [message] = mail.outbox
    assert message.to == ["ada@example.com"]
    assert message.subject.startswith("[Shop] ")
    assert link_in(message).startswith("/accounts/confirm-email/")
    email = OutgoingEmail.objects.get()
    item = OutboxItem.objects.get(task_name="notifications.tasks.send_email")
    assert (item.args, item.state) == ([email.pk], OutboxItem.State.DONE)
    # Sent: its bodies are wiped, so the database keeps no working link.
    assert (email.status, email.body_text, email.body_html) == ("sent", "", "")
    # A second delivery of the task sends nothing more.
    send_email(email_id=email.pk)
    assert len(mail.outbox) == 1


def test_an_unconfirmed_account_cannot_sign_in_until_its_link_is_followed(client, django_capture_on_commit_callbacks):
    sign_up(client, django_capture_on_commit_callbacks)
    [message] = mail.outbox
    client.logout()

    with django_capture_on_commit_callbacks(execute=True):
        refused = client.post("/accounts/login/", {"login": "ada", "password": PASSWORD})
    assert refused.status_code == 302 and refused["Location"] == "/accounts/confirm-email/"
    assert "_auth_user_id" not in client.session

    confirm = link_in(message)
    assert client.get(confirm).status_code == 200  # a page with a button: a GET changes nothing
    assert not EmailAddress.objects.get(email="ada@example.com").verified
    response = client.post(confirm)
    assert response.status_code == 302
    assert EmailAddress.objects.get(email="ada@example.com").verified
    assert int(client.session["_auth_user_id"]) == User.objects.get(username="ada").pk
    # The link works once.
    assert Client().post(confirm).status_code in (302, 404) and EmailAddress.objects.filter(verified=True).count() == 1


def test_a_double_submitted_sign_up_makes_one_account_and_one_email(client, django_capture_on_commit_callbacks):
    first = sign_up(client, django_capture_on_commit_callbacks)
    second = sign_up(Client(), django_capture_on_commit_callbacks)

    assert first.status_code == 302
    assert second.status_code == 200  # the form again: the username and the address are taken
    assert User.objects.filter(username="ada").count() == 1
    assert len(mail.outbox) == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"email": ""},
        {"email": "not-an-address"},
        {"email": "a" * 250 + "@example.com"},  # allauth alone cut it to 254 and mailed "...@exa"
        {"email": "a" * 65 + "@example.com"},
        {"username": ""},
        {"username": "x" * 200},
        {"username": "ada lovelace"},
        {"username": "<script>alert(1)</script>"},
        {"password2": "Saffron-tiger-89"},
        {"password1": "password", "password2": "password"},
        {"password1": "12345678901", "password2": "12345678901"},
        {"password1": "ada", "password2": "ada"},
        {"username": "taken"},
        {"email": "ada@example.com\r\nBcc: victim@example.com"},
    ],
    ids=str,
)
def test_hostile_sign_ups_get_the_form_again_and_nothing_is_created(client, django_capture_on_commit_callbacks, fields):
    UserFactory(username="taken", email="taken@example.com")
    response = sign_up(client, django_capture_on_commit_callbacks, **fields)

    assert response.status_code == 200
    assert response.context["form"].errors
    assert User.objects.count() == 1
    assert mail.outbox == [] and not OutgoingEmail.objects.exists()


def test_a_sign_up_with_an_address_already_taken_makes_no_account_and_tells_only_its_owner(
    client, django_capture_on_commit_callbacks
):
    UserFactory(username="taken", email="taken@example.com")
    response = sign_up(client, django_capture_on_commit_callbacks, email="taken@example.com")

    # The same answer as a new sign-up, so the page does not say which addresses have accounts.
    assert (response.status_code, response["Location"]) == (302, "/accounts/confirm-email/")
    assert not User.objects.filter(username="ada").exists()
    [message] = mail.outbox
    assert message.to == ["taken@example.com"]
    assert "/accounts/confirm-email/" not in message.body


def test_a_password_reset_link_sets_a_new_password_once(client, django_capture_on_commit_callbacks):
    user = UserFactory(email="grace@example.com")
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/accounts/password/reset/", {"email": "GRACE@example.com"})
    assert response.status_code == 302
    [message] = mail.outbox
    reset = link_in(message)

    # The link redirects to a form under a key kept in the session, which takes the new password.
    form = client.get(reset, follow=True)
    assert form.status_code == 200
    new = "Lapis-harbour-41"
    done = client.post(form.redirect_chain[-1][0], {"password1": new, "password2": new})
    assert done.status_code == 302
    user.refresh_from_db()
    assert user.check_password(new)
    # The owner hears that the password was reset (ACCOUNT_EMAIL_NOTIFICATIONS), through the outbox.
    assert OutgoingEmail.objects.filter(kind="account/email/password_reset", to="grace@example.com").count() == 1
    assert Client().post("/accounts/login/", {"login": "grace@example.com", "password": new}).status_code == 302
    # Used once: the same link is refused.
    again = Client().get(reset, follow=True)
    assert "token_fail" in again.context or b"invalid" in again.content.lower()


def test_a_reset_for_an_address_no_account_has_sends_nothing_and_says_the_same(
    client, django_capture_on_commit_callbacks
):
    UserFactory(email="grace@example.com")
    with django_capture_on_commit_callbacks(execute=True):
        unknown = client.post("/accounts/password/reset/", {"email": "nobody@example.com"})
        known = Client().post("/accounts/password/reset/", {"email": "grace@example.com"})
    assert unknown.status_code == known.status_code == 302
    assert unknown["Location"] == known["Location"]
    assert [message.to for message in mail.outbox] == [["grace@example.com"]]


def test_sign_in_by_email_address_or_username(client):
    user = UserFactory(email="lin@example.com")
    assert (
        client.post("/accounts/login/", {"login": "LIN@example.com", "password": "correct-horse-battery"}).status_code
        == 302
    )
    assert (
        Client().post("/accounts/login/", {"login": user.username, "password": "correct-horse-battery"}).status_code
        == 302
    )


def test_sign_out_is_a_post(client):
    user = UserFactory()
    client.force_login(user)
    assert client.get("/accounts/logout/").status_code == 200  # a confirmation page, still signed in
    assert "_auth_user_id" in client.session
    assert client.post("/accounts/logout/").status_code == 302
    assert "_auth_user_id" not in client.session
