"""Threads released together, for concurrency claims against the real PostgreSQL (and the sandbox over HTTP)."""

import threading
from collections.abc import Callable
from typing import TypeVar

from django.db import connection

T = TypeVar("T")


def run_concurrently(count: int, work: Callable[[int], T], *, timeout: float = 30) -> list[T]:
    """Run work(i) for i in range(count), each in its own thread, all released by one barrier.

    Returns the results in index order and raises the first error raised in any thread. Each thread
    closes its own database connection at the end, so none is left open to block the test database's
    teardown. A thread still running after `timeout` seconds fails the test.
    """
    barrier = threading.Barrier(count, timeout=10)
    results: list = [None] * count
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread is stuck"
    if errors:
        raise errors[0]
    return results
