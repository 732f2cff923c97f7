"""The two ways a call to an outside service fails, shared by every client in this package."""


class ProviderUnavailable(ConnectionError):
    """Transient: the service could not be reached or did not finish. Retry with the same key."""


class ProviderRejected(Exception):
    """Permanent: the service refused the request. Retrying changes nothing."""
