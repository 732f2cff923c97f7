"""The HTTP plumbing every client in this package shares: one Session, its timeouts and a deadline on the whole call.

requests' read timeout bounds each read, not the call: a server that sends a byte a second, or
headers and then nothing, holds the caller far past any timeout. So every call also runs against
PROVIDER_CALL_DEADLINE, from connecting to the last byte of the body. The body is read in chunks
with the deadline checked between them, and a watchdog timer shuts the connection's socket down
when the deadline passes, so a read blocked on headers or body returns at once. A call over its
deadline raises ProviderUnavailable, as a timeout does; its connection is closed, never reused.
"""

import json as jsonlib
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import requests
from django.conf import settings
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .errors import ProviderUnavailable

__all__ = ["Reply", "send"]

_CHUNK_SIZE = 16 * 1024
_TRANSIENT_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


@dataclass(frozen=True)
class Reply:
    """A whole response: the status and every byte of the body, read within the deadline."""

    status_code: int
    body: bytes

    def json(self) -> Any:
        return jsonlib.loads(self.body)

    def error(self) -> dict:
        """The `error` object of a JSON error body, or {} when there is none."""
        try:
            return self.json().get("error") or {}
        except (ValueError, AttributeError):
            return {}


class _DeadlineExceeded(Exception):
    pass


class _Call:
    """One call's deadline, and the connection it uses, so that the watchdog can cut that connection."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self._connection: HTTPConnection | None = None
        # Kept apart from the connection: http.client lets go of a "Connection: close" socket
        # (connection.sock is None) while the response still reads the body from it.
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def check(self) -> None:
        if self.expired or time.monotonic() >= self.deadline:
            raise _DeadlineExceeded

    def attach(self, connection: HTTPConnection) -> None:
        with self._lock:
            self._connection = connection
            self._sock = connection.sock or self._sock
            if self.expired:
                self._shut_down()

    def expire(self) -> None:
        """Run by the watchdog thread: any read blocked on the connection returns now."""
        with self._lock:
            self.expired = True
            self._shut_down()

    def close_connection(self) -> None:
        """Run by the calling thread once the call is over, so the pool never hands out a cut connection."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()

    def _shut_down(self) -> None:
        if self._sock is None:
            return  # not connected yet: the connect timeout is capped at the time remaining
        try:
            # socket.socket's own shutdown, also for an SSLSocket: it cuts the connection from under
            # a read blocked in another thread, which close() would not wake.
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed


_current = threading.local()


class _DeadlineConnectionMixin:
    """Tells the calling thread's _Call which connection carries it, on connect and on each request."""

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self._attach()

    def request(self, *args: Any, **kwargs: Any) -> None:
        self._attach()
        super().request(*args, **kwargs)  # type: ignore[misc]

    def _attach(self) -> None:
        call: _Call | None = getattr(_current, "call", None)
        if call is not None:
            call.attach(self)  # type: ignore[arg-type]


class _DeadlineHTTPConnection(_DeadlineConnectionMixin, HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_DeadlineConnectionMixin, HTTPSConnection):
    pass


class _DeadlineHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _DeadlineHTTPConnection


class _DeadlineHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection


_POOL_CLASSES = {"http": _DeadlineHTTPConnectionPool, "https": _DeadlineHTTPSConnectionPool}


class _DeadlineAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOL_CLASSES

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _POOL_CLASSES
        return manager


_session = requests.Session()
_session.mount("http://", _DeadlineAdapter())
_session.mount("https://", _DeadlineAdapter())


def send(method: str, url: str, *, json: dict | None = None, headers: dict | None = None) -> Reply:
    """Make one HTTP call and read the whole reply within PROVIDER_CALL_DEADLINE.

    Raises ProviderUnavailable when the service cannot be reached, a timeout passes, or the call
    does not finish by its deadline. Any status code is returned: mapping it is the client's job.
    """
    call = _Call(settings.PROVIDER_CALL_DEADLINE)
    watchdog = threading.Timer(call.remaining(), call.expire)
    watchdog.daemon = True
    _current.call = call
    watchdog.start()
    try:
        return _send(call, method, url, json=json, headers=headers)
    except _DeadlineExceeded:
        raise ProviderUnavailable(f"{method} {url}: no reply within the {call.seconds}s deadline") from None
    except requests.RequestException as exc:
        if call.expired:
            raise ProviderUnavailable(f"{method} {url}: no reply within the {call.seconds}s deadline") from exc
        if isinstance(exc, _TRANSIENT_ERRORS):
            raise ProviderUnavailable(f"{method} {url}: {type(exc).__name__}") from exc
        raise
    finally:
        watchdog.cancel()
        _current.call = None
        if call.expired:
            call.close_connection()


def _send(call: _Call, method: str, url: str, *, json: dict | None, headers: dict | None) -> Reply:
    timeouts = (
        min(settings.PROVIDER_CONNECT_TIMEOUT, call.remaining()),
        min(settings.PROVIDER_READ_TIMEOUT, call.remaining()),
    )
    with _session.request(method, url, json=json, headers=headers, timeout=timeouts, stream=True) as response:
        call.check()
        body = bytearray()
        for chunk in response.iter_content(_CHUNK_SIZE):
            body += chunk
            call.check()
        # The watchdog's shutdown can end a body without Content-Length cleanly: that is no whole reply.
        call.check()
        return Reply(response.status_code, bytes(body))
