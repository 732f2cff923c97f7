"""`cp .env.example .env && docker compose up`, for real: every check is made from outside, as a user would.

The stack is started once (conftest.py); the tests run in this file's order and the last one
takes it down and stops the engine.
"""

import json
import socket
import time
import uuid

import pytest
import requests

from tests.stack import wait_for

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

APP_SERVICES = {"web", "worker-critical", "worker-bulk", "worker-default", "beat", "flower", "sandbox"}
QUEUES = {"critical", "bulk", "default"}
DEMO_SHOPPER = ("demo", "demo@example.com")
# What a TLS-terminating proxy adds to each request it passes on (SECURE_PROXY_SSL_HEADER).
THROUGH_TLS_PROXY = {"X-Forwarded-Proto": "https"}


@pytest.fixture(scope="module")
def token(stack) -> str:
    """An API token for the demo shopper, issued the README's way inside the web container."""
    result = stack.compose("exec", "-T", "web", "python", "manage.py", "issue_api_token", DEMO_SHOPPER[0])
    return result.stdout.strip().splitlines()[-1]


def place_order(stack, token: str, sku: str, *, headers: dict | None = None) -> dict:
    response = requests.post(
        f"{stack.url('web')}/api/orders/",
        json={"items": [{"sku": sku, "quantity": 1}]},
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": uuid.uuid4().hex, **(headers or {})},
        timeout=15,
    )
    assert response.status_code == 201, response.text
    return response.json()


def order_statuses(stack, token: str, ids: list[int], *, headers: dict | None = None) -> dict[int, str]:
    response = requests.get(
        f"{stack.url('web')}/api/orders/", headers={"Authorization": f"Bearer {token}", **(headers or {})}, timeout=15
    )
    response.raise_for_status()
    return {order["id"]: order["status"] for order in response.json()["items"] if order["id"] in ids}


