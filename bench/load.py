"""HTTP load for the bench: client threads, each on its own keep-alive connection (http.client).

http.client rather than requests: on a two-core machine the client shares the CPU with the
server, and the lighter the client, the less it flattens the difference between the
ceiling and the order API. Both are driven by the same code.
"""

import http.client
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import numpy

from bench.sample import Sample

# (thread index, request number) -> (body, headers)
RequestMaker = Callable[[int, int], tuple[bytes, dict[str, str]]]


class _Connection:
    """One keep-alive connection; reconnects once when the server closed it (gunicorn's max_requests)."""

    def __init__(self, base_url: str):
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname, parts.port
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        self.reconnects = 0

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        for attempt in range(2):
            try:
                self.conn.request("POST", path, body=body, headers=headers)
                response = self.conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
                self.reconnects += 1
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


def _drive(base_url: str, path: str, make_request: RequestMaker, *, threads: int, next_due) -> list[Sample]:
    """Run `threads` clients; each takes the next request number and its due time from next_due() until None."""
    samples: list[Sample] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(index: int) -> None:
        connection = _Connection(base_url)
        mine = []
        try:
            while (ticket := next_due()) is not None:
                number, due = ticket
                if due is not None and (delay := due - time.monotonic()) > 0:
                    time.sleep(delay)
                body, headers = make_request(index, number)
                sent_at = time.time()
                began = time.perf_counter()
                status, answer = connection.post(path, body, headers)
                mine.append(Sample(sent_at, time.perf_counter() - began, status, answer))
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
            errors.append(exc)
        finally:
            connection.close()
            with lock:
                samples.extend(mine)

    workers = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return sorted(samples, key=lambda sample: sample.sent_at)


def _tickets(*, count: int | None = None, until: float | None = None, rate: float | None = None):
    lock = threading.Lock()
    issued = 0
    start = time.monotonic()

    def next_due():
        nonlocal issued
        with lock:
            if (count is not None and issued >= count) or (until is not None and time.monotonic() >= until):
                return None
            number = issued
            issued += 1
        return number, (start + number / rate if rate else None)

    return next_due


def closed_loop(base_url: str, path: str, make_request: RequestMaker, *, threads: int, seconds: float) -> list[Sample]:
    """Every client sends its next request as soon as the last one is answered, for `seconds`."""
    return _drive(base_url, path, make_request, threads=threads, next_due=_tickets(until=time.monotonic() + seconds))


def burst(base_url: str, path: str, make_request: RequestMaker, *, threads: int, count: int) -> list[Sample]:
    """`count` requests, back to back on every client."""
    return _drive(base_url, path, make_request, threads=threads, next_due=_tickets(count=count))


def paced(
    base_url: str, path: str, make_request: RequestMaker, *, threads: int, rate: float, count: int
) -> list[Sample]:
    """`count` requests at `rate` per second, each due at a fixed time (open loop) and sent by any free client."""
    return _drive(base_url, path, make_request, threads=threads, next_due=_tickets(count=count, rate=rate))


def percentiles_ms(seconds, points=(50, 95, 99)) -> dict[str, float]:
    """{"p50": ..., "p95": ...} in milliseconds, rounded to 0.01 ms; empty input gives None values."""
    values = numpy.asarray(list(seconds), dtype=float)
    if not values.size:
        return {f"p{point}": None for point in points}
    return {f"p{point}": round(float(numpy.percentile(values, point)) * 1000, 2) for point in points}
