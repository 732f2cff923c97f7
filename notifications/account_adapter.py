"""django-allauth's emails (confirm your address, reset your password) go through the outbox like every email.

allauth renders and sends a message inside the request that asks for it. Here the message is
rendered in the request (its link is made there) and stored; the `default` queue sends it after
commit, at most once, retried while the mail server is down (notifications.services.send_email).
Configured by ACCOUNT_ADAPTER.
"""

from typing import Any

from allauth.account.adapter import DefaultAccountAdapter
from django.contrib.sites.shortcuts import get_current_site
from django.core.mail import EmailMultiAlternatives

from . import services


class AccountAdapter(DefaultAccountAdapter):
    def send_mail(self, template_prefix: str, email: str, context: dict[str, Any]) -> None:
        request = self.request
        message = self.render_mail(
            template_prefix,
            email,
            {"request": request, "email": email, "current_site": get_current_site(request), **context},
        )
        html = ""
        if isinstance(message, EmailMultiAlternatives):
            html = next((str(content) for content, mimetype in message.alternatives if mimetype == "text/html"), "")
        body_text = str(message.body) if message.content_subtype != "html" else ""
        body_html = str(message.body) if message.content_subtype == "html" else html
        services.queue_email(
            kind=template_prefix, to=email, subject=str(message.subject), body_text=body_text, body_html=body_html
        )
