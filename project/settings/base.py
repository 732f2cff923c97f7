"""Settings for every environment, read from the process environment.

With nothing set, the site runs on a SQLite file and kombu's filesystem
transport under ./var, so `make run` needs no server. Set DATABASE_URL and
REDIS_URL to run on PostgreSQL and Redis.
"""

import os
from datetime import timedelta
from pathlib import Path

import environ
from csp.constants import NONE, SELF
from django.core.exceptions import ImproperlyConfigured
from kombu import Exchange, Queue

BASE_DIR = Path(__file__).resolve().parent.parent.parent
VAR_DIR = Path(environ.Env().str("VAR_DIR", default=str(BASE_DIR / "var")))

env = environ.Env()

# --- The settings `make run` chose ----------------------------------------------
# `make run` writes them (DEBUG, DATABASE_URL, REDIS_URL, EMAIL_URL, ...) to <VAR_DIR>/run.env, so a
# command in another terminal (`.venv/bin/python manage.py ...`, `.venv/bin/celery -A project ...`)
# reaches the same database and broker. A variable set in the environment wins over the file. Only a
# file of this user that no one else can write is read, since it can turn DEBUG on; images never
# hold one (.dockerignore leaves var/ out), and the test settings set RUN_ENV_FILE="" (none read).
RUN_ENV_FILE = env.str("RUN_ENV_FILE", default=str(VAR_DIR / "run.env"))
if RUN_ENV_FILE and Path(RUN_ENV_FILE).is_file():
    _run_env = Path(RUN_ENV_FILE).stat()
    if _run_env.st_uid != os.getuid() or _run_env.st_mode & 0o022:
        raise ImproperlyConfigured(f"{RUN_ENV_FILE} must belong to this user and be writable by no one else.")
    environ.Env.read_env(RUN_ENV_FILE)

# --- Core -------------------------------------------------------------------

DEBUG = env.bool("DEBUG", default=False)

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
    "core",
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
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # A restarting database answers 503 + Retry-After, not 500 (ops/middleware.py).
    "ops.middleware.DatabaseUnavailableMiddleware",
    # Turns django-axes' lockout into a 429 (AXES_* below).
    "axes.middleware.AxesMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"

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
]
# Login throttling: 5 failures for one username from one IP lock that pair out for 15 minutes
# (a 429, even with the right password); a successful login resets the count. The client IP is
# REMOTE_ADDR: behind a proxy, set AXES_CLIENT_IP_CALLABLE. https://django-axes.readthedocs.io/en/latest/4_configuration.html
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.int("AXES_COOLOFF_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "orders:list"
LOGOUT_REDIRECT_URL = "login"

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

# --- Security (production values; `check --deploy` must be clean) -------------

SESSION_COOKIE_SECURE = env.bool("SECURE_COOKIES", default=not DEBUG)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
# Behind TLS (production: the TLS lines of .env.example) set SECURE_SSL_REDIRECT=true and SECURE_COOKIES=true; then
# `manage.py check --deploy --fail-level WARNING` is clean (tests/security/test_settings.py). Off by
# default so `make run` and plain-http trials work. Calls between services stay on http: probes, the
# Prometheus scrape and the provider's webhook (signed, so its transport adds nothing; a 301 would lose it).
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$", r"^payments/webhooks/"]
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0 if DEBUG else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
SECURE_HSTS_PRELOAD = True
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
# Content-Security-Policy (django-csp): everything from this origin, no inline script or style
# (pages load static JS files; the admin and /api/docs need nothing else), no framing.
# https://django-csp.readthedocs.io/en/latest/configuration.html
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],
        "object-src": [NONE],
        "base-uri": [NONE],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    },
}

# --- Email ------------------------------------------------------------------
# EMAIL_URL picks the backend: consolemail:// (the default), filemail:// in `make run` (one
# file per email in <VAR_DIR>/emails), smtp://mailpit:1025 in compose, smtp+tls://user:pass@host:587
# in production. Tests use locmem (project/settings/test.py).
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

