"""The development inbox: the file backend's emails readable in the browser with DEBUG on, and nowhere else."""

import pytest
from django.core import mail
from django.core.mail import EmailMultiAlternatives

pytestmark = pytest.mark.django_db

FILE_BACKEND = "django.core.mail.backends.filebased.EmailBackend"


@pytest.fixture
def inbox(settings, tmp_path):
    settings.DEBUG = True
    settings.EMAIL_BACKEND = FILE_BACKEND
    settings.EMAIL_FILE_PATH = str(tmp_path / "emails")
    return tmp_path / "emails"


def send(subject: str, body: str, to: str = "ada@example.com") -> None:
    message = EmailMultiAlternatives(subject, body, "shop@example.com", [to])
    message.attach_alternative(f"<p>{body}</p>", "text/html")
    message.send()


def test_the_inbox_lists_the_written_emails_and_shows_one_with_its_links_clickable(client, inbox):
    send("[Shop] Please confirm your email address", "Confirm: http://127.0.0.1:8000/accounts/confirm-email/Mg:x/ now")
    send("Second", "no links here", to="grace@example.com")

    listing = client.get("/dev/emails/")
    assert listing.status_code == 200
    page = listing.content.decode()
    assert "Please confirm your email address" in page and "grace@example.com" in page
    first = listing.context["mails"][-1]

    shown = client.get(f"/dev/emails/{first.file}/{first.index}/")
    assert shown.status_code == 200
    assert '<a href="http://127.0.0.1:8000/accounts/confirm-email/Mg:x/">' in shown.content.decode()


def test_an_emails_text_is_escaped_and_only_urls_become_links(client, inbox):
    send(
        "<script>alert(1)</script>",
        'Click <b>here</b>: http://example.com/"onmouseover="alert(1) and javascript:alert(2)',
    )
    [shown] = client.get("/dev/emails/").context["mails"]
    page = client.get(f"/dev/emails/{shown.file}/{shown.index}/").content.decode()
    assert "<script>alert(1)</script>" not in page and "<b>here</b>" not in page
    assert 'href="http://example.com/"' in page  # the URL stops at the quote
    assert 'href="javascript' not in page


@pytest.mark.parametrize(
    "path",
    ["/dev/emails/../../etc/passwd/0/", "/dev/emails/nothing.log/0/", "/dev/emails/%2e%2e/0/", "/dev/emails/x/99/"],
)
def test_only_files_the_inbox_lists_are_read(client, inbox, path):
    send("One", "body")
    assert client.get(path).status_code == 404


def test_with_debug_off_or_another_backend_the_inbox_is_not_there(client, settings, inbox):
    settings.DEBUG = False
    assert client.get("/dev/emails/").status_code == 404
    settings.DEBUG = True
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    assert client.get("/dev/emails/").status_code == 404
    assert mail.outbox == []


def test_an_empty_inbox_says_how_to_fill_it(client, inbox):
    assert "No emails yet" in client.get("/dev/emails/").content.decode()


@pytest.mark.parametrize("address", ["192.168.1.20", "10.0.0.5", "203.0.113.9", "", "not-an-address"])
def test_the_inbox_is_served_only_to_this_machine(inbox, address):
    from django.test import Client

    send("Reset your password", "http://127.0.0.1:8000/accounts/password/reset/key/1-x/")
    assert Client(REMOTE_ADDR=address).get("/dev/emails/").status_code == 404
    assert Client(REMOTE_ADDR="::1").get("/dev/emails/").status_code == 200
