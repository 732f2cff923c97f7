"""docker-compose.yml as Compose v2 resolves it, without an engine: the promises a user relies on.

`docker compose config` (the binary of tests/compose/requirements.txt) validates the file in a
copy of the working tree with `.env.example` as its `.env`. Running it for real, on a Docker
engine, is the compose tier (tests/compose, `make test-compose`).
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.test import override_settings

from config.beat import HEARTBEAT_SECONDS, HeartbeatScheduler
from tests.compose.checkout import copy_working_tree, read_dotenv
from tests.compose.engine import compose_binary
from tests.stack import REPO_ROOT

APP_SERVICES = {"migrate", "web", "worker-critical", "worker-bulk", "worker-default", "beat", "flower", "sandbox"}
IMAGES = {"db", "redis", "mailpit", "prometheus", "grafana"}
PUBLISHED = {
    "web": ("PUBLISH_PORT_WEB", 8000),
    "flower": ("PUBLISH_PORT_FLOWER", 5555),
    "sandbox": ("PUBLISH_PORT_SANDBOX", 8100),
    "mailpit": ("PUBLISH_PORT_MAILPIT", 8025),
    "prometheus": ("PUBLISH_PORT_PROMETHEUS", 9090),
    "grafana": ("PUBLISH_PORT_GRAFANA", 3000),
}
SECRETS = [
    "SECRET_KEY",
    "WEBHOOK_SECRET",
    "POSTGRES_PASSWORD",
    "METRICS_TOKEN",
    "FLOWER_PASSWORD",
    "GRAFANA_ADMIN_PASSWORD",
    "DEMO_PASSWORD",
    "DEMO_ADMIN_PASSWORD",
]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the working tree with .env.example as its .env: `cp .env.example .env`."""
    directory = tmp_path_factory.mktemp("checkout")
    copy_working_tree(directory)
    (directory / ".env").write_text((directory / ".env.example").read_text())
    return directory


def resolve(checkout: Path, **variables: str) -> dict:
    """`docker compose config` as JSON, with only `variables` in the shell's environment."""
    result = subprocess.run(
        [str(compose_binary()), "config", "--format", "json"],
        cwd=checkout,
        env={"PATH": os.environ["PATH"], "HOME": str(checkout), **variables},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def compose(checkout) -> dict:
    return resolve(checkout)


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_dotenv(REPO_ROOT / ".env.example")


def raw_services() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]


def procfile() -> dict[str, str]:
    lines = (REPO_ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip() and not line.startswith("#"))


def seconds(duration: str) -> int:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match, duration
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def test_compose_file_is_valid_and_has_every_service(compose):
    assert set(compose["services"]) == APP_SERVICES | IMAGES


def test_every_queue_in_the_routing_table_has_a_worker_service(compose):
    routed = {route["queue"] for route in settings.CELERY_TASK_ROUTES.values()} | {settings.CELERY_TASK_DEFAULT_QUEUE}
    consumed = set()
    for service in compose["services"].values():
        command = service.get("command") or []
        if "worker" in command and "-Q" in command:
            consumed |= set(command[command.index("-Q") + 1].split(","))
    assert routed <= consumed, f"no worker service for {routed - consumed}"


def test_compose_services_run_the_procfile_commands():
    services = raw_services()
    for name, command in procfile().items():
        assert services[name]["command"] == command, name


def test_every_long_running_service_has_a_healthcheck_and_restarts(compose):
    for name, service in compose["services"].items():
        if name == "migrate":
            assert service["restart"] == "no"
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert service.get("restart") == "unless-stopped", name


def test_workers_have_a_grace_period_longer_than_the_longest_soft_time_limit(compose):
    longest_soft_limit = max(soft for soft, _ in settings.TASK_TIME_LIMITS.values())
    for name in ("worker-critical", "worker-bulk", "worker-default"):
        assert seconds(compose["services"][name]["stop_grace_period"]) > longest_soft_limit, name


def test_application_services_start_after_the_database_the_broker_and_the_migrations(compose):
    for name in APP_SERVICES - {"migrate", "sandbox"}:
        depends_on = compose["services"][name]["depends_on"]
        assert depends_on["db"]["condition"] == "service_healthy", name
        assert depends_on["redis"]["condition"] == "service_healthy", name
        assert depends_on["migrate"]["condition"] == "service_completed_successfully", name
    redis_command = compose["services"]["redis"]["command"]
    assert "noeviction" in redis_command and "--appendonly" in redis_command


def test_the_app_image_is_built_by_one_service_and_shared_by_all(compose):
    services = compose["services"]
    assert {name for name, service in services.items() if service.get("build")} == {"migrate"}
    assert {services[name]["image"] for name in APP_SERVICES} == {"shop:latest"}


