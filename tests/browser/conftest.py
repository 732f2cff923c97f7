"""Browser tests: Debian's chromium, driven by playwright, against the real stack.

Once for this folder: collectstatic into a temporary STATIC_ROOT, then the Procfile's web
(gunicorn, DEBUG off) and a worker per queue, on the pytest database, the test Redis
database and the session's sandbox provider. Tests commit their rows
(`django_db(transaction=True)`) so those processes see them. Everything stops when the
folder's last test ends, so these workers never take the tasks of later tests.

A failing test saves a screenshot under test-artifacts/ (its path is printed in the
report) and shows the tail of each process's log.
"""

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.db import connection
from playwright.sync_api import Browser, Page, sync_playwright

from tests.e2e.conftest import database_url
from tests.factories import UserFactory
from tests.stack import REPO_ROOT, Processes

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO_ROOT / "test-artifacts"
PASSWORD = "correct-horse-battery"  # noqa: S105
STACK = pytest.StashKey["LiveStack"]()


# The phone and desktop sizes every shopper page is checked at (tests/browser/test_phone.py).
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}
TOUCH_TARGET = 44
# What a finger can hit in the page's content and its top bar, shown (hidden fields and closed sections left out).
TARGETS_TOO_SMALL = """(minimum) => Array.from(document.querySelectorAll(
    "header a, header button, main a, main button, main input, main select, main textarea"))
  .filter((el) => el.getClientRects().length > 0 && getComputedStyle(el).visibility !== "hidden")
  .map((el) => ({ html: el.outerHTML.slice(0, 120), height: el.getBoundingClientRect().height }))
  .filter((target) => target.height < minimum - 0.5)"""

# Table cells shown without their column's name on the phone.
CELLS_WITHOUT_LABEL = """() => Array.from(document.querySelectorAll("main table td"))
  .filter((td) => td.getClientRects().length > 0 && !td.classList.contains("empty"))
  .filter((td) => {
    const label = getComputedStyle(td, "::before");
    const shown = label.display !== "none" && label.content === '"' + td.dataset.label + '"';
    return !td.dataset.label || !shown;
  })
  .map((td) => td.outerHTML.slice(0, 120))"""


@dataclass
class LiveStack:
    url: str
    emails: Path
    processes: Processes

    def logs(self) -> str:
        return self.processes.logs()


@pytest.fixture(scope="package")
def live_stack(request, django_db_setup, django_db_blocker, payment_provider, tmp_path_factory) -> Iterator[LiveStack]:
    directory = tmp_path_factory.mktemp("browser-stack")
    with django_db_blocker.unblock():
        db_url = database_url(connection.settings_dict)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.base",
        "DEBUG": "false",
        "SECRET_KEY": "browser-tests-only-" + "b" * 60,
        "WEBHOOK_SECRET": settings.WEBHOOK_SECRET,
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        # Plain http here: cookies marked Secure would never come back.
        "SECURE_COOKIES": "false",
        "SECURE_SSL_REDIRECT": "false",
        "DATABASE_URL": db_url,
        "REDIS_URL": settings.CELERY_BROKER_URL,
        "PAYMENT_PROVIDER_URL": payment_provider.url,
        "FULFILLMENT_API_URL": payment_provider.url,
        "STATIC_ROOT": str(directory / "static"),
        # Web serves the files the bulk worker writes.
        "MEDIA_ROOT": str(directory / "media"),
        "VAR_DIR": str(directory / "var"),
        "PROMETHEUS_MULTIPROC_DIR": str(directory / "metrics"),
        "CELERY_METRICS_PORT": "0",
        "PYTHONUNBUFFERED": "1",
        # Emails are files in <VAR_DIR>/emails that a test reads as a person reads their inbox (live_stack.emails).
        "EMAIL_URL": "filemail://",
        "ACCOUNT_DEFAULT_HTTP_PROTOCOL": "http",
    }
    (directory / "metrics").mkdir()
    collect = subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert collect.returncode == 0, collect.stderr
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    broker.flushdb()
    processes = Processes(directory)
    try:
        url = processes.web(env, workers=2)
        processes.workers(env, {"critical": 2, "bulk": 1, "default": 1}, suffix="-browser")
        stack = LiveStack(url=url, processes=processes, emails=directory / "var" / "emails")
        request.config.stash[STACK] = stack
        yield stack
    finally:
        processes.stop_all()
        broker.flushdb()
        broker.close()


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    # Playwright's sync API keeps its event loop running on this thread while it is open, and
    # Django refuses ORM calls when a loop runs; the tests' ORM calls are plain synchronous ones.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            yield browser
            browser.close()
    finally:
        if previous is None:
            del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@contextmanager