# --- Logging ----------------------------------------------------------------

# Every line carries the task id and order id it belongs to (project/logging.py);
# LOG_FORMAT=json writes JSON lines for a log shipper.
LOG_FORMAT = env.str("LOG_FORMAT", default="plain")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"task_context": {"()": "project.logging.TaskContextFilter"}},
    "formatters": {
        "plain": {
            "format": "%(asctime)s %(levelname)s %(name)s [task=%(task_id)s order=%(order_id)s] %(message)s",
        },
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(process)d "
            "%(task_id)s %(task_name)s %(order_id)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_FORMAT == "json" else "plain",
            "filters": ["task_context"],
        },
    },
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
}

# --- Celery -------------------------------------------------------------------
# https://docs.celeryq.dev/en/stable/userguide/configuration.html

REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        # A message unacknowledged this long is handed to another worker. It must
        # exceed the longest countdown/ETA plus the hard time limit, or a slow task
        # runs twice while the first copy is still going.
        "visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", default=3600),
        # How often a worker looks for messages whose visibility timeout has passed (those of a
        # worker that died): every interval x throttle seconds (kombu's defaults: 10 x 10).
        "unacked_restore_interval": env.int("CELERY_UNACKED_RESTORE_INTERVAL", default=10),
        "unacked_restore_throttle": env.int("CELERY_UNACKED_RESTORE_THROTTLE", default=10),
        # Fail fast when Redis is unreachable instead of hanging a request.
        "socket_timeout": 5,
        "socket_connect_timeout": 5,
        "retry_on_timeout": True,
        "health_check_interval": 25,
    }
else:
    # Filesystem transport: a broker for laptops with no server. Folders are
    # created (and wiped) by `make run`.
    BROKER_DIR = VAR_DIR / "broker"
    # The transport ignores the host; naming one spares a "No hostname was supplied" warning per connection.
    CELERY_BROKER_URL = "filesystem://localhost/"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "control_folder": str(BROKER_DIR / "control"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "store_processed": False,
    }
    # kombu's filesystem transport can hand a reader a message file its writer has not filled yet; Flower
    # then loses an inspection of the workers (an ERROR line) and makes another at the next page view.
    # Quiet here only: on Redis a failed inspection is worth a line.
    LOGGING["loggers"] = {"flower.inspector": {"level": "CRITICAL"}}

# JSON only: a pickled message could run code on the worker when decoded.
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_EVENT_SERIALIZER = "json"

# Results are never read: the state of the work lives in the tables it changes.
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None

# Queues: critical (orders, payments), bulk (reports), default (everything else).
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_QUEUES = [
    Queue(name, Exchange(name, type="direct"), routing_key=name) for name in ("critical", "bulk", "default")
]
CELERY_TASK_ROUTES = {
    "core.tasks.*": {"queue": "default", "routing_key": "default"},
    "orders.tasks.*": {"queue": "critical", "routing_key": "critical"},
    "payments.tasks.*": {"queue": "critical", "routing_key": "critical"},
    "reports.tasks.*": {"queue": "bulk", "routing_key": "bulk"},
    "notifications.tasks.*": {"queue": "default", "routing_key": "default"},
}
# More task modules for a worker to import: the e2e tests load their test-only tasks this way.
CELERY_IMPORTS = env.list("CELERY_EXTRA_IMPORTS", default=[])

