"""The JSON API: authentication, body parsing and error shapes shared by every router."""

import json

from django.core.exceptions import RequestDataTooBig
from django.http import Http404
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.parser import Parser
from ninja.security import HttpBearer, SessionAuth

from orders import services as order_services
from orders.api import router as orders_router


class BearerToken(HttpBearer):
    def authenticate(self, request, token):
        if len(token) > 200:
            return None
        return order_services.user_for_token(token)


class ShopperSession(SessionAuth):
    """Session auth (CSRF-checked on unsafe methods) that answers with the user."""

    def authenticate(self, request, key):
        return request.user if request.user.is_authenticated else None


class JsonParser(Parser):
    """Only `application/json` bodies, decoded as strict UTF-8."""

    def parse_body(self, request):
        content_type = request.META.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise HttpError(415, "Content-Type must be application/json")
        try:
            return json.loads(request.body.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise HttpError(400, "request body is not valid UTF-8") from exc
        except json.JSONDecodeError as exc:
            raise HttpError(400, f"request body is not valid JSON: {exc.msg} at position {exc.pos}") from exc


api = NinjaAPI(
    title="Shop API",
    version="1.0.0",
    description="Orders and the catalogue. Authenticate with `Authorization: Bearer <token>` "
    "(`python manage.py issue_api_token USERNAME`) or a signed-in session.",
    auth=[BearerToken(), ShopperSession()],
    parser=JsonParser(),
    docs_url="/docs",
    openapi_url="/openapi.json",
    urls_namespace="api",
)
api.add_router("/", orders_router)


def _error(request, status: int, loc: list, msg: str):
    return api.create_response(request, {"detail": [{"loc": loc, "msg": msg}]}, status=status)


@api.exception_handler(order_services.OrderError)
def order_error(request, exc: order_services.OrderError):
    status = 409 if isinstance(exc, order_services.OrderNotCancellable) else 422
    where = "header" if exc.field == "Idempotency-Key" else "body"
    return _error(request, status, [where, exc.field], str(exc))


@api.exception_handler(ValidationError)
def validation_error(request, exc: ValidationError):
    errors = [
        {"loc": list(error.get("loc", [])), "msg": error.get("msg", "invalid"), "type": error.get("type", "")}
        for error in exc.errors
    ]
    return api.create_response(request, {"detail": errors}, status=422)


@api.exception_handler(RequestDataTooBig)
def body_too_big(request, exc):
    return _error(request, 413, ["body"], "request body is too large")


@api.exception_handler(AuthenticationError)
def unauthorized(request, exc):
    response = api.create_response(request, {"detail": "authentication required"}, status=401)
    response["WWW-Authenticate"] = "Bearer"
    return response


@api.exception_handler(Http404)
def not_found(request, exc):
    return api.create_response(request, {"detail": "not found"}, status=404)
