"""The development inbox: with DEBUG on, the emails Django's file backend wrote (`make run`) read in the browser.

Sign-up and password reset send links by email; in `make run` those emails are files under
EMAIL_FILE_PATH (var/emails). `/dev/emails/` lists them, newest first, and shows each one's text
with its links clickable. With DEBUG off, or another email backend, every page here is a 404,
and so it is for a request that does not come from this machine: `ADDRESS=0.0.0.0 make run`
opens the shop to the network, and the inbox holds sign-in and password-reset links.
"""

import email
import email.policy
import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe
from django.views.decorators.http import require_GET

FILE_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
# Django's file backend ends every message with a line of 79 dashes.
SEPARATOR = re.compile(rb"^-{79}$", re.MULTILINE)
MAX_FILES = 200
_URL = re.compile(r"https?://[^\s<>\"']+")


@dataclass(frozen=True)
class Mail:
    file: str
    index: int
    sent: datetime
    to: str
    subject: str
    message: EmailMessage


def _inbox(request: HttpRequest) -> Path:
    if not settings.DEBUG or settings.EMAIL_BACKEND != FILE_BACKEND:
        raise Http404("the development inbox is only served with DEBUG on and the file email backend")
    try:
        local = ipaddress.ip_address(request.META.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:
        local = False
    if not local:
        raise Http404("the development inbox is only served to this machine")
    return Path(settings.EMAIL_FILE_PATH)


def _read(path: Path) -> list[Mail]:
    chunks = [chunk.strip() for chunk in SEPARATOR.split(path.read_bytes())]
    sent = datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)
    mails = []
    for index, chunk in enumerate(chunk for chunk in chunks if chunk):
        message = email.message_from_bytes(chunk, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        mails.append(Mail(path.name, index, sent, str(message["To"] or ""), str(message["Subject"] or ""), message))
    return mails


def _files(inbox: Path) -> list[Path]:
    if not inbox.is_dir():
        return []
    files = [path for path in inbox.iterdir() if path.is_file() and path.suffix == ".log"]
    return sorted(files, key=lambda path: path.stat().st_mtime, reverse=True)[:MAX_FILES]


def _linked(text: str) -> SafeString:
    """The text escaped, with each http(s) URL in it made a link (the URL escaped too)."""
    parts: list[str] = []
    last = 0
    for match in _URL.finditer(text):
        parts.append(escape(text[last : match.start()]))
        url = escape(match.group(0))
        parts.append(f'<a href="{url}">{url}</a>')
        last = match.end()
    parts.append(escape(text[last:]))
    return mark_safe("".join(parts))  # noqa: S308 (every piece above is escaped)


@require_GET
def inbox(request: HttpRequest) -> HttpResponse:
    mails = [mail for path in _files(_inbox(request)) for mail in reversed(_read(path))]
    return render(request, "notifications/devmail_inbox.html", {"mails": mails, "directory": settings.EMAIL_FILE_PATH})


@require_GET
def message(request: HttpRequest, file: str, index: int) -> HttpResponse:
    # Only a file the inbox lists: a name is never joined to a path it came in with.
    found = {path.name: path for path in _files(_inbox(request))}.get(file)
    mails = _read(found) if found else []
    if index >= len(mails):
        raise Http404("no such email")
    mail = mails[index]
    body = mail.message.get_body(preferencelist=("plain", "html"))
    text = body.get_content() if body is not None else ""
    return render(request, "notifications/devmail_message.html", {"mail": mail, "body": _linked(str(text))})