# Each pool process reserves one message at a time, so a long task never holds
# others hostage in its prefetch buffer.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Recycle a pool process after this many tasks or this much resident memory (KiB),
# so leaks are bounded.
CELERY_WORKER_MAX_TASKS_PER_CHILD = 1000
CELERY_WORKER_MAX_MEMORY_PER_CHILD = 200_000
# Keep a pool process's database connection from task to task, as web workers do from request to
# request (CONN_MAX_AGE, CONN_HEALTH_CHECKS above). Unset, Celery's Django fixup closes it before and
# after every task and each task opens a new one (8 per order). Set, the fixup closes it every N tasks,
# and project/celery.py drops an expired or broken one around each task, as Django does around a request.
# Read by celery/fixups/django.py (DjangoWorkerFixup); not in the settings reference.
CELERY_DB_REUSE_MAX = CELERY_WORKER_MAX_TASKS_PER_CHILD
# Acknowledge after the task finishes, and put the message back when the pool
# process dies mid-task: a crash means redelivery, not loss. Tasks are idempotent.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# The bound on that redelivery: a task whose pool process dies on this many deliveries
# fails into the dead letters instead of looping (ops/worker.py).
TASK_MAX_WORKER_LOST = env.int("TASK_MAX_WORKER_LOST", default=3)
# Seconds the parent waits for the result of a pool process that died before calling it lost.
# https://docs.celeryq.dev/en/stable/userguide/configuration.html#worker-lost-wait
CELERY_WORKER_LOST_WAIT = env.float("CELERY_WORKER_LOST_WAIT", default=10.0)
# Celery's consumer, except that a body that fails to decode is reported like the other
# refused messages (task_rejected, so it reaches the dead letters), and a message that would
# stop the worker (undecoded content type, JSON that is not [args, kwargs, embed]) is refused
# instead (ops/worker.py).
# https://docs.celeryq.dev/en/stable/userguide/configuration.html#worker-consumer
CELERY_WORKER_CONSUMER = "ops.worker:DeadLetterConsumer"
# When the broker connection drops (a Redis blip), tasks that are running finish, and their late
# ack reaches Redis over a new connection (project/broker.py): the work is done once, at once.
# Cancelling them instead would leave their messages in Redis's unacked index until the
# visibility timeout (an hour), because the worker cannot restore them over the lost connection.
# https://docs.celeryq.dev/en/stable/userguide/configuration.html#worker-cancel-long-running-tasks-on-connection-loss
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Publishing from a web request: give up after about two seconds so the request
# answers; the outbox relay publishes what was not published.
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 1,
}

# Workers log through Django's LOGGING (above), so task lines carry the task and order ids.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# Workers send events so Flower can show tasks live.
CELERY_WORKER_SEND_TASK_EVENTS = True
CELERY_TASK_SEND_SENT_EVENT = True

CELERY_TIMEZONE = "UTC"
# Touches <schedule file>.heartbeat at every tick, for beat's healthcheck (project/beat.py).
CELERY_BEAT_SCHEDULER = "project.beat:HeartbeatScheduler"
# Beat's state (when each entry last ran) in the process's own VAR_DIR, so no command line has to
# spell the path (a Procfile or compose `${VAR_DIR}` would be filled in from the caller's shell).
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {
    # Publishes what the fast path after commit did not (broker down at commit, process died),
    # and what the broker lost. The only sweep: every piece of work is an outbox item (core/outbox.py).
    # Expires: a relay message that waited longer than its interval is dropped; the next one covers it.
    "relay-outbox": {
        "task": "core.tasks.relay_outbox",
        "schedule": env.float("OUTBOX_RELAY_SECONDS", default=5.0),
        "options": {"expires": env.float("OUTBOX_RELAY_SECONDS", default=5.0) * 2},
    },
    # Fan out the charges of subscriptions whose next period has started.
    "bill-due-subscriptions": {
        "task": "payments.tasks.bill_due_subscriptions",
        "schedule": env.float("BILLING_SWEEP_SECONDS", default=300.0),
    },
    # Compare the shop's payments with the provider's ledger, as shops do daily (payments/reconciliation.py).
    "reconcile-payments": {
        "task": "payments.tasks.reconcile_payments",
        "schedule": timedelta(days=1),
    },
}

# --- The outbox (core/outbox.py) ----------------------------------------------------

