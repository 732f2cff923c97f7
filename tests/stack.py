"""Real processes for end-to-end tests and the bench: a private redis-server, Celery workers, and any
command from the Procfile."""

import contextlib
import email
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.header import decode_header, make_header
from pathlib import Path

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
# The timestamp config/settings/logging.py puts at the start of each line (`%(asctime)s`).
TIMESTAMP_RE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d{3}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    """Poll until condition() is truthy and return its value; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


class RedisServer:
    """A redis-server of the test's own on a free port, so stopping it disturbs nothing else.

    `aof=True` keeps queued messages across a restart, as the compose file's Redis does.
    """

    def __init__(self, directory: Path, *, aof: bool = False):
        self.port = free_port()
        self.directory = directory
        self.aof = aof
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is required for this test"
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.directory)]
            + persistence,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self.answers, 10, "redis-server to start")

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def worker_command(
    *queues: str, name: str, concurrency: int = 1, pool: str | None = None, options: Sequence[str] = ()
) -> list[str]:
    """The Procfile's worker line: `celery -A config worker` on `queues`, node name `<name>@host`."""
    return [
        sys.executable, "-m", "celery", "-A", "config", "worker",
        "-Q", ",".join(queues), "-c", str(concurrency),
        *(["--pool", pool] if pool else []),
        "-n", f"{name}@%h", "--loglevel=INFO", *options,
    ]  # fmt: skip


@dataclass(frozen=True)
class LogLine:
    at: datetime
    task_id: str
    text: str


def task_lines(log: str, task_name: str, what: str) -> list[LogLine]:
    """A worker's lines `Task <task_name>[<id>] <what>...` (received, retry:, succeeded in, ...), with their times."""
    pattern = re.compile(rf"Task {re.escape(task_name)}\[(?P<id>[0-9a-f-]+)\] {what}")
    lines = []
    for line in log.splitlines():
        if (match := pattern.search(line)) and (stamp := TIMESTAMP_RE.search(line)):
            at = datetime.strptime(stamp.group().replace(".", ","), "%Y-%m-%d %H:%M:%S,%f")
            lines.append(LogLine(at=at, task_id=match.group("id"), text=line))
    return lines


@dataclass
class Worker:
    """A Celery worker process in a session of its own, its output in `log_path`."""

    name: str
    queues: tuple[str, ...]
    process: subprocess.Popen
    log_path: Path
    nodename: str = ""  # e.g. critical-test@host, known once ready; for app.control destinations

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ready(self) -> bool:
        """Whether the worker has logged `<name>@host ready.`; raises if it exited before that."""
        if match := re.search(rf"({re.escape(self.name)}@\S+) ready\.", self.log()):
            self.nodename = match.group(1)
            return True
        if self.process.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited with {self.process.returncode}:\n{self.log()[-4000:]}")
        return False

    def wait_for_task_line(self, task_name: str, what: str, timeout: float, count: int = 1) -> str:
        """The log once it holds `count` lines `Task <task_name>[<id>] <what>`.

        A task's end is logged after its transaction commits, so a test that saw the task's rows change
        waits for the line instead of reading the log at once.
        """

        def logged() -> str | None:
            text = self.log()
            return text if len(task_lines(text, task_name, what)) >= count else None

        return wait_for(logged, timeout, f"{count} line(s) `Task {task_name}[...] {what}` in {self.name}'s log")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {self.name} not ready after {timeout} s:\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def stop(self, timeout: float = 15) -> int:
        """Warm shutdown (SIGTERM); SIGKILL for the whole process group if it does not finish in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                # The worker runs in its own session: its group is this worker and its pool children.
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        return self.process.returncode


def start_celery_worker(
    *queues: str,
    name: str,
    env: Mapping[str, str],
    log_path: Path,
    concurrency: int = 1,
    pool: str | None = "prefork",
    options: Sequence[str] = (),
) -> Worker:
    """Start `worker_command(...)` in a session of its own; returns at once: call `wait_ready` on the result."""
    assert queues, "name the queues the worker consumes"
    command = worker_command(*queues, name=name, concurrency=concurrency, pool=pool, options=options)
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 (a fixed command line)
            command,
            cwd=REPO_ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Worker(name=name, queues=queues, process=process, log_path=log_path)


class Processes:
    """Starts commands with their logs in a folder; stops them all at the end (SIGTERM, then SIGKILL)."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen]] = []

    def spawn(self, name: str, command: list[str], env: dict) -> subprocess.Popen:
        return self._spawn(name, command, env)[0]

    def spawn_worker(self, name: str, command: list[str], env: dict, *, node: str) -> Worker:
        """`spawn`, for a worker command whose node name is `<node>@host`: call `wait_ready` on the result."""
        process, log_path = self._spawn(name, command, env)
        return Worker(name=node, queues=(), process=process, log_path=log_path)

    def _spawn(self, name: str, command: list[str], env: dict) -> tuple[subprocess.Popen, Path]:
        log_path = self.log_dir / f"{name}-{len(self.started)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started.append((name, process))
        return process, log_path

    def web(self, env: dict, *, workers: int = 2, port: int | None = None) -> str:
        """gunicorn with the production config (on a free port by default); returns its base URL once it answers."""
        port = port or free_port()
        # Metrics files of its own unless the test gives a folder: by default gunicorn.conf.py empties
        # <VAR_DIR>/metrics/web, which a gunicorn of a test in the other pytest-xdist process would share.
        metrics = {"PROMETHEUS_MULTIPROC_DIR": str(self.log_dir / f"metrics-{port}")}
        self.spawn(
            "web",
            [sys.executable, "-m", "gunicorn", "config.wsgi", "-c", "config/gunicorn.conf.py"],
            {**metrics, **env, "GUNICORN_BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": str(workers)},
        )
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_ok(f"{base}/healthz"), 30, "gunicorn to answer")
        return base

    def workers(self, env: dict, queues: dict[str, int], *, suffix: str = "", timeout: float = 60) -> None:
        """The Procfile's worker line for each queue, with its concurrency and node name `<queue><suffix>@host`;
        returns once every one of them is ready."""
        pending = []
        for queue, concurrency in queues.items():
            name = f"{queue}{suffix}"
            command = worker_command(queue, name=name, concurrency=concurrency)
            pending.append(self.spawn_worker(f"worker-{name}", command, env, node=name))
        wait_for(
            lambda: all(worker.ready() for worker in pending), timeout, f"workers for {', '.join(queues)} to be ready"
        )

    def beat(self, env: dict) -> subprocess.Popen:
        schedule = self.log_dir / f"beat-schedule-{len(self.started)}"
        return self.spawn("beat", [sys.executable, "-m", "celery", "-A", "config", "beat", "-s", str(schedule)], env)

    def logs(self) -> str:
        paths = sorted(self.log_dir.glob("*.log"))
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}" for path in paths)

    def stop_all(self) -> None:
        for _, process in reversed(self.started):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process in reversed(self.started):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


