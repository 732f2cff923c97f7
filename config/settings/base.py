"""Settings for every environment, read from the process environment (config/settings/env.py).

With nothing set, the site runs on a SQLite file and kombu's filesystem
transport under ./var, so `make run` needs no server. Set DATABASE_URL and
REDIS_URL to run on PostgreSQL and Redis. By concern: security.py, logging.py and celery.py
(Celery, the outbox, time limits), all read here; test.py overrides for the suite.
"""

from datetime import timedelta
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from .env import *  # noqa: F403
from .env import BASE_DIR, DEBUG, VAR_DIR, env

# --- Core -------------------------------------------------------------------

# A missing key is tolerated only while debugging; production refuses to start.
_DEV_SECRET_KEY = "insecure-dev-only-key-do-not-use-in-production"  # noqa: S105 (refused below unless DEBUG)
SECRET_KEY = env.str("SECRET_KEY", default=_DEV_SECRET_KEY if DEBUG else "")
if not DEBUG and (not SECRET_KEY or SECRET_KEY == _DEV_SECRET_KEY or len(SECRET_KEY) < 50):
    raise ImproperlyConfigured("SECRET_KEY must be set to a random value of at least 50 characters when DEBUG is off.")

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "ninja",
    "django_prometheus",
    "axes",
    "csp",
    "allauth",
    "allauth.account",
    "core",
    "accounts",
    "orders",
    "payments",
    "reports",
    "notifications",
    "ops",
]

