"""Access control, tried the way an attacker would.

Object pages and API operations are listed from the URL resolver and the OpenAPI schema, so
a new one is tested as soon as it exists: one whose id kind has no factory here fails the
suite until it gets one.
"""

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
import requests
from django.conf import settings
from django.contrib import admin
from django.core.files.base import ContentFile
from django.test import Client, override_settings
from django.urls import URLPattern, URLResolver, get_resolver

from accounts.services import issue_api_token
from config.api import api
from orders.models import Order
from payments.models import Subscription, WebhookEvent
from reports.models import Report
from tests.factories import (
    AddressFactory,
    ApiTokenFactory,
    OrderFactory,
    PaymentMethodFactory,
    ReportFactory,
    SubscriptionFactory,
    UserFactory,
)
from tests.stack import REPO_ROOT, free_port, wait_for

pytestmark = pytest.mark.django_db

PASSWORD = "correct-horse-battery"  # noqa: S105 (tests.factories.UserFactory's password)
PARAMETER = re.compile(r"<(?:\w+:)?(\w+)>")
# Namespaces covered by their own tests: the API through its schema, the admin as staff-only (below), the
# development inbox, a 404 unless DEBUG is on (tests/notifications/test_devmail.py).
OWN_TESTS = ("api", "admin", "devmail")


@pytest.fixture(autouse=True)
def private_media(settings, tmp_path):
    """Report files go to this test's own directory."""
    settings.MEDIA_ROOT = tmp_path / "media"


def make_order(owner) -> Order:
    return OrderFactory(owner=owner, status=Order.Status.CONFIRMED)


def make_subscription(owner) -> Subscription:
    return SubscriptionFactory(owner=owner, plan__code="access-basic", plan__name="Basic", plan__price="5.00")


def make_report(owner) -> Report:
    report = ReportFactory(owner=owner, status=Report.Status.DONE, progress=100)
    report.file.save(f"access-{report.pk}.csv", ContentFile(b"sku,quantity\r\n"), save=True)
    return report


# URL parameter -> a factory for an object of that kind owned by the given user.
OBJECT_FACTORIES: dict[str, Callable] = {
    "order_id": make_order,
    "subscription_id": make_subscription,
    "report_id": make_report,
    "address_id": lambda owner: AddressFactory(owner=owner),
    "payment_method_id": lambda owner: PaymentMethodFactory(owner=owner),
    "token_id": lambda owner: ApiTokenFactory(user=owner),
}


def url_patterns(patterns=None, prefix: str = "", namespace: str = "") -> Iterator[tuple[str, str, URLPattern]]:
    """(route, namespace, pattern) for every URL the site serves."""
    for entry in get_resolver().url_patterns if patterns is None else patterns:
        if isinstance(entry, URLResolver):
            inner = ":".join(filter(None, [namespace, entry.namespace or ""]))
            yield from url_patterns(entry.url_patterns, prefix + str(entry.pattern), inner)
        else:
            yield prefix + str(entry.pattern), namespace, entry


def page_routes() -> list[str]:
    """Every page but the API's and the admin's, and but allauth's links that carry a one-time key (tested below)."""
    return [
        route
        for route, namespace, _ in url_patterns()
        if namespace.split(":")[0] not in OWN_TESTS and "(?P<" not in route
    ]


def key_link_routes() -> list[str]:
    """allauth's pages reached by an emailed link: its key, not an object id, says whose it is."""
    return [
        route for route, namespace, _ in url_patterns() if namespace.split(":")[0] not in OWN_TESTS and "(?P<" in route
    ]


def object_page_routes() -> list[str]:
    return [route for route in page_routes() if PARAMETER.search(route)]


def api_operations() -> list[tuple[str, str]]:
    schema = api.get_openapi_schema()
    return [(method.upper(), path) for path, operations in schema["paths"].items() for method in operations]


