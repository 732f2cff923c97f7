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
