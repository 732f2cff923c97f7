"""The README's commands work as typed in a second terminal while `make run` runs, and Ctrl-C stops it cleanly.

For each variant (SQLite and the filesystem broker; PostgreSQL and Redis) the real `make run` starts in a
session of its own, as in a terminal, with a VAR_DIR, ports and database of its own. Every line of the
README's ```sh blocks then runs in a fresh shell that knows only PATH, HOME and VAR_DIR, as a second
terminal would (the settings come from <VAR_DIR>/run.env), except blocks after a
`<!-- readme-commands: skip ... -->` comment and, on the filesystem broker, lines saying `(Redis only)`.
The README's own ports and Redis database are swapped for the test's (README_VALUES below), nothing else.
Then SIGINT goes to make's process group, as Ctrl-C does.
"""

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis

from tests.stack import free_port, http_ok, wait_for

pytestmark = pytest.mark.worker

REPO_ROOT = Path(__file__).resolve().parents[2]
SKIP_MARK = "<!-- readme-commands: skip"
# The runner's grace period (config/procfile.py): every process must be gone well within it.
GRACE_SECONDS = 30
WORKERS = ("critical", "bulk", "default")


def readme_commands() -> list[tuple[str, bool]]:
    """(command, Redis only) for every line of the README's unmarked ```sh blocks; continuations joined."""
    text = (REPO_ROOT / "README.md").read_text()
    commands = []
    for match in re.finditer(r"^```sh\n(.*?)^```", text, flags=re.S | re.M):
        preceding = text[: match.start()].rstrip().splitlines()[-1]
        if preceding.startswith(SKIP_MARK):
            continue
        for command in match.group(1).replace("\\\n", " ").splitlines():
            # Neither variant below runs on RabbitMQ: its line is checked by hand (README, "Watching the queues").
            if command.strip() and "(RabbitMQ only)" not in command:
                commands.append((command.strip(), "(Redis only)" in command))
    return commands


class MakeRun:
    """`make run` in a session of its own, as started from a terminal, its output in a file."""

    def __init__(self, var_dir: Path, env: dict[str, str]):
        self.var_dir = var_dir
        self.web_port, self.flower_port, self.sandbox_port = free_port(), free_port(), free_port()
        self.log_path = var_dir.parent / "make-run.log"
        self.env = {
            **env,
            "VAR_DIR": str(var_dir),
            # collectstatic's output of its own: the other variant may be starting in the other xdist process.
            "STATIC_ROOT": str(var_dir / "static"),
            "WEB_PORT": str(self.web_port),
            "FLOWER_PORT": str(self.flower_port),
            "SANDBOX_PORT": str(self.sandbox_port),
            # The README's small-laptop line, and no worker metrics ports (9101-9103 may be taken by other runs).
            "CRITICAL_CONCURRENCY": "1",
            "BULK_CONCURRENCY": "1",
            "DEFAULT_CONCURRENCY": "1",
            "CELERY_METRICS_PORT": "0",
        }
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                ["make", "--no-print-directory", "run"],
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        assert self.process.poll() is None, f"make run exited with {self.process.returncode}:\n{self.output()[-6000:]}"
        output = self.output()
        return (
            all(re.search(rf"\b{queue}@\S+ ready\.", output) for queue in WORKERS)
            and http_ok(f"http://127.0.0.1:{self.web_port}/readyz")
            and http_ok(f"http://127.0.0.1:{self.flower_port}/healthcheck")
        )

    def pids(self) -> set[int]:
        """make and every process under it (the Procfile's processes run in sessions of their own)."""
        parents = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(stat.parent.name)] = int(fields[1])
        tree = {self.process.pid}
        while grown := {pid for pid, parent in parents.items() if parent in tree} - tree:
            tree |= grown
        return tree

    def stop(self) -> None:
        if self.process.poll() is None:
            for pid in self.pids():
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            self.process.wait(10)