def open_page(browser: Browser, live_stack: LiveStack, **context_options: Any) -> Iterator[Page]:
    """A page in a fresh browser context (no cookies) on the live stack; refused by the Content-Security-Policy
    is a failure."""
    context = browser.new_context(base_url=live_stack.url, **context_options)
    context.set_default_timeout(15_000)
    page = context.new_page()
    page.console_errors = []
    page.on("console", lambda message: message.type == "error" and page.console_errors.append(message.text))
    page.on("pageerror", lambda error: page.console_errors.append(str(error)))
    yield page
    errors = list(page.console_errors)
    context.close()
    assert not [error for error in errors if "Content Security Policy" in error], errors


@pytest.fixture
def page(browser, live_stack) -> Iterator[Page]:
    with open_page(browser, live_stack, accept_downloads=True) as page:
        yield page


def make_user(**fields):
    """A user whose password the web process can check: it runs the production hashers, not the tests' MD5.

    Few iterations, so signing in is fast; the web process upgrades the hash on the first sign-in.
    """
    user = UserFactory(**fields)
    hasher = PBKDF2PasswordHasher()
    user.password = hasher.encode(PASSWORD, hasher.salt(), iterations=1000)
    user.save(update_fields=["password"])
    return user


def sign_in(page: Page, user, password: str = PASSWORD) -> None:
    page.goto("/accounts/login/")
    page.get_by_label("Username or email").fill(user.username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.get_by_role("button", name=f"Sign out ({user.username})").wait_for()


def check_on_phone_and_desktop(page: Page, name: str) -> None:
    """The page as it is now: usable at 390 px (asserted), and screenshots at 390 px and 1280 px."""
    page.set_viewport_size(PHONE)
    page.wait_for_load_state("load")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"phone-{name}.png"), full_page=True)
    sideways = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert sideways[0] <= sideways[1], f"{name}: the page scrolls sideways at 390 px ({sideways})"
    assert page.evaluate(CELLS_WITHOUT_LABEL) == [], f"{name}: table cells without a visible label"
    assert page.evaluate(TARGETS_TOO_SMALL, TOUCH_TARGET) == [], f"{name}: touch targets under 44 px"
    page.set_viewport_size(DESKTOP)
    page.screenshot(path=str(ARTIFACTS / f"desktop-{name}.png"), full_page=True)
    page.set_viewport_size(PHONE)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and report.when == "call":
        page = item.funcargs.get("page")
        if page is not None and not page.is_closed():
            ARTIFACTS.mkdir(exist_ok=True)
            path = ARTIFACTS / (re.sub(r"[^\w.-]+", "_", item.nodeid).strip("_") + ".png")
            try:
                page.screenshot(path=str(path), full_page=True)
                where = f"screenshot saved to {path} (page {page.url})"
            except Exception as exc:  # noqa: BLE001 (the test's own failure is the one to report)
                where = f"screenshot failed: {exc!r}"
            report.sections.append(("browser screenshot", where))
            print(f"\n{item.nodeid}: {where}", file=sys.stderr)
        stack = item.config.stash.get(STACK, None)
        if stack is not None:
            report.sections.append(("live stack logs", stack.logs()))
    return report