def fill(route: str, objects: dict[str, object]) -> str:
    return "/" + PARAMETER.sub(lambda match: str(objects[match.group(1)].pk), route)


def fill_api(path: str, objects: dict[str, object]) -> str:
    return re.sub(r"\{(\w+)\}", lambda match: str(objects[match.group(1)].pk), path)


def parameters(route: str) -> list[str]:
    return PARAMETER.findall(route) + re.findall(r"\{(\w+)\}", route)


def signed_in(user, **kwargs) -> Client:
    client = Client(**kwargs)
    client.force_login(user)
    return client


def bearer(user) -> Client:
    client = Client()
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {issue_api_token(user=user)}"
    return client


def objects_of(owner, route: str) -> dict[str, object]:
    missing = [name for name in parameters(route) if name not in OBJECT_FACTORIES]
    assert not missing, f"{route}: no factory for {missing}; add one to OBJECT_FACTORIES"
    return {name: OBJECT_FACTORIES[name](owner) for name in parameters(route)}


def test_the_lists_find_the_object_pages_and_operations():
    assert {"orders/<int:order_id>/", "reports/<int:report_id>/download/"} <= set(object_page_routes())
    assert ("GET", "/api/orders/{order_id}/") in api_operations()
    assert len(key_link_routes()) == len(KEY_LINKS) == 2


# allauth's emailed links with a key no one was sent: nothing changes, no 5xx.
KEY_LINKS = ["/accounts/confirm-email/{key}/", "/accounts/password/reset/key/{uid}-{key}/"]


@pytest.mark.parametrize("link", KEY_LINKS)
@pytest.mark.parametrize("key", ["nonsense", "Mg:1tQ4Vz:" + "A" * 43, "0" * 300, "%00", "..%2F..%2Fetc"])
def test_an_emailed_link_with_a_key_no_one_was_sent_changes_nothing(link, key):
    from allauth.account.models import EmailAddress

    user = UserFactory(email_confirmed=False)
    password = user.password
    url = link.format(key=key, uid="1")
    for client in (Client(), signed_in(UserFactory())):
        for method in ("get", "post"):
            response = getattr(client, method)(url, {"password1": "n3w-Passw0rd!x", "password2": "n3w-Passw0rd!x"})
            assert response.status_code < 500, (url, method, response.status_code)
    user.refresh_from_db()
    assert user.password == password
    assert not EmailAddress.objects.filter(user=user, verified=True).exists()


# --- Another user's id: 404 -----------------------------------------------------------------------


@pytest.mark.parametrize("route", object_page_routes(), ids="/{}".format)
def test_object_page_with_another_users_id_is_404(route):
    shopper, owner = UserFactory(), UserFactory()
    objects = objects_of(owner, route)
    url = fill(route, objects)
    client = signed_in(shopper)
    statuses = {method: getattr(client, method)(url).status_code for method in ("get", "post")}
    # A view that serves only one method answers the other with 405, which says nothing of the object.
    assert set(statuses.values()) <= {404, 405} and 404 in statuses.values(), (url, statuses)
    for obj in objects.values():
        before = getattr(obj, "status", None)
        obj.refresh_from_db()  # raises if it was deleted
        assert getattr(obj, "status", None) == before, f"{url} changed another user's {obj}"
    # The owner gets past the lookup, so the 404 above is about ownership.
    owner_statuses = {method: getattr(signed_in(owner), method)(url).status_code for method in ("get", "post")}
    assert set(owner_statuses.values()) - {404, 405}, (url, owner_statuses)


# A valid body for an operation that has one: its schema is checked before the object is looked up, so
# without one the answer would be a 415 or 422 (which say nothing of the object either) instead of the 404.
VALID_BODIES: dict[tuple[str, str], dict] = {
    ("POST", "/api/orders/{order_id}/refunds/"): {},  # all that is left
}


def call_api(client: Client, method: str, path: str, url: str):
    if (method, path) in VALID_BODIES:
        return client.generic(method, url, json.dumps(VALID_BODIES[method, path]), content_type="application/json")
    return client.generic(method, url)


