"""The two ways a call to an outside service fails, shared by every client in this package."""


class ProviderUnavailable(ConnectionError):
    """Transient: the service could not be reached or did not finish. Retry with the same key."""


class ProviderRejected(Exception):
    """Permanent: the service refused the request. Retrying changes nothing."""


# Answers that say "not now" rather than "no": a timeout, the same key in flight, too early, a rate
# limit. Retried like an unreachable service; every 5xx too.
TRANSIENT_STATUSES = frozenset({408, 409, 425, 429})


def is_transient(status_code: int) -> bool:
    return status_code in TRANSIENT_STATUSES or status_code >= 500
