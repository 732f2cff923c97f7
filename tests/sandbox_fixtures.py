"""The sandbox for the tests, with a webhook receiver for it to call: in-process behind a `responses` stub
(`provider_stub`, tests/provider_stub.py) for the unit tier, or a real subprocess (`python -m sandbox`) on a
free port (`sandbox_process`) for the tests marked `sandbox_process`, `worker`, `chaos`, `e2e` or `browser`.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
WEBHOOK_SECRET = "test-webhook-secret"
LISTENING_RE = re.compile(r"Listening at: http://[^:]+:(\d+)")


@dataclass
class ReceivedWebhook:
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    url: str = ""
    received: list[ReceivedWebhook] = field(default_factory=list)
    # Answer 500 to this many deliveries before accepting, to exercise the sandbox's retries.
    fail_next: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def clear(self) -> None:
        with self.lock:
            self.received.clear()
            self.fail_next = 0

    def wait_for(self, predicate, timeout: float = 10.0) -> list[ReceivedWebhook]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                matching = [hook for hook in self.received if predicate(hook.event)]
            if matching:
                return matching
            time.sleep(0.05)
        raise AssertionError(f"no matching webhook within {timeout}s; got {[h.event for h in self.received]}")


@pytest.fixture(scope="session")
def webhook_receiver():
    receiver = WebhookReceiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with receiver.lock:
                failing = receiver.fail_next > 0
                if failing:
                    receiver.fail_next -= 1
                else:
                    receiver.received.append(ReceivedWebhook(dict(self.headers), body))
            self.send_response(500 if failing else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/webhooks/provider/"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield receiver
    server.shutdown()
    server.server_close()


class SandboxProcess:
    """A running `python -m sandbox` whose port is read from gunicorn's "Listening at" line."""

    def __init__(self, *, db_path: Path, log_path: Path, env: dict[str, str] | None = None):
        self.log_path = log_path
        # Only the test decides faults and where webhooks go, whatever the developer's shell exports.
        inherited = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith("SANDBOX_") and name not in ("SHOP_WEBHOOK_URL", "WEBHOOK_SECRET")
        }
        full_env = {
            **inherited,
            "SANDBOX_PORT": "0",
            "SANDBOX_DB": str(db_path),
            "WEBHOOK_SECRET": WEBHOOK_SECRET,
            "SANDBOX_WEBHOOK_RETRY_SECONDS": "0.1",
            **(env or {}),
        }
        self.log = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sandbox"], cwd=REPO_ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.url = self._wait_until_healthy()

    def _wait_until_healthy(self, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        url = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sandbox exited early:\n{self.log_path.read_text()}")
            if url is None:
                match = LISTENING_RE.search(self.log_path.read_text())
                url = f"http://127.0.0.1:{match.group(1)}" if match else None
            if url is not None:
                try:
                    if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                        return url
                except requests.ConnectionError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sandbox not healthy within {timeout}s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="session")
def sandbox_process(tmp_path_factory, webhook_receiver):
    directory = tmp_path_factory.mktemp("sandbox")
    process = SandboxProcess(
        db_path=directory / "sandbox.sqlite3",
        log_path=directory / "sandbox.log",
        env={"SHOP_WEBHOOK_URL": webhook_receiver.url},
    )
    yield process
    process.stop()


class SandboxClient:
    """Thin helpers over the sandbox's HTTP API."""

    def __init__(self, url: str):
        self.url = url
        self.session = requests.Session()

    def post(self, path: str, body=None, *, key: str | None = None, timeout: float = 10, **kwargs):
        headers = kwargs.pop("headers", {})
        if key is not None:
            headers["Idempotency-Key"] = key
        if body is not None and "data" not in kwargs:
            kwargs["json"] = body
        return requests.post(f"{self.url}{path}", headers=headers, timeout=timeout, **kwargs)

    def get(self, path: str, **params):
        return self.session.get(f"{self.url}{path}", params=params, timeout=10)

    def charge(self, *, key: str, reference: str = "order-1", amount: str = "12.50", **extra):
        return self.post("/v1/charges", {"amount": amount, "currency": "EUR", "reference": reference, **extra}, key=key)

    def set_faults(self, **values):
        response = self.session.put(f"{self.url}/v1/faults", json=values, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def summary(self) -> dict:
        return self.get("/v1/ledger/summary").json()

    def charges(self, **params) -> list[dict]:
        return self.get("/v1/charges", **params).json()["data"]


@pytest.fixture(scope="session")
def provider_stub(tmp_path_factory, webhook_receiver):
    """The sandbox application in this process, behind `responses` at `STUB_URL` (started once per session)."""
    from tests.provider_stub import InProcessSandbox

    stub = InProcessSandbox(
        db_path=tmp_path_factory.mktemp("sandbox-stub") / "sandbox.sqlite3",
        webhook_url=webhook_receiver.url,
        webhook_secret=WEBHOOK_SECRET,
    ).start()
    yield stub
    stub.stop()


@pytest.fixture
def sandbox(provider_in_use, webhook_receiver):
    """A client for the test's sandbox (the stub or the process: `provider_in_use`), with the ledger, faults and
    received webhooks wiped first.

    Wiped again afterwards: a test may leave faults on, or charges under the fixed keys
    the sandbox's own tests use (`order-6`), which a later test reuses with other amounts.
    (The shop's keys are random, `pay_<32 hex>`: they never meet another test's.)
    """
    client = SandboxClient(provider_in_use.url)
    assert client.post("/v1/reset").status_code == 200
    webhook_receiver.clear()
    yield client
    client.post("/v1/reset")
    webhook_receiver.clear()
