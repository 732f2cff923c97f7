"""Celery (the CELERY_ namespace that config/celery.py loads), the outbox, and every queue's time limits."""

from datetime import timedelta

from django.core.exceptions import ImproperlyConfigured
from kombu import Exchange, Queue

from .env import VAR_DIR, env
from .logging import LOGGING

# --- Celery -------------------------------------------------------------------
# https://docs.celeryq.dev/en/stable/userguide/configuration.html

REDIS_URL = env.str("REDIS_URL", default="")
# CELERY_BROKER_URL=amqp://user:password@host:5672/vhost runs the whole service on RabbitMQ (several nodes:
# their URLs joined by ";", tried in turn). Unset: Redis at REDIS_URL, else the filesystem broker of `make run`.
# Lower case: not a setting of its own. (Named BROKER_URL, Celery's `conf` remote command, which Flower sends,
# read it as a broker URL: an empty one logged "No hostname was supplied" in every worker.)
_amqp_url = env.str("CELERY_BROKER_URL", default="")
if _amqp_url and not _amqp_url.startswith(("amqp://", "amqps://", "pyamqp://")):
    raise ImproperlyConfigured("CELERY_BROKER_URL must be an amqp:// URL (RabbitMQ); set REDIS_URL for Redis.")
# Which broker the service runs on: "rabbitmq", "redis" or "filesystem". Guards that exist for one broker only
# read it: core/broker.py (Redis), the outbox's search of the broker and its epoch key (Redis), the per-queue
# arguments below and the dead-letter queue's consumer (RabbitMQ, ops/rabbitmq.py).
BROKER_KIND = "rabbitmq" if _amqp_url else "redis" if REDIS_URL else "filesystem"

# The delivery limit of every task queue on RabbitMQ: a message delivered this many times more than once
# (its worker died, or lost its connection, each time) goes to the dead-letter exchange and from there to the
# ops dead letters. Above the worker-lost bound of one worker (TASK_MAX_WORKER_LOST) plus room for innocent
# redeliveries (a node lost, a worker killed while it held the message), so those never dead-letter good work.
RABBITMQ_DELIVERY_LIMIT = env.int("RABBITMQ_DELIVERY_LIMIT", default=5)
# RabbitMQ closes the channel of a consumer that holds a message unacknowledged this long (rabbitmq.conf:
# consumer_timeout, in ms; 1800000 by default). Tasks acknowledge late, so it must exceed the longest hard
# time limit (checked below). Countdowns do not count: on quorum queues they wait in the broker (Celery's
# native delayed delivery), not in a worker. The compose override and the test nodes set this value.
RABBITMQ_CONSUMER_TIMEOUT_SECONDS = env.int("RABBITMQ_CONSUMER_TIMEOUT_SECONDS", default=1800)
# Where every dead-lettered message goes: a fanout exchange and one quorum queue behind it (ops/rabbitmq.py).
DEAD_LETTER_EXCHANGE = "shop.dead-letter"
DEAD_LETTER_QUEUE = "shop.dead-letter"

CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object]
if BROKER_KIND == "rabbitmq":
    CELERY_BROKER_URL = _amqp_url
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        # Publisher confirms: a publish returns once the broker has stored the message (on a quorum queue: on a
        # majority of its nodes), and raises when it refuses it. The outbox marks an item published only then.
        "confirm_publish": True,
    }
    # Quorum queues hold no global QoS: the worker sets its prefetch per consumer (the default, made explicit).
    CELERY_WORKER_DETECT_QUORUM_QUEUES = True
    # Countdowns and retries wait in the broker's delayed-delivery queues, quorum queues too.
    CELERY_BROKER_NATIVE_DELAYED_DELIVERY_QUEUE_TYPE = "quorum"
elif BROKER_KIND == "redis":
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
QUEUE_NAMES = ("critical", "bulk", "default")


