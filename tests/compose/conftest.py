"""The compose tier: docker-compose.yml on a real Docker engine, checked from outside as a user would.

Runs only when asked for (`make test-compose`, or `pytest -m compose tests/compose`), since it
needs root, Debian's docker.io and mmdebstrap, and a few minutes. One stack per session:

1. `engine`: a dockerd of the tier's own (tests/compose/engine.py), always stopped at the end;
2. `stack`: the base images built from Debian packages (docker/base-images/build.sh, cached in
   the engine's data root), a copy of the working tree with `.env` made from `.env.example`
   (demo data asked for), the app image built, and `docker compose up --detach --wait` on free
   ports. Its phases are timed and the times printed at the end of the run.
"""

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.compose.checkout import copy_working_tree, read_dotenv
from tests.compose.engine import CACHE, Engine
from tests.stack import REPO_ROOT, free_port

PROJECT = "shop-compose-tier"
# Published ports: free ones, chosen per run, so the tier never meets the e2e tests' servers.
PUBLISHED = {
    "web": "PUBLISH_PORT_WEB",
    "flower": "PUBLISH_PORT_FLOWER",
    "sandbox": "PUBLISH_PORT_SANDBOX",
    "mailpit": "PUBLISH_PORT_MAILPIT",
    "prometheus": "PUBLISH_PORT_PROMETHEUS",
    "grafana": "PUBLISH_PORT_GRAFANA",
}
# What this run asks of .env.example's documented knobs: the demo data, and a Flower user of
# its own, which Prometheus must then use too.
ENV_CHANGES = {"DEMO_DATA": "true", "FLOWER_USER": "tier-operator"}
BUILD_OVERRIDE = Path(__file__).with_name("build-on-host-network.yml")
# The run's checkout, .env and logs: a folder of the tier's own, emptied when a run starts and
# kept after it (compose.log, dockerd.log). Not pytest's temporary folders, which other pytest
# runs on the machine rotate away.
RUN_FOLDER = CACHE / "last-run"
TIMINGS = pytest.StashKey[dict[str, float]]()


# The tier needs neither the local PostgreSQL and Redis nor a sandbox process: the root
# conftest's session-wide fixtures are replaced by no-ops here.
@pytest.fixture(scope="session", autouse=True)
def real_services_are_up():
    pass


@pytest.fixture(scope="session", autouse=True)
def payment_provider():
    pass


def pytest_collection_modifyitems(config, items):
    """Deselect the tier unless the marker expression names it (`-m compose`)."""
    if "compose" in (config.getoption("markexpr") or ""):
        return
    tier = [item for item in items if item.get_closest_marker("compose")]
    if tier:
        config.hook.pytest_deselected(items=tier)
        items[:] = [item for item in items if not item.get_closest_marker("compose")]


def pytest_terminal_summary(terminalreporter, config):
    timings = config.stash.get(TIMINGS, None)
    if timings:
        terminalreporter.write_sep("-", "compose tier timings")
        for phase, seconds in timings.items():
            terminalreporter.write_line(f"{phase:<32} {seconds:6.1f} s")


@contextmanager
def timed(config: pytest.Config, phase: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        config.stash.setdefault(TIMINGS, {})[phase] = time.monotonic() - started


@pytest.fixture
def timer(request):
    """`with timer("phase"):` adds the phase's time to the summary printed at the end."""
    return lambda phase: timed(request.config, phase)


@dataclass
class Stack:
    """The running compose project: `compose(...)` runs `docker compose` in its folder."""

    engine: Engine
    directory: Path
    ports: dict[str, int]
    dotenv: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    down: bool = False

    def compose(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [self.engine.docker, "compose", *args],
            cwd=self.directory,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker compose {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}\n"
                f"{self.diagnostics()}"
            )
        return result

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def set_env(self, **values: str) -> None:
        """Change lines of the project's .env, as a user edits it."""
        path = self.directory / ".env"
        lines = path.read_text().splitlines()
        for key, value in values.items():
            matches = [i for i, line in enumerate(lines) if line.startswith(f"{key}=")]
            assert len(matches) == 1, f"{key} is not set exactly once in .env"
            lines[matches[0]] = f"{key}={value}"
            self.dotenv[key] = value
        path.write_text("\n".join(lines) + "\n")

    def diagnostics(self) -> str:
        status = self.compose("ps", "--all", check=False, timeout=60).stdout
        logs = self.compose("logs", "--no-color", "--tail", "40", check=False, timeout=60).stdout
        return f"--- docker compose ps\n{status}\n--- docker compose logs (tail)\n{logs[-12000:]}"


@pytest.fixture(scope="session")
def engine(request) -> Iterator[Engine]:
    engine = Engine(RUN_FOLDER)
    try:
        engine.lock()
        shutil.rmtree(RUN_FOLDER, ignore_errors=True)
        RUN_FOLDER.mkdir(parents=True)
        with timed(request.config, "engine start"):
            engine.start()
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def stack(request, engine) -> Iterator[Stack]:
    config = request.config
    with timed(config, "base images (Debian packages)"):
        build = subprocess.run(
            ["bash", str(REPO_ROOT / "docker" / "base-images" / "build.sh")],
            env={**engine.env, "DOCKER": engine.docker},
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]

    directory = RUN_FOLDER / "checkout"
    copy_working_tree(directory)
    example = (directory / ".env.example").read_text()
    dotenv = example
    for key, value in ENV_CHANGES.items():
        assert example.count(f"\n{key}=") == 1, f".env.example should set {key} once"
        current = read_dotenv(directory / ".env.example")[key]
        dotenv = dotenv.replace(f"\n{key}={current}\n", f"\n{key}={value}\n")
    (directory / ".env").write_text(dotenv)

    ports = {service: free_port() for service in PUBLISHED}
    env = {
        **engine.env,
        "COMPOSE_PROJECT_NAME": PROJECT,
        "COMPOSE_FILE": f"docker-compose.yml:{BUILD_OVERRIDE}",
        **{variable: str(ports[service]) for service, variable in PUBLISHED.items()},
        # Fewer pool processes than the defaults: two cores, shared with other test runs.
        "CRITICAL_CONCURRENCY": "2",
        "DEFAULT_CONCURRENCY": "1",
        "BULK_CONCURRENCY": "1",
    }
    running = Stack(engine, directory, ports, read_dotenv(directory / ".env"), env)
    try:
        with timed(config, "app image (docker compose build)"):
            running.compose("build", timeout=1200)
            engine.docker_cli("image", "prune", "--force")  # earlier builds of shop:latest
        with timed(config, "docker compose up --wait"):
            running.compose("up", "--detach", "--wait", "--wait-timeout", "300", timeout=420)
        yield running
    finally:
        logs = running.compose("logs", "--no-color", "--timestamps", check=False, timeout=120).stdout
        (RUN_FOLDER / "compose.log").write_text(logs)
        if not running.down:
            running.compose("down", "--volumes", "--remove-orphans", check=False, timeout=600)
