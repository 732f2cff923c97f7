"""Security settings: production values by default, relaxed only by DEBUG or an explicit variable."""

from csp.constants import NONE, SELF

from .env import DEBUG, env

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
