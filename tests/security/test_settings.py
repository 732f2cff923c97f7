"""Hardened settings: the deploy check is clean with production values, a weak SECRET_KEY stops the
site from starting, and every response carries the security headers."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
REAL_SECRET_KEY = "8f2c1d9e7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d8c7b6a"  # noqa: S105
PRODUCTION = {
    "DEBUG": "false",
    "SECRET_KEY": REAL_SECRET_KEY,
    "WEBHOOK_SECRET": "production-webhook-secret",
    "ALLOWED_HOSTS": "shop.example.com",
    "SECURE_SSL_REDIRECT": "true",
}


def env_example() -> dict[str, str]:
    lines = (REPO_ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.lstrip().startswith("#"))


def run_django(tmp_path: Path, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """A fresh interpreter on config.settings.base with only `env` set (not this test run's settings)."""
    clean = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": str(tmp_path),
        "VAR_DIR": str(tmp_path / "var"),
        "DJANGO_SETTINGS_MODULE": "config.settings.base",
        **env,
    }
    return subprocess.run(
        [sys.executable, *argv], cwd=REPO_ROOT, env=clean, capture_output=True, text=True, timeout=120
    )


@pytest.mark.process
@pytest.mark.parametrize("environment", ["production", ".env.example"])
def test_deploy_check_is_clean_with_debug_off(tmp_path, environment):
    # .env.example serves plain http out of the box; production behind TLS is its documented switch.
    tls = {"SECURE_SSL_REDIRECT": "true", "SECURE_COOKIES": "true"}
    env = PRODUCTION if environment == "production" else {**env_example(), **tls}
    assert env["DEBUG"] == "false"
    result = run_django(tmp_path, ["manage.py", "check", "--deploy", "--fail-level", "WARNING"], env)
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


@pytest.mark.process
@pytest.mark.parametrize(
    "secret_key",
    [None, "", "insecure-dev-only-key-do-not-use-in-production", "too-short-" + "x" * 30],
    ids=["missing", "empty", "dev-placeholder", "short"],
)
def test_site_refuses_to_start_without_a_real_secret_key(tmp_path, secret_key):
    env = {key: value for key, value in PRODUCTION.items() if key != "SECRET_KEY"}
    if secret_key is not None:
        env["SECRET_KEY"] = secret_key
    result = run_django(tmp_path, ["-c", "import django; django.setup()"], env)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "SECRET_KEY" in result.stderr


@pytest.mark.process
def test_site_starts_with_a_real_secret_key(tmp_path):
    result = run_django(tmp_path, ["-c", "import django; django.setup()"], PRODUCTION)
    assert result.returncode == 0, result.stderr


SECURITY_HEADERS_PAGES = ["/", "/accounts/login/", "/admin/login/", "/api/docs", "/api/products/", "/healthz"]


@pytest.mark.django_db
@pytest.mark.parametrize("path", SECURITY_HEADERS_PAGES)
def test_responses_carry_the_security_headers(client, path):
    response = client.get(path, secure=True)
    assert response.status_code in (200, 401), response.status_code
    directives = dict(
        (part.split()[0], part.split()[1:]) for part in response["Content-Security-Policy"].split(";") if part.strip()
    )
    assert directives["default-src"] == ["'self'"]
    assert directives["script-src"] == ["'self'"]
    assert directives["frame-ancestors"] == ["'none'"]
    assert directives["object-src"] == ["'none'"]
    assert response["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"
    assert response["X-Frame-Options"] == "DENY"


@pytest.mark.django_db
def test_hsts_is_sent_only_over_https(client):
    assert "Strict-Transport-Security" not in client.get("/accounts/login/")


# The policy allows no inline script or style: templates load static files and use no attributes that run code.
INLINE_CODE = re.compile(
    r"<script(?![^>]*\bsrc=)(?![^>]*type=\"application/json\")[^>]*>|<style\b|\sstyle=|\son[a-z]+=", re.I
)


def test_templates_hold_no_inline_script_or_style():
    templates = [
        path
        for path in REPO_ROOT.glob("**/templates/**/*.html")
        # Email bodies are no web page: mail clients need inline styles and no CSP applies.
        if ".venv" not in path.parts and "notifications" not in path.parts
    ]
    assert templates
    offenders = {
        str(path.relative_to(REPO_ROOT)): match.group(0)
        for path in templates
        if (match := INLINE_CODE.search(path.read_text()))
    }
    assert not offenders, f"inline code is refused by the Content-Security-Policy: {offenders}"
