"""What money paths must not be inside."""

from django.db import connection


class InsideTransaction(AssertionError):
    pass


def in_transaction() -> bool:
    """Whether the caller is inside `transaction.atomic`.

    The transaction a test case wraps around each test (Django's TestCase, pytest-django's `db`)
    is not the caller's and does not count.
    """
    callers = [block for block in connection.atomic_blocks if not getattr(block, "_from_testcase", False)]
    return connection.in_atomic_block and bool(callers)


def assert_outside_transaction(what: str) -> None:
    """Raise when called inside a transaction: a rollback after `what` would lose the record of it."""
    if in_transaction():
        raise InsideTransaction(f"{what} must run outside any transaction")
