"""Failed-renewal recovery (dunning): when a declined renewal is tried again, and when the shop gives up.

A subscription period whose charge is declined is tried again on a schedule counted from the
period's first decline: DUNNING_RETRY_DAYS (default 1, 3 and 7 days), one try per entry. A try
that is late (the sweep runs every DUNNING_SWEEP_SECONDS, a worker was down) does not push the
later ones back: the schedule stays anchored on the first decline. Each try is its own Payment
(attempt 2, 3, ...) with its own idempotency key, claimed and charged like the first
(payments/services.py: charge_subscription); the owner gets the declined email at each one, with
the date of the next try and the link to change the card. Changing the card of a past-due
subscription tries again at once (the next attempt; the schedule of the tries after it is unchanged).

After the try that follows the last delay is declined (attempt len(DUNNING_RETRY_DAYS) + 1), the
subscription is **cancelled**, not paused: nothing more is billed, the owner gets
`subscription_cancelled_unpaid` once and can subscribe again from the subscriptions page. Cancel
rather than pause because the shop has no paused state to resume from (no un-pause flow, no
partial period to bill): a cancelled subscription is one the shop and the owner already know how
to handle, and a new subscription starts a clean period. A success at any try clears the count
and moves the period on (active again).

A charge that ends without a decline (the provider refused it, or retries ran out: needs_attention)
is not a decline: it does not count as a try and is left to staff.

DUNNING_RETRY_UNIT_SECONDS (default 86 400, a day) is the length of one "day" of the schedule:
end-to-end tests set it to 1 so that the whole schedule runs in seconds.
"""

from collections.abc import Sequence
from datetime import datetime, timedelta

from django.conf import settings


def retry_schedule() -> tuple[timedelta, ...]:
    """The delays of the retries after the first decline of a period, from the settings, in order."""
    unit = settings.DUNNING_RETRY_UNIT_SECONDS
    return tuple(timedelta(seconds=days * unit) for days in settings.DUNNING_RETRY_DAYS)


def next_retry_at(
    *, first_decline_at: datetime, failed_attempts: int, schedule: Sequence[timedelta] | None = None
) -> datetime | None:
    """When the period's charge is tried next, after `failed_attempts` declines; None: give up (cancel).

    Attempt n + 1 runs `schedule[n - 1]` after the first decline while n <= len(schedule).
    """
    if failed_attempts < 1:
        raise ValueError(f"a retry follows a decline: failed_attempts must be at least 1, got {failed_attempts}")
    delays = retry_schedule() if schedule is None else tuple(schedule)
    if failed_attempts > len(delays):
        return None
    return first_decline_at + delays[failed_attempts - 1]


def is_last_attempt(attempt: int, *, schedule: Sequence[timedelta] | None = None) -> bool:
    """Whether a decline of this attempt ends the subscription (no retry follows it)."""
    delays = retry_schedule() if schedule is None else tuple(schedule)
    return attempt > len(delays)
