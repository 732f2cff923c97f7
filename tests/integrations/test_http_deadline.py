"""The whole-call deadline and the error mapping of the provider and warehouse clients, over real sockets.

Each test starts a tiny HTTP server in a thread that answers with a script: a normal reply, a status
code, or a stall or trickle that no per-read timeout catches.
"""

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal

import pytest

from integrations.errors import ProviderRejected, ProviderUnavailable
from integrations.provider import CardDeclined, Charge, charge, retrieve_charge
from integrations.warehouse import Shipment, create_shipment

DEADLINE = 0.4
# Well above the deadline and above the gap between trickled bytes, so only the deadline can stop the call.
READ_TIMEOUT = 5.0
TRICKLE_INTERVAL = 0.05
CHARGE_BODY = {"id": "ch_1", "status": "succeeded", "amount": "12.50", "currency": "EUR", "reference": "order-1"}

Script = Callable[[socket.socket, threading.Event], None]


def _reply(status: int, body: dict, *, reason: str = "Whatever") -> tuple[bytes, bytes]:
    payload = json.dumps(body).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    return head, payload


def _read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
        0,
    )
    while len(body) < length:
        chunk = conn.recv(4096)
        if not chunk:
            return
        body += chunk


def _trickle(conn: socket.socket, data: bytes, stop: threading.Event) -> None:
    for byte in data:
        conn.sendall(bytes([byte]))
        if stop.wait(TRICKLE_INTERVAL):
            return


@contextmanager
def http_server(*scripts: Script) -> Iterator[str]:
    """Serve each request on a connection with the next script (the last one repeats); yields the base URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    served = 0
    connections: list[socket.socket] = []

    def handle(conn: socket.socket) -> None:
        nonlocal served
        with conn:
            try:
                while not stop.is_set():
                    _read_request(conn)
                    script = scripts[min(served, len(scripts) - 1)]
                    served += 1
                    script(conn, stop)
            except OSError:
                pass  # the client shut the connection down

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            connections.append(conn)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def respond(status: int, body: dict) -> Script:
    def script(conn: socket.socket, stop: threading.Event) -> None:
        head, payload = _reply(status, body)
        conn.sendall(head + payload)

    return script


def stall_before_headers(conn: socket.socket, stop: threading.Event) -> None:
    stop.wait()


def trickle_headers(conn: socket.socket, stop: threading.Event) -> None:
    head, payload = _reply(201, CHARGE_BODY)
    _trickle(conn, head + payload, stop)


def stall_after_headers(conn: socket.socket, stop: threading.Event) -> None:
    head, payload = _reply(201, CHARGE_BODY)
    conn.sendall(head + payload[:5])
    stop.wait()


def trickle_body(conn: socket.socket, stop: threading.Event) -> None:
    head, payload = _reply(201, CHARGE_BODY)
    conn.sendall(head)
    _trickle(conn, payload, stop)


def trickle_body_without_length(conn: socket.socket, stop: threading.Event) -> None:
    """A body delimited by the connection's close: cutting it short must not pass for a whole reply."""
    payload = json.dumps(CHARGE_BODY).encode()
    conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
    _trickle(conn, payload, stop)


def in_pieces(conn: socket.socket, stop: threading.Event) -> None:
    head, payload = _reply(201, CHARGE_BODY)
    for start in range(0, len(payload), 20):
        conn.sendall((head if start == 0 else b"") + payload[start : start + 20])
        stop.wait(0.01)


@pytest.fixture(autouse=True)
def short_deadline(settings):
    settings.PROVIDER_CALL_DEADLINE = DEADLINE
    settings.PROVIDER_CONNECT_TIMEOUT = READ_TIMEOUT
    settings.PROVIDER_READ_TIMEOUT = READ_TIMEOUT


@pytest.fixture
def provider_at(settings):
    @contextmanager
    def serve(*scripts: Script) -> Iterator[str]:
        with http_server(*scripts) as url:
            settings.PAYMENT_PROVIDER_URL = url
            settings.FULFILLMENT_API_URL = url
            yield url

    return serve


def charge_once() -> Charge:
    return charge(amount=Decimal("12.50"), currency="EUR", reference="order-1", idempotency_key="order-1")


@pytest.mark.parametrize(
    "script", [stall_before_headers, trickle_headers, stall_after_headers, trickle_body, trickle_body_without_length]
)
def test_a_call_that_does_not_finish_by_the_deadline_is_unavailable(provider_at, script):
    with provider_at(script):
        started = time.monotonic()
        with pytest.raises(ProviderUnavailable, match="deadline"):
            charge_once()
        elapsed = time.monotonic() - started

    print(f"{script.__name__}: ProviderUnavailable after {elapsed:.3f}s (deadline {DEADLINE}s)")
    assert DEADLINE - 0.1 <= elapsed < DEADLINE + 2


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: retrieve_charge(charge_id="ch_1"), id="retrieve_charge"),
        pytest.param(
            lambda: create_shipment(order_id=1, items=[{"sku": "MUG", "quantity": 1}], idempotency_key="shipment-1"),
            id="create_shipment",
        ),
    ],
)
def test_every_client_call_is_bounded_by_the_deadline(provider_at, call):
    with provider_at(trickle_body):
        started = time.monotonic()
        with pytest.raises(ProviderUnavailable, match="deadline"):
            call()
        elapsed = time.monotonic() - started

    print(f"trickle_body: ProviderUnavailable after {elapsed:.3f}s (deadline {DEADLINE}s)")
    assert elapsed < DEADLINE + 2


