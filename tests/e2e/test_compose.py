"""docker-compose.yml, tested without a Docker engine.

`docker-compose config` (Debian's docker-compose) validates the file and resolves it;
then every application service's command runs here as a real process, against the
local PostgreSQL and Redis with the compose host names mapped to them, and must pass
its own healthcheck command.
"""

import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.db import connection

from tests.e2e.conftest import database_url
from tests.stack import REPO_ROOT

APP_SERVICES = ["migrate", "web", "worker-critical", "worker-bulk", "worker-default", "beat", "flower", "sandbox"]
IMAGES = ["db", "redis", "mailpit", "prometheus", "grafana"]
# Ports the compose services listen on inside their containers; here they are on the host.
SERVICE_PORTS = {"web": 8000, "flower": 5555, "sandbox": 8100}


@pytest.fixture(scope="module")
def compose(tmp_path_factory) -> dict:
    """The resolved compose file, with .env.example as its .env."""
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose (Debian package docker-compose) is required: .ci/run installs it"
    directory = tmp_path_factory.mktemp("compose")
    shutil.copy(REPO_ROOT / "docker-compose.yml", directory / "docker-compose.yml")
    shutil.copy(REPO_ROOT / ".env.example", directory / ".env")
    for folder in ("monitoring",):
        if (REPO_ROOT / folder).exists():
            shutil.copytree(REPO_ROOT / folder, directory / folder)
    result = subprocess.run([binary, "config"], cwd=directory, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def procfile() -> dict[str, str]:
    lines = (REPO_ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip() and not line.startswith("#"))


def queues_consumed(command: str) -> set[str]:
    words = shlex.split(command)
    if "worker" not in words or "-Q" not in words:
        return set()
    return set(words[words.index("-Q") + 1].split(","))


def test_compose_file_is_valid_and_has_every_service(compose):
    assert set(compose["services"]) == set(APP_SERVICES) | set(IMAGES)


def test_every_queue_in_the_routing_table_has_a_worker_service(compose):
    routed = {route["queue"] for route in settings.CELERY_TASK_ROUTES.values()} | {settings.CELERY_TASK_DEFAULT_QUEUE}
    consumed = {
        queue
        for service in compose["services"].values()
        if isinstance(service.get("command"), str)
        for queue in queues_consumed(service["command"])
    }
    assert routed <= consumed, f"no worker service for {routed - consumed}"


def test_compose_services_run_the_procfile_commands():
    raw = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    for name, command in procfile().items():
        assert raw[name]["command"] == command, name


def test_long_running_services_have_healthchecks_restart_and_workers_a_grace_period(compose):
    for name in APP_SERVICES:
        service = compose["services"][name]
        if name in ("migrate", "beat"):
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert service.get("restart") == "unless-stopped", name
    soft_limit = settings.REPORT_SOFT_TIME_LIMIT if hasattr(settings, "REPORT_SOFT_TIME_LIMIT") else 300
    for name in ("worker-critical", "worker-bulk", "worker-default"):
        grace = compose["services"][name]["stop_grace_period"]
        assert _seconds(grace) > soft_limit, (name, grace)
    assert compose["services"]["web"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert compose["services"]["web"]["depends_on"]["db"]["condition"] == "service_healthy"
    redis_command = compose["services"]["redis"]["command"]
    assert "noeviction" in redis_command and "--appendonly" in redis_command


def _seconds(duration: str) -> int:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(duration))
    assert match, duration
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def _local_env(service: dict, db_url: str, redis_url: str, var_dir: Path) -> dict[str, str]:
    """The service's environment with compose host names mapped to this machine."""
    env = {key: str(value) for key, value in (service.get("environment") or {}).items()}
    mapped = {}
    for key, value in env.items():
        value = re.sub(r"^postgres://[^/]+@db:5432/\w+$", db_url, value)
        value = value.replace("redis://redis:6379/0", redis_url)
        value = re.sub(r"http://(sandbox|web)(:\d+)", r"http://127.0.0.1\2", value)
        value = value.replace("smtp://mailpit:1025", "consolemail://")
        value = value.replace("/app/var", str(var_dir))
        mapped[key] = value
    return {
        **os.environ,
        **mapped,
        "VAR_DIR": str(var_dir),
        "HOSTNAME": socket.gethostname(),  # Docker sets it; the workers' healthchecks use it
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}",
    }


def _healthcheck_argv(test: list[str]) -> list[str]:
    kind, *rest = test
    if kind == "CMD-SHELL":
        return ["sh", "-c", rest[0].replace("$$", "$")]
    assert kind == "CMD", test
    return rest


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_every_application_service_starts_and_passes_its_own_healthcheck(compose, tmp_path):
    busy = [port for port in SERVICE_PORTS.values() if not _port_is_free(port)]
    assert not busy, f"ports {busy} are taken: this test runs the services on their compose ports"
    db_url = database_url(connection.settings_dict)
    env_of = {
        name: _local_env(compose["services"][name], db_url, settings.CELERY_BROKER_URL, tmp_path)
        for name in APP_SERVICES
    }
    (tmp_path / "metrics").mkdir()
    logs: dict[str, Path] = {}
    running: dict[str, subprocess.Popen] = {}

    def start(name: str) -> subprocess.Popen:
        command = compose["services"][name]["command"]
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        logs[name] = tmp_path / f"{name}.log"
        with logs[name].open("wb") as log:
            return subprocess.Popen(
                argv, cwd=REPO_ROOT, env=env_of[name], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    try:
        migrate = start("migrate")
        assert migrate.wait(120) == 0, logs["migrate"].read_text()  # service_completed_successfully
        for name in APP_SERVICES[1:]:
            running[name] = start(name)
        for name in APP_SERVICES[1:]:
            healthcheck = compose["services"][name].get("healthcheck")
            if not healthcheck:
                time.sleep(3)
                assert running[name].poll() is None, f"{name} exited:\n{logs[name].read_text()}"
                continue
            argv = _healthcheck_argv(healthcheck["test"])
            deadline = time.monotonic() + 90
            while True:
                assert running[name].poll() is None, f"{name} exited:\n{logs[name].read_text()}"
                check = subprocess.run(argv, cwd=REPO_ROOT, env=env_of[name], capture_output=True, timeout=60)
                if check.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"{name} never healthy: {check.stderr[-2000:]!r}\n{logs[name].read_text()[-4000:]}")
                time.sleep(1)
    finally:
        for process in running.values():
            if process.poll() is None:
                os.killpg(process.pid, 15)
        for process in running.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait(5)
