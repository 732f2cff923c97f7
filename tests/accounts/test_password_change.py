"""The password-change page (allauth's, linked from the profile): the old password is asked for, the validators
apply, and a changed password signs out every other session while this one stays signed in."""

import pytest
from django.core import mail
from django.test import Client

from notifications.models import OutgoingEmail
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

PAGE = "/accounts/password/change/"
OLD = "correct-horse-battery"  # noqa: S105 (UserFactory's)
NEW = "Saffron-tiger-88"  # noqa: S105 (passes the validators)


def signed_in(user) -> Client:
    client = Client()
    assert client.post("/accounts/login/", {"login": user.username, "password": OLD}).status_code == 302
    return client


def test_the_page_needs_a_signed_in_user(client):
    for response in (client.get(PAGE), client.post(PAGE, {"oldpassword": OLD, "password1": NEW, "password2": NEW})):
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_the_profile_links_to_it():
    user = UserFactory()
    assert f'href="{PAGE}"' in signed_in(user).get("/accounts/profile/").content.decode()


def test_a_changed_password_signs_out_every_other_session_and_keeps_this_one():
    user = UserFactory()
    here, elsewhere = signed_in(user), signed_in(user)

    response = here.post(PAGE, {"oldpassword": OLD, "password1": NEW, "password2": NEW})

    assert response.status_code == 302
    user.refresh_from_db()
    assert user.check_password(NEW) and not user.check_password(OLD)
    assert here.get("/accounts/profile/").status_code == 200
    gone = elsewhere.get("/accounts/profile/")
    assert gone.status_code == 302 and gone["Location"].startswith("/accounts/login/")
    assert Client().post("/accounts/login/", {"login": user.username, "password": OLD}).status_code == 200  # refused
    assert Client().post("/accounts/login/", {"login": user.username, "password": NEW}).status_code == 302


@pytest.mark.parametrize(
    ("form", "field"),
    [
        ({"oldpassword": "not-my-password", "password1": NEW, "password2": NEW}, "oldpassword"),
        ({"oldpassword": "", "password1": NEW, "password2": NEW}, "oldpassword"),
        ({"oldpassword": OLD, "password1": NEW, "password2": NEW + "x"}, "password2"),
        ({"oldpassword": OLD, "password1": "password", "password2": "password"}, "password1"),
        ({"oldpassword": OLD, "password1": "12345678901", "password2": "12345678901"}, "password1"),
        ({"oldpassword": OLD, "password1": "\x00" + NEW, "password2": "\x00" + NEW}, "password1"),
        ({"oldpassword": OLD}, "password1"),
    ],
    ids=["wrong-old", "no-old", "mismatch", "common", "numeric", "nul-byte", "no-new"],
)
def test_a_refused_change_says_which_field_and_keeps_the_password(form, field):
    user = UserFactory()
    client = signed_in(user)

    response = client.post(PAGE, form)

    assert response.status_code == 200
    assert field in response.context["form"].errors, response.context["form"].errors
    user.refresh_from_db()
    assert user.check_password(OLD)
    assert client.get("/accounts/profile/").status_code == 200  # still signed in


def test_a_changed_password_emails_the_owner_once_after_the_commit(django_capture_on_commit_callbacks):
    """Someone else who changed it (a session left open) is found out: the owner hears of it, with where it came
    from. The email goes through the outbox like every email, once."""
    user = UserFactory()
    client = signed_in(user)

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            PAGE, {"oldpassword": OLD, "password1": NEW, "password2": NEW}, REMOTE_ADDR="203.0.113.9"
        )

    assert response.status_code == 302
    [email] = OutgoingEmail.objects.filter(kind="account/email/password_changed")
    assert (email.to, email.status) == (user.email, OutgoingEmail.Status.SENT)
    [message] = [sent for sent in mail.outbox if sent.to == [user.email]]
    assert "password" in message.subject.lower()
    assert "Your password has been changed." in message.body and "203.0.113.9" in message.body


def test_a_refused_change_emails_nobody(django_capture_on_commit_callbacks):
    user = UserFactory()
    client = signed_in(user)

    with django_capture_on_commit_callbacks(execute=True):
        client.post(PAGE, {"oldpassword": "not-my-password", "password1": NEW, "password2": NEW})

    assert not OutgoingEmail.objects.exists() and mail.outbox == []


def test_guessing_the_old_password_is_limited_to_five_tries_a_minute():
    """A stolen session cannot try old passwords one after another (allauth's change_password limit, 5/m/user):
    the sixth attempt within the minute is a 429, even with the right one, and the password stays."""
    user = UserFactory()
    client = signed_in(user)
    for guess in range(5):
        form = {"oldpassword": f"guess-{guess}", "password1": NEW, "password2": NEW}
        assert client.post(PAGE, form).status_code == 200

    limited = client.post(PAGE, {"oldpassword": OLD, "password1": NEW, "password2": NEW})

    assert limited.status_code == 429
    user.refresh_from_db()
    assert user.check_password(OLD)
