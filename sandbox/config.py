"""The sandbox's settings, read once from the environment."""

import functools
import os
from dataclasses import dataclass


class ConfigError(ValueError):
    """An environment variable holds a value the sandbox cannot use."""


def _default_db_path() -> str:
    return os.path.join(os.environ.get("VAR_DIR") or "var", "sandbox.sqlite3")


def _env_float(name: str, default: float, *, minimum: float = 0.0, maximum: float | None = None) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not (value >= minimum and (maximum is None or value <= maximum)):
        bounds = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{name} must be {bounds}, got {raw!r}")
    return value


def _env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {raw!r}")
    return value


def _env_log_level() -> str:
    raw = os.environ.get("SANDBOX_LOG_LEVEL", "").strip().lower() or "info"
    if raw not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError(f"SANDBOX_LOG_LEVEL must be debug, info, warning, error or critical, got {raw!r}")
    return raw


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    db_path: str
    workers: int
    threads: int
    log_level: str
    # Initial fault injection; changed at runtime through /v1/faults.
    error_rate: float
    latency_ms: int
    timeout_rate: float
    decline_rate: float
    timeout_seconds: float
    # Webhooks back to the shop.
    webhook_url: str
    webhook_secret: str
    webhook_max_attempts: int
    webhook_retry_seconds: float
    webhook_timeout_seconds: float

    def env_faults(self) -> dict[str, float]:
        """The fault settings the environment sets explicitly (they win over stored values at start)."""
        names = {
            "SANDBOX_ERROR_RATE": "error_rate",
            "SANDBOX_LATENCY_MS": "latency_ms",
            "SANDBOX_TIMEOUT_RATE": "timeout_rate",
            "SANDBOX_DECLINE_RATE": "decline_rate",
            "SANDBOX_TIMEOUT_SECONDS": "timeout_seconds",
        }
        return {field: getattr(self, field) for env, field in names.items() if os.environ.get(env, "").strip()}


def load_settings() -> Settings:
    """Settings from the environment; raises ConfigError naming the bad variable."""
    return Settings(
        host=os.environ.get("SANDBOX_HOST", "").strip() or "127.0.0.1",
        port=_env_int("SANDBOX_PORT", 8100, minimum=0),
        db_path=os.environ.get("SANDBOX_DB", "").strip() or _default_db_path(),
        workers=_env_int("SANDBOX_WORKERS", 1, minimum=1),
        # Every injected timeout holds a thread for timeout_seconds; spare threads keep /v1/faults reachable.
        threads=_env_int("SANDBOX_THREADS", 16, minimum=1),
        log_level=_env_log_level(),
        error_rate=_env_float("SANDBOX_ERROR_RATE", 0.0, maximum=1.0),
        latency_ms=_env_int("SANDBOX_LATENCY_MS", 0),
        timeout_rate=_env_float("SANDBOX_TIMEOUT_RATE", 0.0, maximum=1.0),
        decline_rate=_env_float("SANDBOX_DECLINE_RATE", 0.0, maximum=1.0),
        # Longer than any sensible client read timeout, so a "timeout" fault is one from the client's side.
        timeout_seconds=_env_float("SANDBOX_TIMEOUT_SECONDS", 30.0, minimum=0.0, maximum=3600.0),
        webhook_url=os.environ.get("SHOP_WEBHOOK_URL", "").strip(),
        # The same default as a development shop would use; a real deployment sets WEBHOOK_SECRET on both sides.
        webhook_secret=os.environ.get("WEBHOOK_SECRET", "") or "dev-webhook-secret",
        webhook_max_attempts=_env_int("SANDBOX_WEBHOOK_MAX_ATTEMPTS", 5, minimum=1),
        webhook_retry_seconds=_env_float("SANDBOX_WEBHOOK_RETRY_SECONDS", 1.0, maximum=3600.0),
        webhook_timeout_seconds=_env_float("SANDBOX_WEBHOOK_TIMEOUT_SECONDS", 5.0, maximum=300.0),
    )


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read on first use."""
    return load_settings()