@pytest.mark.parametrize("method,path", [(method, path) for method, path in api_operations() if "{" in path], ids=str)
def test_api_operation_with_another_users_id_is_404(method, path):
    shopper, owner = UserFactory(), UserFactory()
    objects = objects_of(owner, path)
    url = fill_api(path, objects)
    response = call_api(bearer(shopper), method, path, url)
    assert response.status_code == 404, (url, response.status_code, response.content[:200])
    assert response.json() == {"detail": "not found"}
    for obj in objects.values():
        before = getattr(obj, "status", None), getattr(obj, "removed_at", None)
        obj.refresh_from_db()  # raises if it was deleted
        after = getattr(obj, "status", None), getattr(obj, "removed_at", None)
        assert after == before, f"{method} {url} changed another user's {obj}"
    assert call_api(bearer(owner), method, path, url).status_code != 404


# --- Staff-only pages ---------------------------------------------------------------------------


def admin_pages() -> list[str]:
    pages = ["/admin/"]
    for model in admin.site._registry:
        pages.append(f"/admin/{model._meta.app_label}/{model._meta.model_name}/")
    return pages


@pytest.mark.parametrize("path", admin_pages())
def test_staff_pages_refuse_shoppers(path):
    response = signed_in(UserFactory()).get(path)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/?next=")


def test_staff_pages_open_for_staff():
    staff = UserFactory(is_staff=True, is_superuser=True)
    assert signed_in(staff).get("/admin/ops/failedtask/").status_code == 200


def test_admin_sign_in_refuses_a_shopper():
    shopper = UserFactory()
    client = Client()
    response = client.post("/admin/login/?next=/admin/", {"username": shopper.username, "password": PASSWORD})
    assert response.status_code == 200  # the form again, with its error
    assert client.get("/admin/").status_code == 302


# --- CSRF -----------------------------------------------------------------------------------------

# Views that accept a POST without a CSRF token, and what authenticates them instead.
CSRF_EXEMPT = {"payments/webhooks/provider/": "the provider's HMAC signature (Sandbox-Signature)"}


@pytest.mark.parametrize("route", page_routes(), ids="/{}".format)
def test_every_page_refuses_a_post_without_csrf_token(route):
    user = UserFactory()
    url = fill(route, objects_of(user, route))
    response = signed_in(user, enforce_csrf_checks=True).post(url, {"anything": "1"})
    if route in CSRF_EXEMPT:
        assert response.status_code != 403
    else:
        assert response.status_code == 403, (url, response.status_code)


@pytest.mark.parametrize(
    "path", ["/accounts/login/", "/admin/login/", "/admin/ops/failedtask/", "/admin/logout/", "/accounts/logout/"]
)
def test_sign_in_and_admin_forms_refuse_a_post_without_csrf_token(path):
    staff = UserFactory(is_staff=True, is_superuser=True)
    client = signed_in(staff, enforce_csrf_checks=True) if "login" not in path else Client(enforce_csrf_checks=True)
    response = client.post(path, {"username": staff.username, "password": PASSWORD, "action": "requeue_selected"})
    assert response.status_code == 403


@pytest.mark.parametrize(
    "method,path",
    [(method, path) for method, path in api_operations() if method not in ("GET", "HEAD", "OPTIONS")],
    ids=str,
)
def test_api_refuses_unsafe_session_requests_without_csrf_token(method, path):
    user = UserFactory()
    url = fill_api(path, objects_of(user, path))
    response = signed_in(user, enforce_csrf_checks=True).generic(method, url, "{}", content_type="application/json")
    assert response.status_code == 403, (url, response.status_code)
    assert response.json()["detail"][0]["loc"] == ["header", "X-CSRFToken"]