def poll(condition, timeout: float):
    """condition()'s first truthy value within `timeout` seconds, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(1)
    return None


def wait_fulfilled(stack, token: str, ids: list[int], timeout: float, *, headers: dict | None = None) -> None:
    if not poll(lambda: set(order_statuses(stack, token, ids, headers=headers).values()) == {"fulfilled"}, timeout):
        statuses = order_statuses(stack, token, ids, headers=headers)
        pytest.fail(f"orders not fulfilled: {statuses}\n{stack.diagnostics()}")


def ledger(stack) -> dict:
    return requests.get(f"{stack.url('sandbox')}/v1/ledger/summary", timeout=10).json()


def test_the_app_image_is_built_once_and_shared(stack):
    config = json.loads(stack.compose("config", "--format", "json").stdout)
    built = {name for name, service in config["services"].items() if service.get("build")}
    assert built == {"migrate"}
    image_id = stack.engine.docker_cli("image", "inspect", "--format", "{{.Id}}", "shop:latest").stdout.strip()
    for service in APP_SERVICES:
        container = stack.compose("ps", "--quiet", service).stdout.strip()
        assert stack.engine.docker_cli("inspect", "--format", "{{.Image}}", container).stdout.strip() == image_id


def test_every_long_running_service_is_healthy_and_migrate_completed(stack):
    services = [json.loads(line) for line in stack.compose("ps", "--all", "--format", "json").stdout.splitlines()]
    states = {service["Service"]: (service["State"], service["Health"], service["ExitCode"]) for service in services}
    assert states.pop("migrate") == ("exited", "", 0)
    assert set(states) == APP_SERVICES | {"db", "redis", "mailpit", "prometheus", "grafana"}
    unhealthy = {name: state for name, state in states.items() if state[:2] != ("running", "healthy")}
    assert not unhealthy, unhealthy


def test_readyz_answers_over_http_from_outside(stack):
    response = requests.get(f"{stack.url('web')}/readyz", timeout=10)
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "broker": "ok"}
    # Plain http out of the box: a browser on http://localhost is not sent to https.
    assert requests.get(f"{stack.url('web')}/accounts/login/", allow_redirects=False, timeout=10).status_code == 200


def test_an_order_placed_over_http_with_an_api_token_is_fulfilled_and_its_webhook_delivered(stack, token):
    order = place_order(stack, token, "MUG-001")

    wait_fulfilled(stack, token, [order["id"]], timeout=90)
    # The provider's webhook reached web over the internal network.
    webhooks = wait_for(
        lambda: (hooks := ledger(stack)["webhooks"]["by_status"])["delivered"] >= 1 and hooks, 60, "the webhook"
    )
    assert webhooks["failed"] == 0


def test_the_shopper_gets_email_in_the_mail_catcher(stack):
    def messages_to_shopper() -> list[dict]:
        body = requests.get(f"{stack.url('mailpit')}/api/v1/messages", timeout=10).json()
        return [m for m in body["messages"] if DEMO_SHOPPER[1] in {to["Address"] for to in m["To"]}]

    messages = wait_for(messages_to_shopper, 60, "an email to the demo shopper", interval=1)
    assert all(message["Subject"] for message in messages)


def test_flower_behind_basic_auth_lists_the_three_queues(stack):
    base = stack.url("flower")
    auth = (stack.dotenv["FLOWER_USER"], stack.dotenv["FLOWER_PASSWORD"])
    assert requests.get(f"{base}/api/queues/length", timeout=10).status_code == 401

    def queues() -> set[str]:
        # Flower asks the workers for their queues when it starts, and again on a refresh of its
        # workers view (the dashboard's Refresh): a worker that was still starting is known after one.
        requests.get(f"{base}/api/workers", params={"refresh": 1}, auth=auth, timeout=15)
        response = requests.get(f"{base}/api/queues/length", auth=auth, timeout=15)
        return {queue["name"] for queue in response.json()["active_queues"]} if response.ok else set()

    wait_for(lambda: queues() >= QUEUES, 60, "Flower to list the three queues", interval=1)


def test_prometheus_scrapes_every_target_and_loads_the_alert_rules(stack):
    base = stack.url("prometheus")

    def targets() -> list[dict]:
        return requests.get(f"{base}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]

    def all_up() -> bool:
        found = targets()
        return len(found) == 5 and all(target["health"] == "up" for target in found)

    if not poll(all_up, 90):
        pytest.fail(json.dumps([(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets()], indent=1))
    assert {target["labels"]["job"] for target in targets()} == {"web", "celery-worker", "flower"}
    groups = requests.get(f"{base}/api/v1/rules", timeout=10).json()["data"]["groups"]
    alerts = {rule["name"] for group in groups for rule in group["rules"] if rule["type"] == "alerting"}
    assert {"CeleryWorkerDown", "MetricsEndpointDown", "CeleryQueueDepthHigh"} <= alerts


def test_grafana_answers_with_the_provisioned_datasource_and_dashboard(stack):
    base = stack.url("grafana")
    assert requests.get(f"{base}/api/health", timeout=10).json()["database"] == "ok"
    admin = ("admin", stack.dotenv["GRAFANA_ADMIN_PASSWORD"])
    health = requests.get(f"{base}/api/datasources/uid/prometheus/health", auth=admin, timeout=15)
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "OK"
    titles = {board["title"] for board in requests.get(f"{base}/api/search", auth=admin, timeout=10).json()}
    assert "Shop: tasks and queues" in titles


def test_restarting_worker_critical_mid_run_loses_nothing(stack, token):
    faults = f"{stack.url('sandbox')}/v1/faults"
    shipped_before = ledger(stack)["shipments"]["total"]
    # Given provider calls slowed down (the README's fault injection, on the published port), so
    # orders are still in flight when the worker restarts
    requests.put(faults, json={"latency_ms": 300}, timeout=10).raise_for_status()
    try:
        ids = [place_order(stack, token, "NB-001")["id"] for _ in range(12)]
        in_flight = [status for status in order_statuses(stack, token, ids).values() if status != "fulfilled"]

        # When
        stack.compose("restart", "worker-critical", timeout=420)
    finally:
        requests.put(faults, json={"latency_ms": 0}, timeout=10).raise_for_status()

    # Then every order is fulfilled, each charged and shipped once
    assert in_flight, "every order was done before the restart: it proves nothing"
    wait_fulfilled(stack, token, ids, timeout=180)
    summary = ledger(stack)
    assert summary["charges"]["references_charged_more_than_once"] == []
    assert summary["shipments"]["orders_shipped_more_than_once"] == []
    assert summary["shipments"]["total"] == shipped_before + len(ids)


def test_the_tls_switch_sends_browsers_to_https_and_keeps_calls_between_services_on_http(stack, token):
    # Given the documented switch for production behind a TLS proxy, web recreated with it
    stack.set_env(SECURE_SSL_REDIRECT="true", SECURE_COOKIES="true")
    stack.compose("up", "--detach", "--wait", "--wait-timeout", "180", "web", timeout=300)
    web = stack.url("web")
    delivered_before = ledger(stack)["webhooks"]["by_status"]["delivered"]

    # Then http is redirected, probes are not, and an order through the proxy is fulfilled with
    # its webhook delivered over plain http between the containers
    redirect = requests.get(f"{web}/accounts/login/", allow_redirects=False, timeout=10)
    assert redirect.status_code == 301 and redirect.headers["Location"].startswith("https://")
    assert requests.get(f"{web}/readyz", allow_redirects=False, timeout=10).status_code == 200
    order = place_order(stack, token, "MUG-001", headers=THROUGH_TLS_PROXY)
    wait_fulfilled(stack, token, [order["id"]], timeout=90, headers=THROUGH_TLS_PROXY)
    hooks = wait_for(
        lambda: (by := ledger(stack)["webhooks"]["by_status"])["delivered"] > delivered_before and by, 60, "webhook"
    )
    assert hooks["failed"] == 0


def test_down_leaves_no_container_network_volume_or_process_and_the_engine_stops(stack, engine, timer):
    with timer("docker compose down --volumes"):
        stack.compose("down", "--volumes", timeout=600)
    stack.down = True
    project = f"label=com.docker.compose.project={stack.env['COMPOSE_PROJECT_NAME']}"
    for kind in ("container", "network", "volume"):
        every = ["--all"] if kind == "container" else []
        listed = engine.docker_cli(kind, "ls", *every, "--quiet", "--filter", project)
        assert listed.stdout.split() == [], f"{kind}s left: {listed.stdout}"

    with timer("engine stop"):
        engine.stop()

    assert engine.process.poll() is not None
    assert engine.leftover_processes() == {}
    for service, port in stack.ports.items():
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"{service}'s port {port} still answers"
