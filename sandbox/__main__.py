"""`python -m sandbox`: prepare the ledger, then serve the app with gunicorn's threaded worker.

Environment: SANDBOX_HOST (127.0.0.1), SANDBOX_PORT (8100), SANDBOX_DB (${VAR_DIR:-var}/sandbox.sqlite3),
SANDBOX_WORKERS (1), SANDBOX_THREADS (16), SANDBOX_LOG_LEVEL (info), the fault defaults SANDBOX_ERROR_RATE,
SANDBOX_LATENCY_MS, SANDBOX_TIMEOUT_RATE, SANDBOX_DECLINE_RATE, SANDBOX_TIMEOUT_SECONDS, and the webhook
settings SHOP_WEBHOOK_URL, WEBHOOK_SECRET, SANDBOX_WEBHOOK_MAX_ATTEMPTS, SANDBOX_WEBHOOK_RETRY_SECONDS,
SANDBOX_WEBHOOK_TIMEOUT_SECONDS.
"""

import logging
import sys
from typing import Any

from gunicorn.app.base import BaseApplication

from sandbox import db, faults, ledger, webhooks
from sandbox.config import ConfigError, Settings, get_settings

logger = logging.getLogger("sandbox")


def _start_webhook_deliverer(worker: Any) -> None:
    webhooks.deliverer.ensure_started()


class SandboxServer(BaseApplication):
    def __init__(self, options: dict[str, Any]):
        self.options = options
        super().__init__(prog="sandbox")

    def load_config(self) -> None:
        for name, value in self.options.items():
            self.cfg.set(name, value)

    def load(self) -> Any:
        from sandbox.app import application

        return application

    @classmethod
    def for_settings(cls, settings: Settings) -> "SandboxServer":
        host = f"[{settings.host}]" if ":" in settings.host and not settings.host.startswith("[") else settings.host
        return cls(
            {
                "bind": f"{host}:{settings.port}",
                "worker_class": "gthread",
                "workers": settings.workers,
                "threads": settings.threads,
                # gthread's main loop heartbeats while request threads sleep, so injected timeouts are safe;
                # a short graceful timeout keeps a stop from waiting out a sleeping "timeout" request.
                "timeout": 60,
                "graceful_timeout": 5,
                "loglevel": settings.log_level,
                "accesslog": "-",
                "proc_name": "sandbox",
                # The default control socket path is per user, shared with the shop's own gunicorn.
                "control_socket_disable": True,
                "post_worker_init": _start_webhook_deliverer,
            }
        )


def main() -> None:
    try:
        settings = get_settings()
    except ConfigError as exc:
        sys.exit(f"sandbox: {exc}")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"
    )
    current = faults.seed_faults(from_environment=True)
    # No worker runs yet, so every in-flight claim belongs to a process that died mid-request.
    abandoned = ledger.release_abandoned_claims()
    logger.info("ledger %s; faults %s; released %d abandoned claims", settings.db_path, current.as_dict(), abandoned)
    if settings.webhook_url:
        logger.info("webhooks go to %s", settings.webhook_url)
    else:
        logger.info("SHOP_WEBHOOK_URL is unset: events are recorded, not sent")
    # Workers are forked from this process; they open their own connections.
    db.close()
    SandboxServer.for_settings(settings).run()


if __name__ == "__main__":
    main()
