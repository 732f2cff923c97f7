"""A new shopper in chromium: signs up, confirms by the emailed link, signs in; resets a forgotten password by email.

The live stack writes its emails to files (EMAIL_URL=filemail://, `live_stack.emails`); the test reads
the link from them as a person reads their inbox. At 390 px and 1280 px, with the phone checks.
"""

import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import check_on_phone_and_desktop, make_user

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "Saffron-tiger-88"  # noqa: S105 (passes the password validators)
LINK = re.compile(r"https?://[^/\s]+(/accounts/[^\s]+/)")


def emailed_link(directory: Path, to: str, timeout: float = 30) -> str:
    """The path of the /accounts/ link in the newest email to `to` (written by the default worker after commit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in sorted(directory.glob("*.log"), key=lambda p: p.stat().st_mtime, reverse=True):
            text = path.read_text(errors="replace")
            if f"To: {to}" in text and (match := LINK.search(text.replace("=\n", ""))):
                return match.group(1)
        time.sleep(0.2)
    raise AssertionError(f"no email with a link to {to} within {timeout}s in {directory}")


def test_sign_up_confirm_by_the_emailed_link_and_sign_in(page: Page, live_stack):
    page.goto("/")
    page.get_by_role("link", name="Create account").click()
    check_on_phone_and_desktop(page, "sign-up")
    page.get_by_label("Email").fill("new.shopper@example.com")
    page.get_by_label("Username").fill("newshopper")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password (again)").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    expect(page.get_by_role("heading", name="Verify Your Email Address")).to_be_visible()
    check_on_phone_and_desktop(page, "sign-up-check-your-email")

    # Not signed in until the address is confirmed.
    page.goto("/orders/")
    expect(page).to_have_url(re.compile(r"/accounts/login/"))

    page.goto(emailed_link(live_stack.emails, "new.shopper@example.com"))
    check_on_phone_and_desktop(page, "confirm-email")
    page.get_by_role("button", name="Confirm").click()
    expect(page.get_by_role("button", name="Sign out (newshopper)")).to_be_visible()

    page.get_by_role("button", name="Sign out (newshopper)").click()
    expect(page.get_by_role("link", name="Sign in")).to_be_visible()
    page.goto("/accounts/login/")
    page.get_by_label("Username or email").fill("new.shopper@example.com")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("button", name="Sign out (newshopper)")).to_be_visible()


def test_a_forgotten_password_is_reset_by_the_emailed_link(page: Page, live_stack):
    shopper = make_user(email="forgetful@example.com")
    page.goto("/accounts/login/")
    page.get_by_role("link", name="Forgot your password?").click()
    check_on_phone_and_desktop(page, "password-reset")
    page.get_by_label("Email").fill("forgetful@example.com")
    page.get_by_role("button", name="Reset My Password").click()
    expect(page.get_by_text("We have sent you an email")).to_be_visible()

    page.goto(emailed_link(live_stack.emails, "forgetful@example.com"))
    check_on_phone_and_desktop(page, "password-reset-new-password")
    page.get_by_label(re.compile(r"^New Password:?$")).fill(PASSWORD)
    page.get_by_label(re.compile(r"^New Password \(again\):?$")).fill(PASSWORD)
    page.get_by_role("button", name="Change Password").click()
    expect(page.get_by_text("Your password is now changed")).to_be_visible()

    page.goto("/accounts/login/")
    page.get_by_label("Username or email").fill(shopper.username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("button", name=f"Sign out ({shopper.username})")).to_be_visible()
