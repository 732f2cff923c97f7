"""Report kinds that misbehave under time limits, registered only in test settings (REPORT_KINDS).

They stand in for the ways real generation code can overrun: slow work the soft limit
interrupts, and code that swallows SoftTimeLimitExceeded (a broad `except`, a retry
loop) so that only the hard limit stops it. Production settings never name them.
"""

import time

from celery.exceptions import SoftTimeLimitExceeded

from reports.services import ReportSource

# Long enough to outlast any limit the tests set, short enough that a broken limit fails the test instead of hanging.
OVERRUN_SECONDS = 30


def sleeps_past_soft_limit(report) -> ReportSource:
    """One row, then a long sleep that the soft time limit interrupts."""

    def rows():
        yield ("first row",)
        time.sleep(OVERRUN_SECONDS)
        yield ("after the sleep",)

    return ReportSource(header=("value",), total=2, rows=rows())


def ignores_soft_limit(report) -> ReportSource:
    """One row, then a loop that swallows SoftTimeLimitExceeded: only the hard limit ends it."""

    def rows():
        yield ("first row",)
        deadline = time.monotonic() + OVERRUN_SECONDS
        while time.monotonic() < deadline:
            try:
                time.sleep(0.05)
            except SoftTimeLimitExceeded:
                continue
        yield ("after the loop",)

    return ReportSource(header=("value",), total=2, rows=rows())


def soft_limit_after_first_row(report) -> ReportSource:
    """For in-process tests: the soft limit as it arrives mid-report, without waiting for it."""

    def rows():
        yield ("first row",)
        raise SoftTimeLimitExceeded()

    return ReportSource(header=("value",), total=2, rows=rows())


def broken(report) -> ReportSource:
    """A bug in a kind: fails after the first row."""

    def rows():
        yield ("first row",)
        raise ZeroDivisionError("a bug")

    return ReportSource(header=("value",), total=2, rows=rows())


FAULT_KINDS = {
    name: f"{__name__}.{name}"
    for name in ("sleeps_past_soft_limit", "ignores_soft_limit", "soft_limit_after_first_row", "broken")
}