# The relay leaves a new item to the fast path after commit for this long: longer than a publish
# to an unreachable broker takes to give up (CELERY_TASK_PUBLISH_RETRY_POLICY x socket timeouts).
OUTBOX_FAST_PATH_GRACE_SECONDS = env.float("OUTBOX_FAST_PATH_GRACE_SECONDS", default=30.0)
# Reconciliation leaves a processing payment this young alone: its charge may still be on its way.
RECONCILIATION_GRACE_SECONDS = env.int("RECONCILIATION_GRACE_SECONDS", default=3 * 3600)
# A published item not finished this long after its publish is looked for on the broker (queues and
# unacknowledged messages); if the broker no longer holds its message, it is published again.
OUTBOX_LOST_AFTER_SECONDS = env.int("OUTBOX_LOST_AFTER_SECONDS", default=900)
# An item a relay run has claimed is left alone by other runs for this long.
OUTBOX_CLAIM_SECONDS = env.float("OUTBOX_CLAIM_SECONDS", default=60.0)
# Publishes per item before it ends failed with a dead letter. A broker outage costs none.
OUTBOX_MAX_ATTEMPTS = env.int("OUTBOX_MAX_ATTEMPTS", default=10)
# Delay between attempts to publish while the broker is unreachable: base x 2^n, capped, jittered.
OUTBOX_BACKOFF_BASE_SECONDS = env.float("OUTBOX_BACKOFF_BASE_SECONDS", default=2.0)
OUTBOX_BACKOFF_MAX_SECONDS = env.float("OUTBOX_BACKOFF_MAX_SECONDS", default=60.0)
# A paid order whose hand-over to the warehouse failed all its retries is on hold and tried again
# this much later, by itself, until OUTBOX_MAX_ATTEMPTS rounds are spent.
FULFILLMENT_RESUME_SECONDS = env.float("FULFILLMENT_RESUME_SECONDS", default=600.0)
# The same for a provider event whose processing failed all its retries (the provider's API away).
WEBHOOK_RESUME_SECONDS = env.float("WEBHOOK_RESUME_SECONDS", default=300.0)
# The same for an email whose sends failed all their retries (the mail server down for long).
NOTIFICATION_RESUME_SECONDS = env.float("NOTIFICATION_RESUME_SECONDS", default=600.0)

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
# generate_report's time limits in seconds, read when the worker starts: the soft limit
# marks the report failed ("timeout"), the hard one kills a task that ignores the soft one.
# https://docs.celeryq.dev/en/stable/userguide/workers.html#time-limits
REPORT_SOFT_TIME_LIMIT = env.int("REPORT_SOFT_TIME_LIMIT", default=300)
REPORT_TIME_LIMIT = env.int("REPORT_TIME_LIMIT", default=360)
if not 0 < REPORT_SOFT_TIME_LIMIT < REPORT_TIME_LIMIT:
    raise ImproperlyConfigured("REPORT_SOFT_TIME_LIMIT must be positive and below REPORT_TIME_LIMIT.")

# (soft, hard) time limits in seconds for every task of a queue that sets none of its own
# (project/celery.py: QueueTimeLimits). The soft limit raises SoftTimeLimitExceeded in the task;
# the hard one kills its pool process. Each provider or warehouse call has a deadline of its own
# (PROVIDER_CALL_DEADLINE), shorter than the critical soft limit, so a slow peer is a retryable
# error, not a killed process. Email sends are bounded by EMAIL_TIMEOUT.
TASK_TIME_LIMITS = {
    "critical": (env.int("CRITICAL_SOFT_TIME_LIMIT", default=60), env.int("CRITICAL_TIME_LIMIT", default=90)),
    "default": (env.int("DEFAULT_SOFT_TIME_LIMIT", default=30), env.int("DEFAULT_TIME_LIMIT", default=60)),
    "bulk": (REPORT_SOFT_TIME_LIMIT, REPORT_TIME_LIMIT),
}
for _queue, (_soft, _hard) in TASK_TIME_LIMITS.items():
    if not 0 < _soft < _hard:
        raise ImproperlyConfigured(f"the soft time limit of queue {_queue} must be positive and below its hard limit.")
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