def test_each_secret_is_written_once(compose, env_example):
    # Each secret has one line in .env.example, with a value of its own ...
    values = [env_example[name] for name in SECRETS]
    assert len(set(values)) == len(values)
    for name in SECRETS:
        others = [value for key, value in env_example.items() if key != name]
        assert not any(env_example[name] in value for value in others), f"{name} is written twice"
    assert "DATABASE_URL" not in env_example and "FLOWER_BASIC_AUTH" not in env_example
    # ... and the compose file builds everything else from it.
    services = compose["services"]
    assert services["web"]["environment"]["DATABASE_URL"] == (
        f"postgres://shop:{env_example['POSTGRES_PASSWORD']}@db:5432/shop"
    )
    assert services["db"]["environment"]["POSTGRES_PASSWORD"] == env_example["POSTGRES_PASSWORD"]
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == (
        f"{env_example['FLOWER_USER']}:{env_example['FLOWER_PASSWORD']}"
    )
    assert services["prometheus"]["environment"]["FLOWER_USER"] == env_example["FLOWER_USER"]
    assert services["prometheus"]["environment"]["METRICS_TOKEN"] == env_example["METRICS_TOKEN"]
    raw = (REPO_ROOT / "docker-compose.yml").read_text()
    assert not any(env_example[name] in raw for name in SECRETS)


def test_out_of_the_box_the_stack_serves_plain_http_without_demo_data(env_example):
    assert env_example["SECURE_SSL_REDIRECT"] == "false"
    assert env_example["SECURE_COOKIES"] == "false"
    assert env_example["DEMO_DATA"] == "false"


def test_every_port_is_published_on_loopback_and_follows_its_variable(checkout, compose):
    for service, (_, port) in PUBLISHED.items():
        [published] = compose["services"][service]["ports"]
        assert (published["host_ip"], published["published"], published["target"]) == ("127.0.0.1", str(port), port)
    chosen = {variable: str(20000 + port) for variable, port in PUBLISHED.values()}
    moved = resolve(checkout, PUBLISH_ADDRESS="0.0.0.0", **chosen)
    for service, (variable, _) in PUBLISHED.items():
        [published] = moved["services"][service]["ports"]
        assert (published["host_ip"], published["published"]) == ("0.0.0.0", chosen[variable]), service


