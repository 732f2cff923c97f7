import pytest
import redis
from django.conf import settings

from project.celery import app


@pytest.fixture
def broker() -> redis.Redis:
    """The test broker, emptied, with this process publishing to it for real (eager mode off)."""
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    client.flushdb()
    was_eager = app.conf.task_always_eager
    app.conf.task_always_eager = False
    try:
        yield client
    finally:
        app.conf.task_always_eager = was_eager
        client.flushdb()
        client.close()
