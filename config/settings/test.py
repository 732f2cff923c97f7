"""Test settings: the real PostgreSQL and Redis, eager Celery for service tests.

Queue behaviour (routing, retries, redelivery) is tested against a real worker
process, which switches eager mode off for the test that needs it.
"""

import os

os.environ.setdefault("SECRET_KEY", "test-only-" + "k" * 60)
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/shop")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("WEBHOOK_SECRET", "test-webhook-secret")
# Never the settings of a `make run` in this checkout (var/run.env, config/settings/env.py).
os.environ.setdefault("RUN_ENV_FILE", "")
# Each pytest-xdist process (gw0, gw1, ...) on a Redis database of its own (15, 14, ...): the `broker` fixture
# flushes its database before and after a test. Written back to the environment, so processes a test starts
# without naming a broker land on the same one (marked done there, so one that loads these settings again
# does not move once more).
_xdist_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _xdist_worker.startswith("gw") and os.environ.get("TEST_REDIS_DB_OF") != _xdist_worker:
    os.environ["TEST_REDIS_DB_OF"] = _xdist_worker
    from urllib.parse import urlsplit

    _redis = urlsplit(os.environ["REDIS_URL"])
    _db = (int(_redis.path.strip("/") or 0) - int(_xdist_worker.removeprefix("gw"))) % 16
    os.environ["REDIS_URL"] = _redis._replace(path=f"/{_db}").geturl()

from .base import *  # noqa: E402,F403

# The seed's advice for service tests: run tasks in-process and re-raise their errors.
CELERY_TASK_ALWAYS_EAGER = True
CELERY_TASK_EAGER_PROPAGATES = True

# Fast hashing: tests create many users.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
SESSION_COOKIE_SECURE = False
CSRF_COOKIE_SECURE = False
# Static files come from the finders; no collectstatic before tests.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = True
STATIC_ROOT = None

# Tests need no durability: a commit need not wait for the disk (PostgreSQL's synchronous_commit).
DATABASES["default"].setdefault("OPTIONS", {})["options"] = "-c synchronous_commit=off"  # noqa: F405