def test_a_normal_reply_is_a_charge(provider_at):
    with provider_at(respond(201, CHARGE_BODY)):
        assert charge_once() == Charge(
            id="ch_1", status="succeeded", amount=Decimal("12.50"), currency="EUR", reference="order-1"
        )


def test_a_reply_that_arrives_in_pieces_within_the_deadline_is_whole(provider_at):
    with provider_at(in_pieces):
        assert charge_once().id == "ch_1"


def test_the_connection_after_an_expired_call_is_not_reused_half_read(provider_at):
    with provider_at(stall_after_headers, respond(201, CHARGE_BODY)):
        with pytest.raises(ProviderUnavailable):
            charge_once()
        assert charge_once().id == "ch_1"


def test_a_warehouse_reply_is_a_shipment(provider_at):
    with provider_at(respond(201, {"id": "sh_1", "status": "created"})):
        shipment = create_shipment(order_id=1, items=[{"sku": "MUG", "quantity": 1}], idempotency_key="shipment-1")
    assert shipment == Shipment(id="sh_1", status="created")


def test_a_refused_connection_is_unavailable(settings):
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    settings.PAYMENT_PROVIDER_URL = f"http://127.0.0.1:{port}"

    started = time.monotonic()
    with pytest.raises(ProviderUnavailable):
        charge_once()
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("status", [409, 500, 502, 503])
def test_same_key_in_flight_and_server_errors_are_unavailable(provider_at, status):
    with provider_at(respond(status, {"error": {"type": "api_error"}})), pytest.raises(ProviderUnavailable):
        charge_once()


def test_payment_required_is_a_decline_with_the_charge_and_reason(provider_at):
    declined = {"error": {"type": "insufficient_funds", "charge": {"id": "ch_9"}}}
    with provider_at(respond(402, declined)), pytest.raises(CardDeclined) as raised:
        charge_once()
    assert (raised.value.charge_id, raised.value.reason) == ("ch_9", "insufficient_funds")


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_other_client_errors_are_rejected_for_good(provider_at, status):
    rejected = {"error": {"type": "invalid_request"}}
    with provider_at(respond(status, rejected)), pytest.raises(ProviderRejected) as raised:
        charge_once()
    assert not isinstance(raised.value, CardDeclined)


@pytest.mark.parametrize(("status", "error"), [(500, ProviderUnavailable), (404, ProviderRejected)])
def test_retrieve_charge_maps_server_errors_to_unavailable_and_client_errors_to_rejected(provider_at, status, error):
    with provider_at(respond(status, {"error": {"type": "x"}})), pytest.raises(error):
        retrieve_charge(charge_id="ch_1")


@pytest.mark.parametrize(
    ("status", "error"), [(409, ProviderUnavailable), (503, ProviderUnavailable), (400, ProviderRejected)]
)
def test_create_shipment_maps_errors_like_the_provider(provider_at, status, error):
    with provider_at(respond(status, {"error": {"type": "x"}})), pytest.raises(error):
        create_shipment(order_id=1, items=[], idempotency_key="shipment-1")


def test_one_watchdog_thread_serves_every_call_and_a_finished_call_is_never_cut(provider_at, settings):
    # Many quick calls under a deadline shorter than the test: each would have started a timer thread before.
    # One second each: a local call takes milliseconds, and a starved machine must not cut one.
    settings.PROVIDER_CALL_DEADLINE = 1.0
    with provider_at(respond(201, CHARGE_BODY)):
        for _ in range(20):
            assert charge_once().id == "ch_1"
        time.sleep(1.2)  # every deadline of those calls has passed: none may cut the pooled connection now
        assert charge_once().id == "ch_1"
    watchdogs = [thread for thread in threading.enumerate() if thread.name == "http-deadline-watchdog"]
    assert len(watchdogs) == 1


@pytest.mark.process
def test_a_forked_process_has_a_watchdog_of_its_own(provider_at):
    import os

    # A prefork pool process inherits no thread: its calls must still end at their deadline.
    with provider_at(respond(201, CHARGE_BODY), stall_before_headers):
        charge_once()  # this process's watchdog runs
        pid = os.fork()
        if pid == 0:  # the child: a stalled call, which only the watchdog ends
            code = 1
            try:
                started = time.monotonic()
                charge_once()
            except ProviderUnavailable:
                code = 0 if time.monotonic() - started < DEADLINE + 2 else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