def test_csrf_exempt_views_are_only_the_listed_ones():
    exempt = {
        route
        for route, namespace, pattern in url_patterns()
        if namespace.split(":")[0] not in OWN_TESTS and getattr(pattern.callback, "csrf_exempt", False)
    }
    assert exempt == set(CSRF_EXEMPT)


# --- Login throttling (django-axes) -----------------------------------------------------------------


def test_login_is_locked_after_five_failures_even_with_the_right_password():
    user = UserFactory()
    client = Client()
    for attempt in range(1, 6):
        response = client.post("/accounts/login/", {"login": user.username, "password": "wrong"})
        # The form again, until the fifth failure locks the pair out.
        assert response.status_code == (429 if attempt == 5 else 200)
    response = client.post("/accounts/login/", {"login": user.username, "password": PASSWORD})
    assert response.status_code == 429
    assert "_auth_user_id" not in client.session
    # The admin's sign-in shares the lock.
    assert client.post("/admin/login/", {"username": user.username, "password": PASSWORD}).status_code == 429


def test_login_lock_is_per_username_and_address():
    user, other = UserFactory(), UserFactory()
    for _ in range(5):
        Client().post("/accounts/login/", {"login": user.username, "password": "wrong"})
    elsewhere = Client(REMOTE_ADDR="203.0.113.9")
    assert elsewhere.post("/accounts/login/", {"login": user.username, "password": PASSWORD}).status_code == 302
    assert Client().post("/accounts/login/", {"login": other.username, "password": PASSWORD}).status_code == 302


def test_a_successful_login_resets_the_count():
    user = UserFactory()
    client = Client()
    for _ in range(4):
        client.post("/accounts/login/", {"login": user.username, "password": "wrong"})
    assert client.post("/accounts/login/", {"login": user.username, "password": PASSWORD}).status_code == 302
    client.post("/accounts/logout/")
    for _ in range(4):
        client.post("/accounts/login/", {"login": user.username, "password": "wrong"})
    assert client.post("/accounts/login/", {"login": user.username, "password": PASSWORD}).status_code == 302


# --- Credentials on /metrics, the webhook -----------------------------------------------------------


@override_settings(METRICS_TOKEN="access-metrics-token")  # noqa: S106
def test_metrics_refuse_requests_without_the_token(client):
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer access-metrics-token").status_code == 200


def test_webhook_refuses_an_unsigned_body(client):
    # The signature rules in full: tests/payments/test_webhooks.py.
    body = '{"id": "evt_unsigned", "type": "charge.succeeded", "data": {}}'
    response = client.post("/payments/webhooks/provider/", body, content_type="application/json")
    assert response.status_code == 400
    assert not WebhookEvent.objects.exists()


# --- Flower --------------------------------------------------------------------------------------------


@pytest.fixture
def flower(tmp_path) -> Iterator[str]:
    """The Procfile's Flower on a free port, with FLOWER_BASIC_AUTH set as docker-compose.yml's .env does."""
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.base",
        "DEBUG": "false",
        "SECRET_KEY": "flower-test-only-" + "f" * 60,
        "WEBHOOK_SECRET": settings.WEBHOOK_SECRET,
        "REDIS_URL": settings.CELERY_BROKER_URL,
        "FLOWER_BASIC_AUTH": "operator:flower-test-pass",
    }
    log_path = tmp_path / "flower.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "config", "flower", "--address=127.0.0.1", f"--port={port}"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert process.poll() is None, log_path.read_text()
        try:
            return requests.get(url, timeout=1).status_code > 0
        except requests.ConnectionError:
            return False

    try:
        wait_for(answers, 30, "Flower to answer")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.mark.process
def test_flower_refuses_requests_without_its_credentials(flower):
    for path in ("/", "/workers", "/api/workers"):
        assert requests.get(flower + path, timeout=10).status_code == 401, path
        assert requests.get(flower + path, auth=("operator", "wrong"), timeout=10).status_code == 401, path
    assert requests.get(flower + "/", auth=("operator", "flower-test-pass"), timeout=10).status_code == 200