def task_queues(kind: str, delivery_limit: int | None = None) -> list[Queue]:
    """The three task queues as declared on a broker of this kind (tests switch brokers with it).

    On RabbitMQ a queue's arguments are fixed when it is first declared: every process must declare it alike
    (a web process with another delivery limit than the workers' gets PRECONDITION_FAILED). Changing one
    means deleting the queue, or overriding it with a policy (`rabbitmqctl set_policy`).
    """
    if kind != "rabbitmq":
        return [
            Queue(name, Exchange(name, type="direct"), routing_key=name) for name in ("critical", "bulk", "default")
        ]
    # Quorum queues: each message is replicated on a majority of the cluster's nodes and survives a node lost.
    # Topic exchanges (routed like direct ones here), because Celery's native delayed delivery, which keeps
    # countdowns in the broker, works only for topic and fanout exchanges.
    return [
        Queue(
            name,
            Exchange(name, type="topic"),
            routing_key=name,
            queue_arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": RABBITMQ_DELIVERY_LIMIT if delivery_limit is None else delivery_limit,
                "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
                # Dead-lettered messages are kept until the dead-letter queue confirms them (needs reject-publish).
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
        for name in QUEUE_NAMES
    ]


CELERY_TASK_QUEUES = task_queues(BROKER_KIND)
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
# and config/celery.py drops an expired or broken one around each task, as Django does around a request.
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
# ack reaches Redis over a new connection (config/broker.py): the work is done once, at once.
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

# Workers send events so Flower can show tasks live, from the moment a worker receives one. No task-sent event:
# it was a second publish (on the event exchange) beside every task's, about 40 % of a publish's time on Redis
# (bench/hops.py); what waits in a queue is its depth (/metrics, Flower's broker tab).
CELERY_WORKER_SEND_TASK_EVENTS = True
CELERY_TASK_SEND_SENT_EVENT = False

CELERY_TIMEZONE = "UTC"
# Touches <schedule file>.heartbeat at every tick, for beat's healthcheck (config/beat.py).
CELERY_BEAT_SCHEDULER = "config.beat:HeartbeatScheduler"
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
    # Delete done outbox items older than OUTBOX_KEEP_DONE_DAYS, in batches, within its time budget.
    "prune-outbox": {
        "task": "core.tasks.prune_outbox",
        "schedule": 3600.0,
        "options": {"expires": 3600.0},
    },
    # Fan out the charges of subscriptions whose next period has started.
    "bill-due-subscriptions": {
        "task": "payments.tasks.bill_due_subscriptions",
        "schedule": env.float("BILLING_SWEEP_SECONDS", default=300.0),
    },
    # Enqueue the next try of each declined renewal whose time has come (payments/dunning.py).
    "retry-due-renewals": {
        "task": "payments.tasks.retry_due_renewals",
        "schedule": env.float("DUNNING_SWEEP_SECONDS", default=300.0),
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
# A done item is deleted this many days after its task finished (beat's `prune-outbox`, hourly): the table
# keeps what is open, what failed (beside its dead letter) and this much history. At least a day: a broker's
# late verdict on a delivery that succeeded (core.outbox.task_failed_for_good) finds the done item, and
# resolves its dead letter, only while the item is kept; Redis redelivers after an hour (visibility timeout).
OUTBOX_KEEP_DONE_DAYS = env.float("OUTBOX_KEEP_DONE_DAYS", default=7.0)
if not 1 <= OUTBOX_KEEP_DONE_DAYS <= 36500:
    raise ImproperlyConfigured("OUTBOX_KEEP_DONE_DAYS must be between 1 and 36500 days.")
# Publishes per item before it ends failed with a dead letter. A broker outage costs none.
OUTBOX_MAX_ATTEMPTS = env.int("OUTBOX_MAX_ATTEMPTS", default=10)
# Delay between attempts to publish while the broker is unreachable: base x 2^n, capped, jittered.
OUTBOX_BACKOFF_BASE_SECONDS = env.float("OUTBOX_BACKOFF_BASE_SECONDS", default=2.0)
OUTBOX_BACKOFF_MAX_SECONDS = env.float("OUTBOX_BACKOFF_MAX_SECONDS", default=60.0)
# A paid order whose hand-over to the warehouse failed all its retries is on hold and tried again
# this much later, by itself, until OUTBOX_MAX_ATTEMPTS rounds are spent.
FULFILLMENT_RESUME_SECONDS = env.float("FULFILLMENT_RESUME_SECONDS", default=600.0)
# A confirmed order not paid this long after its stock was reserved expires: stock released, and a
# charge that succeeds later is refunded by itself. Timed by the outbox's next-attempt time (a row
# in the database), not a Celery countdown: on Redis a message held past the visibility timeout
# (an hour) is delivered again, and a countdown is lost with the worker that holds it.
PAYMENT_EXPIRY_SECONDS = env.float("PAYMENT_EXPIRY_SECONDS", default=1800.0)
# Dunning (payments/dunning.py): a declined renewal is tried again this many days after the first
# decline, one try per entry; after the last one declines the subscription is cancelled.
DUNNING_RETRY_DAYS = env.list("DUNNING_RETRY_DAYS", cast=float, default=[1.0, 3.0, 7.0])
# Seconds in one of those days: end-to-end tests set 1, so the whole schedule runs in seconds.
DUNNING_RETRY_UNIT_SECONDS = env.float("DUNNING_RETRY_UNIT_SECONDS", default=86400.0)
# An empty list cancels at the first decline.
_DELAYS = [0.0, *DUNNING_RETRY_DAYS]
if DUNNING_RETRY_UNIT_SECONDS <= 0 or any(_DELAYS[n + 1] <= _DELAYS[n] for n in range(len(DUNNING_RETRY_DAYS))):
    raise ImproperlyConfigured("DUNNING_RETRY_DAYS must be increasing positive days; DUNNING_RETRY_UNIT_SECONDS > 0.")
# The public address of the shop: links in emails (the dunning emails' "change your card") start with it.
# Emails are rendered by workers, which have no request to take the host from. `make run`'s by default.
SHOP_URL = env.str("SHOP_URL", default="http://127.0.0.1:8000")
# The same for a provider event whose processing failed all its retries (the provider's API away).
WEBHOOK_RESUME_SECONDS = env.float("WEBHOOK_RESUME_SECONDS", default=300.0)
# The same for an email whose sends failed all their retries (the mail server down for long).
NOTIFICATION_RESUME_SECONDS = env.float("NOTIFICATION_RESUME_SECONDS", default=600.0)

# generate_report's time limits in seconds, read when the worker starts: the soft limit
# marks the report failed ("timeout"), the hard one kills a task that ignores the soft one.
# https://docs.celeryq.dev/en/stable/userguide/workers.html#time-limits
REPORT_SOFT_TIME_LIMIT = env.int("REPORT_SOFT_TIME_LIMIT", default=300)
REPORT_TIME_LIMIT = env.int("REPORT_TIME_LIMIT", default=360)
if not 0 < REPORT_SOFT_TIME_LIMIT < REPORT_TIME_LIMIT:
    raise ImproperlyConfigured("REPORT_SOFT_TIME_LIMIT must be positive and below REPORT_TIME_LIMIT.")

# (soft, hard) time limits in seconds for every task of a queue that sets none of its own
# (config/celery.py: QueueTimeLimits). The soft limit raises SoftTimeLimitExceeded in the task;
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
if BROKER_KIND == "rabbitmq" and RABBITMQ_CONSUMER_TIMEOUT_SECONDS <= max(
    hard for _, hard in TASK_TIME_LIMITS.values()
):
    raise ImproperlyConfigured(
        "RABBITMQ_CONSUMER_TIMEOUT_SECONDS (the broker's consumer_timeout) must exceed every queue's hard time limit."
    )