def run_migrate_command(compose: dict, tmp_path: Path, **env: str) -> tuple[int, list[str]]:
    """The migrate service's command under sh, with a `python` that only records what it was asked to run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    calls.write_text("")
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    (bin_dir / "python").chmod(0o755)
    command = [part.replace("$$", "$") for part in compose["services"]["migrate"]["command"]]
    result = subprocess.run(
        command, env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=30
    )
    return result.returncode, calls.read_text().splitlines()


def test_migrate_seeds_demo_data_only_when_asked_and_only_with_passwords_from_env(compose, tmp_path):
    assert run_migrate_command(compose, tmp_path, DEMO_DATA="false") == (0, ["manage.py migrate --noinput"])
    status, calls = run_migrate_command(compose, tmp_path, DEMO_DATA="true")
    assert status != 0 and "manage.py seed_demo" not in calls
    passwords = {"DEMO_PASSWORD": "shopper-pass", "DEMO_ADMIN_PASSWORD": "staff-pass"}
    assert run_migrate_command(compose, tmp_path, DEMO_DATA="true", **passwords) == (
        0,
        ["manage.py migrate --noinput", "manage.py seed_demo"],
    )


@pytest.mark.django_db
def test_calls_between_services_are_exempt_from_the_tls_redirect(compose, client):
    services = compose["services"]
    webhook = services["sandbox"]["environment"]["SHOP_WEBHOOK_URL"].removeprefix("http://web:8000")
    scrape = yaml.safe_load((REPO_ROOT / "monitoring" / "prometheus.yml").read_text())["scrape_configs"]
    metrics = next(job["metrics_path"] for job in scrape if job["job_name"] == "web")
    probe = re.search(r"http://127\.0\.0\.1:8000(/\w+)", " ".join(services["web"]["healthcheck"]["test"])).group(1)
    with override_settings(SECURE_SSL_REDIRECT=True):
        assert client.get("/accounts/login/").status_code == 301
        assert client.post(webhook, data=b"{}", content_type="application/json").status_code != 301
        assert client.get(metrics).status_code != 301
        assert client.get(probe).status_code != 301


def test_beat_healthcheck_wants_a_heartbeat_younger_than_a_minute(compose, tmp_path):
    kind, *argv = compose["services"]["beat"]["healthcheck"]["test"]
    assert kind == "CMD" and argv[0] == "python"
    heartbeat = tmp_path / "celerybeat-schedule.heartbeat"

    def healthy() -> bool:
        env = {**os.environ, "VAR_DIR": str(tmp_path)}
        return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30).returncode == 0

    assert not healthy()  # beat never ticked
    heartbeat.touch()
    assert healthy()
    os.utime(heartbeat, (time.time() - 90, time.time() - 90))
    assert not healthy()


def test_beat_touches_its_heartbeat_at_every_tick_and_ticks_often_enough(tmp_path):
    from celery import Celery

    schedule = tmp_path / "celerybeat-schedule"
    scheduler = HeartbeatScheduler(app=Celery(set_as_current=False), schedule_filename=str(schedule))
    try:
        assert scheduler.tick() <= HEARTBEAT_SECONDS
    finally:
        scheduler.close()
    heartbeat = Path(f"{schedule}.heartbeat")
    assert heartbeat.exists() and time.time() - heartbeat.stat().st_mtime < 5
    assert settings.CELERY_BEAT_SCHEDULER == "config.beat:HeartbeatScheduler"
    # The healthcheck's threshold leaves room for a few missed ticks.
    assert HEARTBEAT_SECONDS * 3 < 60


def test_the_base_images_folder_builds_every_image_the_stack_names(compose):
    built = {
        tag
        for line in (REPO_ROOT / "docker" / "base-images" / "images").read_text().splitlines()
        if line.strip() and not line.startswith("#")
        for tag in [line.split()[1]]
    }
    named = {service["image"] for service in compose["services"].values()} - {"shop:latest"}
    named |= set(re.findall(r"^FROM (\S+)", (REPO_ROOT / "Dockerfile").read_text(), re.MULTILINE))
    named |= {service["image"] for service in on_rabbitmq(compose)["services"].values() if "image" in service}
    assert named == built


def on_rabbitmq(compose: dict) -> dict:
    """docker-compose.rabbitmq.yml as written (the override's own services and settings)."""
    return yaml.safe_load((REPO_ROOT / "docker-compose.rabbitmq.yml").read_text())


def test_the_rabbitmq_override_puts_every_celery_process_on_one_healthy_rabbitmq(checkout):
    resolved = subprocess.run(
        [str(compose_binary()), "-f", "docker-compose.yml", "-f", "docker-compose.rabbitmq.yml", "config", "--format"]
        + ["json"],
        cwd=checkout,
        env={"PATH": os.environ["PATH"], "HOME": str(checkout), "RABBITMQ_PASSWORD": "rabbit-pass-1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert resolved.returncode == 0, resolved.stderr
    services = json.loads(resolved.stdout)["services"]
    celery_services = APP_SERVICES - {"sandbox"}
    urls = {name: services[name]["environment"].get("CELERY_BROKER_URL") for name in celery_services}
    # One URL everywhere: every process declares the quorum queues with the same arguments.
    assert set(urls.values()) == {"amqp://shop:rabbit-pass-1@rabbitmq:5672/shop"}, urls
    for name in celery_services:
        assert services[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name
    assert services["flower"]["environment"]["FLOWER_BROKER_API"] == "http://rabbitmq:15672/api/"
    rabbitmq = services["rabbitmq"]
    assert rabbitmq["healthcheck"]["test"][:2] == ["CMD", "rabbitmq-diagnostics"]
    assert [port["host_ip"] for port in rabbitmq["ports"]] == ["127.0.0.1"]
    assert any(volume["target"] == "/var/lib/rabbitmq" for volume in rabbitmq["volumes"])
    # The broker's consumer_timeout matches the settings' default (RABBITMQ_CONSUMER_TIMEOUT_SECONDS).
    conf = (REPO_ROOT / "docker" / "rabbitmq" / "rabbitmq.conf").read_text()
    assert re.search(rf"^consumer_timeout = {settings.RABBITMQ_CONSUMER_TIMEOUT_SECONDS * 1000}$", conf, re.M)

    # Without the password the override refuses to resolve: no default secret.
    missing = subprocess.run(
        [str(compose_binary()), "-f", "docker-compose.yml", "-f", "docker-compose.rabbitmq.yml", "config"],
        cwd=checkout,
        env={"PATH": os.environ["PATH"], "HOME": str(checkout)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode != 0 and "RABBITMQ_PASSWORD" in missing.stderr


def test_no_command_line_takes_a_path_from_the_callers_shell(compose):
    # `${VAR_DIR:-var}` in the Procfile or a compose command is filled in from whoever starts it
    # (the host's shell for compose): beat's state file is placed by the settings instead.
    commands = [(REPO_ROOT / "Procfile").read_text()] + [
        str(service.get("command", "")) for service in compose["services"].values()
    ]
    assert not [command for command in commands if "${VAR_DIR" in command]
    assert Path(settings.CELERY_BEAT_SCHEDULE_FILENAME) == Path(settings.VAR_DIR) / "celerybeat-schedule"
