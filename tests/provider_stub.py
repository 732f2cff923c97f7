"""The sandbox served in-process: `responses` stubs the provider at the HTTP layer and answers each request
by calling the sandbox's own WSGI application, so the unit tier keeps its real behaviour (idempotency keys,
fault injection, the SQLite ledger, signed webhooks) without a process.

What stays real:
- every request still goes through requests' adapters and `integrations.http.send` (its deadline, its
  error mapping): only the socket is replaced, at `HTTPAdapter.send`;
- the application runs on a pool of threads, as gunicorn's gthread worker runs it, and the caller waits
  for it no longer than its read timeout: an injected timeout or a latency past the client's timeout
  raises `requests.ReadTimeout` while the sandbox goes on (and may still charge), as over a socket;
- the sandbox's webhook thread runs here and posts to the test's receiver over real HTTP (every URL but
  the stub's passes through to the network).

Tests that need the sandbox as a process (a Celery worker, gunicorn or a browser calls it, or the test
restarts it) are marked `sandbox_process` and get `tests.sandbox_fixtures.SandboxProcess` instead.
"""

import io
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

import requests
import responses

# Never resolvable (RFC 2606): a request that escapes the stub fails at once instead of reaching anything.
STUB_URL = "http://sandbox.invalid"
_STUB_URL_RE = re.compile(re.escape(STUB_URL) + r"(/|$)")
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# gunicorn's thread count in `python -m sandbox` (SANDBOX_THREADS).
THREADS = 16


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with the sandbox's variables exactly `values` (the developer's SANDBOX_* and
    SHOP_WEBHOOK_URL left out), put back afterwards."""
    saved = {name: value for name, value in os.environ.items() if name.startswith("SANDBOX_") or name in _OURS}
    for name in saved:
        del os.environ[name]
    os.environ.update(values)
    try:
        yield
    finally:
        for name in values:
            os.environ.pop(name, None)
        os.environ.update(saved)


_OURS = ("SHOP_WEBHOOK_URL", "WEBHOOK_SECRET")


class InProcessSandbox:
    """The sandbox application behind `STUB_URL`, for as long as `start()`..`stop()` lasts."""

    url = STUB_URL

    def __init__(self, *, db_path: Path, webhook_url: str, webhook_secret: str):
        self.db_path = db_path
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        self.mock = responses.RequestsMock(assert_all_requests_are_fired=False)
        self._pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="sandbox-stub")
        self._started = threading.Event()
        self.environment = {
            "SANDBOX_DB": str(db_path),
            "SHOP_WEBHOOK_URL": webhook_url,
            "WEBHOOK_SECRET": webhook_secret,
            "SANDBOX_WEBHOOK_RETRY_SECONDS": "0.1",
        }
        self.settings = None

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Around each test that uses the stub: the sandbox's settings are this stub's.

        The sandbox reads them from the environment once (`sandbox.config.get_settings`, cached); a test
        may read its own and clear them after (tests/sandbox/test_ledger.py runs the ledger on a file of its
        own). So the environment holds the stub's for the test, and a read in any thread (the webhook
        thread's too) after such a clear gets the stub's again, never the defaults (var/sandbox.sqlite3).
        """
        from sandbox.config import get_settings

        with _environment(self.environment):
            if get_settings() != self.settings:
                get_settings.cache_clear()
                assert get_settings() == self.settings
            yield

    def start(self) -> "InProcessSandbox":
        from sandbox import faults, ledger
        from sandbox.config import get_settings

        with _environment(self.environment):
            get_settings.cache_clear()
            self.settings = get_settings()
            # What `python -m sandbox` does before serving.
            faults.seed_faults(from_environment=True)
            ledger.release_abandoned_claims()
        for method in _METHODS:
            self.mock.add_callback(method, _STUB_URL_RE, callback=self._answer)
        # Everything else (the webhook receiver, a real sandbox process, a test's own server) goes to the network.
        self.mock.add_passthru(re.compile(r".*"))
        self.mock.start()
        self._started.set()
        return self

    def stop(self) -> None:
        # The settings stay cached: the sandbox's webhook thread (a daemon, with no way to stop it) polls
        # until the process exits, and must go on reading this stub's ledger, not a default one in var/.
        if self._started.is_set():
            self.mock.stop()
            self.mock.reset()
            self._started.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def forget_calls(self) -> None:
        """The mock records every call; a long session need not keep them."""
        self.mock.calls.reset()

    def _answer(self, request: requests.PreparedRequest):
        environ = _environ(request)
        future = self._pool.submit(_call_application, environ)
        try:
            return future.result(timeout=_read_timeout(request))
        except FutureTimeout:
            # The sandbox carries on, as a server does after its client hung up.
            raise requests.ReadTimeout(f"stubbed sandbox: no answer within the read timeout ({request.url})") from None


def _read_timeout(request: requests.PreparedRequest) -> float | None:
    timeout = getattr(request, "req_kwargs", {}).get("timeout")
    if isinstance(timeout, tuple):
        return timeout[1]
    return timeout


def _environ(request: requests.PreparedRequest) -> dict:
    parts = urlsplit(request.url or "")
    body = request.body or b""
    if isinstance(body, str):
        body = body.encode()
    elif not isinstance(body, bytes):
        body = b"".join(body)
    environ = {
        "REQUEST_METHOD": request.method or "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote(parts.path) or "/",
        "QUERY_STRING": parts.query,
        "SERVER_NAME": parts.hostname or "sandbox.invalid",
        "SERVER_PORT": str(parts.port or 80),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_LENGTH": str(len(body)),
        "CONTENT_TYPE": request.headers.get("Content-Type", ""),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": parts.scheme or "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in request.headers.items():
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            environ[f"HTTP_{key}"] = value
    return environ


def _call_application(environ: dict) -> tuple[int, dict[str, str], bytes]:
    from sandbox.app import application

    answer: dict = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info=None):
        answer["status"] = int(status.split(" ", 1)[0])
        answer["headers"] = headers

    body = b"".join(application(environ, start_response))
    # responses sets Content-Length itself from the body.
    headers = {name: value for name, value in answer["headers"] if name.lower() != "content-length"}
    return answer["status"], headers, body