class PostgresServer:
    """A PostgreSQL cluster of the test's own (initdb in a temporary folder, run as the postgres user).

    Restarting it disturbs nothing else. Trust authentication on 127.0.0.1 only.
    """

    def __init__(self):
        import glob
        import tempfile

        versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        assert versions, "PostgreSQL server binaries are required for this test"
        self.bin = Path(versions[-1])
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="pg-test-"))
        shutil.chown(self.directory, "postgres", "postgres")
        self.data = self.directory / "data"
        self._as_postgres(
            [self.bin / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]
        )

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def _as_postgres(self, argv: list, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", *map(str, argv)],
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=120,
            check=check,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(
            [self.bin / "pg_ctl", "-D", self.data, "-l", self.directory / "server.log", "-w", "-o", options, "start"]
        )

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres([self.bin / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop"], check=False)

    def create_database(self, name: str) -> None:
        self._as_postgres([self.bin / "createdb", "-h", "127.0.0.1", "-p", self.port, "-U", "postgres", name])

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def unreachable_broker(url: str = "redis://127.0.0.1:9/15"):
    """Publishing from this process goes to a port where nothing listens, as when the broker is down."""
    from config.celery import app

    saved_conf = {key: app.conf[key] for key in ("task_always_eager", "broker_url")}
    saved_pools = (app._pool, app.amqp._producer_pool)
    app.conf.update(task_always_eager=False, broker_url=url)
    # Drop the cached connection pools so the next publish connects to that URL.
    app._pool = app.amqp._producer_pool = None
    try:
        yield
    finally:
        app.conf.update(saved_conf)
        app._pool, app.amqp._producer_pool = saved_pools


class MailServer:
    """A minimal SMTP server of the test's own (the commands smtplib sends) on a port chosen up front.

    It accepts every message and keeps it (`messages`, `subjects`). Until `start`, and after `stop`,
    nothing listens on the port: a send is refused at once, as with a mail server that is down;
    `start` opens the same port again.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.messages: list[bytes] = []
        self.lock = threading.Lock()
        self.server: socketserver.ThreadingTCPServer | None = None

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    @property
    def subjects(self) -> list[str]:
        with self.lock:
            messages = list(self.messages)
        return [str(make_header(decode_header(email.message_from_bytes(raw)["Subject"] or ""))) for raw in messages]

    def start(self) -> None:
        mail = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                mail._converse(self.rfile, self.wfile)

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                return sock.recv(64).startswith(b"220")
        except OSError:
            return False

    def _converse(self, rfile, wfile) -> None:
        wfile.write(b"220 mail.test ESMTP\r\n")
        while line := rfile.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                wfile.write(b"250-mail.test\r\n250 HELP\r\n")
            elif verb == b"HELO":
                wfile.write(b"250 mail.test\r\n")
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                wfile.write(b"250 OK\r\n")
            elif verb == b"DATA":
                wfile.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                lines = []
                while (data := rfile.readline()) not in (b".\r\n", b""):
                    lines.append(data[1:] if data.startswith(b"..") else data)  # dot-unstuffing
                with self.lock:
                    self.messages.append(b"".join(lines))
                wfile.write(b"250 OK: queued\r\n")
            elif verb == b"QUIT":
                wfile.write(b"221 Bye\r\n")
                return
            else:
                wfile.write(b"502 Command not implemented\r\n")


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process in KiB; empty once it has exited (bench/: pool processes' memory)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {
        key: int(rest.split()[0])
        for key, _, rest in (line.partition(":") for line in text.splitlines())
        if key in ("VmRSS", "VmHWM")
    }