def run_in_second_terminal(commands: list[str], var_dir: Path, home: Path) -> list[tuple[str, int, str]]:
    """Runs the commands one after the other in one fresh bash (so TOKEN=... carries over); (command, rc, output)."""
    script = []
    for number, command in enumerate(commands):
        script += [f"echo '@@@ begin {number}'", command, f'echo "@@@ end {number} $?"']
    result = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=REPO_ROOT,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "VAR_DIR": str(var_dir), "LANG": "C.UTF-8"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    results = []
    for number, command in enumerate(commands):
        match = re.search(rf"@@@ begin {number}\n(.*?)@@@ end {number} (\d+)\n", result.stdout, flags=re.S)
        assert match, f"{command!r} did not finish:\n{result.stdout}\n{result.stderr}"
        results.append((command, int(match.group(2)), match.group(1)))
    return results


def redis_parts(url: str) -> tuple[str, int, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379, int(parts.path.strip("/") or 0)


@pytest.fixture(scope="module")
def postgres_and_redis():
    """A database of this test's own on the suite's PostgreSQL server, and the suite's Redis database, emptied."""
    server = urlsplit(os.environ["DATABASE_URL"])
    # Per pytest-xdist process (make test-rest): the other one may run this module's other tests at the same time.
    name = server.path.strip("/") + "_readme" + os.environ.get("PYTEST_XDIST_WORKER", "")
    admin = urlunsplit(server._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')
    redis_url = os.environ["REDIS_URL"]
    redis.Redis.from_url(redis_url).flushdb()
    yield {"DATABASE_URL": urlunsplit(server._replace(path=f"/{name}")), "REDIS_URL": redis_url}
    redis.Redis.from_url(redis_url).flushdb()
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def make_run(request, tmp_path_factory):
    """A running `make run`; the last test of a variant stops it with Ctrl-C."""
    base = tmp_path_factory.mktemp(f"make-run-{request.param}")
    env = {"PATH": os.environ["PATH"], "HOME": str(base), "LANG": "C.UTF-8"}
    if request.param == "postgres":
        env.update(request.getfixturevalue("postgres_and_redis"))
    running = MakeRun(base / "var", env)
    running.variant = request.param
    try:
        wait_for(running.ready, 90, f"make run ({request.param}) to be ready")
        yield running
    finally:
        running.stop()


def readme_values(running: MakeRun) -> dict[str, str]:
    """The README's example values and the ones this run uses instead."""
    values = {
        "127.0.0.1:8000": f"127.0.0.1:{running.web_port}",
        "localhost:8100": f"localhost:{running.sandbox_port}",
        "127.0.0.1:5555": f"127.0.0.1:{running.flower_port}",
    }
    if running.variant == "postgres":
        host, port, db = redis_parts(running.env["REDIS_URL"])
        values["redis-cli -n 0 "] = f"redis-cli -h {host} -p {port} -n {db} "
    return values


def test_every_readme_command_works_in_a_second_terminal(make_run, tmp_path):
    # Given the README's second-terminal commands, with this run's ports
    on_redis = make_run.variant == "postgres"
    commands = []
    for command, redis_only in readme_commands():
        if redis_only and not on_redis:
            continue
        for readme_value, value in readme_values(make_run).items():
            command = command.replace(readme_value, value)
        commands.append(command)

    # When each runs in a fresh shell that knows nothing but VAR_DIR
    results = run_in_second_terminal(commands, make_run.var_dir, tmp_path)

    # Then each succeeds with the output it promises
    expected = {
        "issue_api_token": r"^$",  # the token goes into $TOKEN
        "/api/orders/": r'"status": "pending".*"sku": "MUG-001".*"quantity": 2',
        "/v1/faults": r'"error_rate"',
        "/v1/ledger/summary": r"^\{",
        "inspect active": r"OK.*\b3 nodes online",
        "llen critical": r"^\d+$",
    }
    seen = set()
    for command, returncode, output in results:
        assert returncode == 0, f"{command!r} exited with {returncode}:\n{output}"
        for kind, pattern in expected.items():
            if kind in command:
                seen.add(kind)
                assert re.search(pattern, output.strip(), flags=re.S), f"{command!r} printed:\n{output}"
    assert seen == set(expected) - ({"llen critical"} if not on_redis else set()), commands
    # The access log line is written after the answer, through make's pipe: it may follow curl's exit.
    wait_for(
        lambda: re.search(r'"POST /api/orders/ HTTP/1\.1" 201 ', make_run.output()),
        15,
        "the API order's 201 in the access log",
    )
    # Emails are files a person can read, not lines in the workers' output.
    wait_for(lambda: list((make_run.var_dir / "emails").glob("*.log")), 30, "the order's first email")
    assert "celery.redirected" not in make_run.output()


def test_make_run_listens_on_loopback_only(make_run):
    listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout.splitlines()
    ours = make_run.pids()
    addresses = {}
    for line in listening:
        pids = {int(pid) for pid in re.findall(r"pid=(\d+)", line)}
        if pids & ours:
            local = line.split()[3]
            addresses[int(local.rsplit(":", 1)[1])] = local.rsplit(":", 1)[0]
    assert {make_run.web_port, make_run.flower_port, make_run.sandbox_port} <= set(addresses), listening
    assert set(addresses.values()) <= {"127.0.0.1", "[::1]"}, addresses


def test_ctrl_c_stops_every_process_warm_within_the_grace_period(make_run):
    # Given the running system and every process it started
    processes = make_run.pids()
    assert len(processes) > 10, processes

    # When Ctrl-C reaches make's process group
    started = time.monotonic()
    os.killpg(make_run.process.pid, signal.SIGINT)
    returncode = make_run.process.wait(GRACE_SECONDS + 15)
    elapsed = time.monotonic() - started

    # Then every process stops by itself, within the grace period, and says nothing alarming
    output = make_run.output()
    shutdown = output[output.index("SIGINT received") :]
    assert elapsed < GRACE_SECONDS, f"stopping took {elapsed:.1f} s:\n{shutdown}"
    assert returncode in (0, -signal.SIGINT, 130), f"make ended with {returncode}:\n{shutdown}"
    for alarming in (r"\bERROR\b", r"SIGKILL", r"\*\*\* .*(Error \d+|Interrupt)", r"No hostname was supplied"):
        lines = [line for line in output.splitlines() if re.search(alarming, line)]
        assert not lines, "\n".join(lines)
    assert not re.search(r"Inspect method \w+ failed", output), "Flower's first inspection missed the workers"
    for queue in WORKERS:
        assert re.search(rf"worker-{queue}\s+\| worker: Warm shutdown", shutdown), queue
    stopped = re.findall(r"system\s+\| ([\w-]+) stopped \(rc=(-?\d+)\)", shutdown)
    assert sorted(stopped) == sorted((name, "0") for name in make_run_processes()), shutdown
    survivors = [pid for pid in processes if Path(f"/proc/{pid}").exists()]
    assert not survivors, survivors
    print(f"{make_run.variant}: Ctrl-C to make's exit {elapsed:.1f} s, make's status {returncode}")


def make_run_processes() -> list[str]:
    lines = (REPO_ROOT / "Procfile").read_text().splitlines()
    return [line.split(":", 1)[0] for line in lines if line.strip() and not line.startswith("#")]


def test_the_readme_marks_the_commands_it_does_not_run():
    """`make run`, `make test` and docker compose start systems: each sits in a block marked as skipped."""
    run = [command for command, _ in readme_commands()]
    assert not [command for command in run if re.search(r"\bmake (run|test)\b|docker compose|^cp ", command)], run
    assert any(shlex.split(command)[0].startswith("TOKEN=") for command in run), run
