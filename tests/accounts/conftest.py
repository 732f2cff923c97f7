import pytest
from django.core.cache import cache


@pytest.fixture(autouse=True)
def fresh_rate_limits():
    """allauth keeps its rate limits (one confirmation email per address per 3 minutes...) in the cache."""
    cache.clear()
    yield
    cache.clear()