MIDDLEWARE = [
    # First and last: django-prometheus times each request across every other middleware.
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "allauth.account.middleware.AccountMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # A restarting database answers 503 + Retry-After, not 500 (ops/middleware.py).
    "ops.middleware.DatabaseUnavailableMiddleware",
    # Turns django-axes' lockout into a 429 (AXES_* below).
    "axes.middleware.AxesMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------

DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several worker processes write at once: wait for the lock instead of failing,
    # and take the write lock at BEGIN so a read never has to upgrade mid-transaction.
    DATABASES["default"]["OPTIONS"] = {"timeout": 30, "transaction_mode": "IMMEDIATE"}
else:
    # Reuse connections for a minute, and check them first so a database restart
    # costs one failed check instead of one failed request.
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Auth, i18n, static -----------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# django-axes first: it refuses a locked-out username+IP before any password is checked.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
    # Sign-in by email address or username (django-allauth's forms).
    "allauth.account.auth_backends.AuthenticationBackend",
]
# Login throttling: 5 failures for one username from one IP lock that pair out for 15 minutes
# (a 429, even with the right password); a successful login resets the count. The client IP is
# REMOTE_ADDR: behind a proxy, set AXES_CLIENT_IP_CALLABLE. https://django-axes.readthedocs.io/en/latest/4_configuration.html
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.int("AXES_COOLOFF_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
# allauth's sign-in form names its field `login` (a username or an email address) and passes it
# on as `username` or `email`: axes counts failures under whichever was typed.
AXES_USERNAME_CALLABLE = "accounts.axes.username"
LOGIN_URL = "account_login"
LOGIN_REDIRECT_URL = "orders:list"
LOGOUT_REDIRECT_URL = "account_login"

# Accounts (django-allauth): sign-up with a verified email address, sign-in by email or
# username, password reset and change. Every email it sends goes through the outbox and the
# default queue, once (ACCOUNT_ADAPTER: notifications/account_adapter.py).
ACCOUNT_ADAPTER = "notifications.account_adapter.AccountAdapter"
# Email addresses checked for length too (accounts/forms.py).
ACCOUNT_FORMS = {"signup": "accounts.forms.SignupForm", "add_email": "accounts.forms.AddEmailForm"}
ACCOUNT_LOGIN_METHODS = {"email", "username"}
ACCOUNT_SIGNUP_FIELDS = ["email*", "username*", "password1*", "password2*"]
ACCOUNT_EMAIL_VERIFICATION = "mandatory"
ACCOUNT_UNIQUE_EMAIL = True
ACCOUNT_CONFIRM_EMAIL_ON_GET = False
ACCOUNT_LOGIN_ON_EMAIL_CONFIRMATION = True
ACCOUNT_LOGOUT_ON_GET = False
ACCOUNT_LOGOUT_REDIRECT_URL = "account_login"
ACCOUNT_EMAIL_SUBJECT_PREFIX = "[Shop] "
ACCOUNT_EMAIL_CONFIRMATION_EXPIRE_DAYS = 3
# A password reset link works for an hour (Django's default is three days).
PASSWORD_RESET_TIMEOUT = 3600
ACCOUNT_PASSWORD_RESET_BY_CODE_ENABLED = False
# Failed sign-ins are django-axes' to count (AXES_* above: a 429 for the username and address);
# allauth's other limits stay (sign-ups, reset emails: 5 a minute per address, 20 per IP).
ACCOUNT_RATE_LIMITS = {"login_failed": None}
# The owner is emailed when the account's password is changed, set or reset, or an address is added, removed or
# made primary, with the address and browser it came from (through the outbox, as every email).
ACCOUNT_EMAIL_NOTIFICATIONS = True
# A reset asked for an address no account has sends nothing (the page says the same either way).
ACCOUNT_EMAIL_UNKNOWN_ACCOUNTS = False
# Links in emails point at this site; the request's host is used when it is empty.
ACCOUNT_DEFAULT_HTTP_PROTOCOL = env.str("ACCOUNT_DEFAULT_HTTP_PROTOCOL", default="http" if DEBUG else "https")

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT: Path | None = Path(env.str("STATIC_ROOT", default=str(BASE_DIR / "staticfiles")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

# Bodies above 256 KiB are refused before parsing; no legitimate order comes near it.
DATA_UPLOAD_MAX_MEMORY_SIZE = 256 * 1024

# --- Email ------------------------------------------------------------------
# EMAIL_URL picks the backend: consolemail:// (the default), filemail:// in `make run` (one
# file per email in <VAR_DIR>/emails), smtp://mailpit:1025 in compose, smtp+tls://user:pass@host:587
# in production. Tests use locmem (config/settings/test.py).
# https://django-environ.readthedocs.io/en/latest/types.html#environ-env-email-url

_EMAIL = env.email_url("EMAIL_URL", default="consolemail://")
EMAIL_BACKEND = _EMAIL["EMAIL_BACKEND"]
EMAIL_HOST = _EMAIL["EMAIL_HOST"] or "localhost"
EMAIL_PORT = _EMAIL["EMAIL_PORT"] or 25
EMAIL_HOST_USER = _EMAIL["EMAIL_HOST_USER"] or ""
EMAIL_HOST_PASSWORD = _EMAIL["EMAIL_HOST_PASSWORD"] or ""
EMAIL_USE_TLS = _EMAIL.get("EMAIL_USE_TLS", False)
EMAIL_USE_SSL = _EMAIL.get("EMAIL_USE_SSL", False)
# filemail:// (no path): one file per email in <VAR_DIR>/emails.
EMAIL_FILE_PATH = _EMAIL.get("EMAIL_FILE_PATH") or str(VAR_DIR / "emails")
# A notification is sent while its row is locked: a hung mail server must not hold
# the lock (and a worker) for long. A timeout raises and the task retries later.
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=10)
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="shop@example.com")
# The flat fee an order pays to ship to an address (the cart shows it; orders/services.place_order charges it).
SHIPPING_FEE = env.str("SHIPPING_FEE", default="4.90")

# --- Payment provider and warehouse (the sandbox in development) -------------------

PAYMENT_PROVIDER_URL = env.str("PAYMENT_PROVIDER_URL", default="http://127.0.0.1:8100")
FULFILLMENT_API_URL = env.str("FULFILLMENT_API_URL", default=PAYMENT_PROVIDER_URL)
# Connect fast, and read longer than the provider's own processing time.
PROVIDER_CONNECT_TIMEOUT = env.float("PROVIDER_CONNECT_TIMEOUT", default=3.05)
PROVIDER_READ_TIMEOUT = env.float("PROVIDER_READ_TIMEOUT", default=10.0)
# Bounds the whole call, which a per-read timeout does not; under the critical soft limit (TASK_TIME_LIMITS).
PROVIDER_CALL_DEADLINE = env.float("PROVIDER_CALL_DEADLINE", default=20.0)
_DEV_WEBHOOK_SECRET = "dev-webhook-secret"  # noqa: S105 (refused below unless DEBUG)
WEBHOOK_SECRET = env.str("WEBHOOK_SECRET", default=_DEV_WEBHOOK_SECRET if DEBUG else "")
if not DEBUG and not WEBHOOK_SECRET:
    raise ImproperlyConfigured("WEBHOOK_SECRET must be set when DEBUG is off.")
# Signed webhooks older (or newer) than this are refused, so a captured one cannot be replayed later.
WEBHOOK_TOLERANCE_SECONDS = env.int("WEBHOOK_TOLERANCE_SECONDS", default=300)

# --- Reports ------------------------------------------------------------------

# Generated report files. Private: no URL serves MEDIA_ROOT; every download goes through
# an owner-checked view. Web and the bulk worker must share this directory.
MEDIA_ROOT = Path(env.str("MEDIA_ROOT", default=str(VAR_DIR / "media")))
MEDIA_URL = "/media/"
# Report kind -> the function that builds its rows (reports.services.ReportSource).
REPORT_KINDS = {"sales": "reports.services.sales_source"}

# --- Metrics ------------------------------------------------------------------
# Web /metrics and each worker's metrics port (ops/metrics.py). Processes share their
# values through PROMETHEUS_MULTIPROC_DIR, which must be in the environment a process
# starts with (the Makefile and docker-compose.yml set it).

# When set, web /metrics answers only `Authorization: Bearer <METRICS_TOKEN>` (401 otherwise).
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
# A worker's parent process serves its pool's metrics on the port for its node name
# (`-n critical@%h` -> 9101), so the Procfile and docker-compose.yml commands stay the same.
# CELERY_METRICS_PORT overrides it for one worker; 0 serves none.
WORKER_METRICS_PORTS = {"critical": 9101, "bulk": 9102, "default": 9103}
WORKER_METRICS_PORT = env.int("CELERY_METRICS_PORT", default=None)
# Loopback for `make run`; docker-compose.yml opens it to the Prometheus container.
WORKER_METRICS_ADDR = env.str("CELERY_METRICS_ADDR", default="127.0.0.1")

# --- By concern -----------------------------------------------------------------
from .celery import *  # noqa: E402, F403
from .logging import *  # noqa: E402, F403
from .security import *  # noqa: E402, F403
