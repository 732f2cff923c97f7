"""The JSON API: authentication, body parsing and error shapes shared by every router."""

import json
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.openapi.schema import OpenAPISchema
from ninja.parser import Parser
from ninja.security import HttpBearer, SessionAuth

from accounts import services as account_services
from core.errors import ApplicationError
from integrations.errors import ProviderUnavailable
from orders.api import router as orders_router


class BearerToken(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str) -> Any | None:
        if len(token) > 200:
            return None
        return account_services.user_for_token(token)


class InputError(Exception):
    """Bad request input, answered as `{"detail": [{"loc": loc, "msg": msg}]}` with the given status."""

    def __init__(self, status: int, loc: list[str], msg: str) -> None:
        self.status = status
        self.loc = loc
        self.msg = msg
        super().__init__(msg)


class ShopperSession(SessionAuth):
    """Session auth (CSRF-checked on unsafe methods) that answers with the user.

    Consulted only when a user is signed in: otherwise ninja's CSRF check would run
    first and answer a client without credentials with 403 instead of 401.
    """

    def __call__(self, request: HttpRequest) -> Any | None:
        if not request.user.is_authenticated:
            return None
        try:
            return super().__call__(request)
        except HttpError as exc:
            raise InputError(403, ["header", "X-CSRFToken"], "CSRF token missing or incorrect") from exc

    def authenticate(self, request: HttpRequest, key: str | None) -> Any | None:
        return request.user if request.user.is_authenticated else None


class JsonParser(Parser):
    """Only `application/json` bodies, decoded as strict UTF-8."""

    def parse_body(self, request: HttpRequest) -> Any:
        content_type = request.META.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise InputError(415, ["header", "Content-Type"], "Content-Type must be application/json")
        try:
            text = request.body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(400, ["body"], "request body is not valid UTF-8") from exc
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(400, ["body"], f"request body is not valid JSON: {exc.msg} at position {exc.pos}") from exc
        except (ValueError, RecursionError) as exc:
            # Python's own limits: integers over 4300 digits, nesting deeper than the recursion limit.
            raise InputError(400, ["body"], "request body is not valid JSON: it exceeds the parser's limits") from exc


ERROR_SCHEMA = {
    "title": "Error",
    "type": "object",
    "properties": {
        "detail": {
            "anyOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"loc": {"type": "array"}, "msg": {"type": "string"}},
                        "required": ["loc", "msg"],
                    },
                },
            ]
        }
    },
    "required": ["detail"],
}
UNSAFE_METHODS = {"post", "put", "patch", "delete"}


def shared_errors(method: str, operation: dict[str, Any]) -> dict[int, str]:
    """The error answers this module gives an operation, whatever its router declares."""
    errors = {401: "No or unknown credentials"}
    parameters = operation.get("parameters", [])
    if any(parameter["in"] == "path" for parameter in parameters):
        errors[404] = "Not found, or not the caller's"
    if method in UNSAFE_METHODS:
        errors[403] = "Session without a valid CSRF token"
    if "requestBody" in operation:
        errors[400] = "Body is not valid UTF-8 JSON"
        errors[413] = "Body is larger than 256 KiB"
        errors[415] = "Content-Type is not application/json"
    if parameters or "requestBody" in operation:
        errors[422] = "Invalid input; `detail` names each field"
    return errors


class ShopAPI(NinjaAPI):
    """NinjaAPI whose schema also declares the errors of the shared handlers below, so clients
    (and the schemathesis suite, tests/security/test_api_fuzz.py) know every status an operation answers."""

    def get_openapi_schema(self, **kwargs: Any) -> OpenAPISchema:
        schema = super().get_openapi_schema(**kwargs)
        schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        for operations in schema["paths"].values():
            for method, operation in operations.items():
                declared = {int(status) for status in operation["responses"]}
                for status, description in shared_errors(method, operation).items():
                    if status not in declared:
                        operation["responses"][status] = {"description": description, "content": error}
        return schema


api = ShopAPI(
    title="Shop API",
    version="1.0.0",
    description="Orders, the catalogue, saved cards and addresses. Authenticate with `Authorization: Bearer <token>` "
    "(`python manage.py issue_api_token USERNAME`) or a signed-in session.",
    auth=[BearerToken(), ShopperSession()],
    parser=JsonParser(),
    docs_url="/docs",
    openapi_url="/openapi.json",
    urls_namespace="api",
)
api.add_router("/", orders_router)
api.add_router("/", "payments.api.router")
api.add_router("/", "accounts.api.router")
api.add_router("/", "reports.api.router")


def _error(request: HttpRequest, status: int, loc: list[str], msg: str) -> HttpResponse:
    return api.create_response(request, {"detail": [{"loc": loc, "msg": msg}]}, status=status)


@api.exception_handler(InputError)
def input_error(request: HttpRequest, exc: InputError) -> HttpResponse:
    return _error(request, exc.status, exc.loc, exc.msg)


@api.exception_handler(HttpError)
def http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    # ninja wraps any body parser error in a bare HttpError(400); the parser's own error names the field.
    if isinstance(exc.__cause__, InputError):
        return input_error(request, exc.__cause__)
    return api.create_response(request, {"detail": str(exc)}, status=exc.status_code)


# Where a domain field sits in a request, when not under its own name in the JSON body.
FIELD_LOCATIONS = {
    "idempotency_key": ["header", "Idempotency-Key"],
    "payment_method": ["body", "payment_method_id"],
    "address": ["body", "address_id"],
    "card_number": ["body", "number"],
}


@api.exception_handler(ApplicationError)
def application_error(request: HttpRequest, exc: ApplicationError) -> HttpResponse:
    # The one place a domain error becomes an HTTP answer: its status and the field it names.
    loc = FIELD_LOCATIONS.get(exc.field, ["body", exc.field] if exc.field else ["body"])
    return api.create_response(
        request, {"detail": [{"loc": loc, "msg": str(exc), "type": exc.code}]}, status=exc.status
    )


@api.exception_handler(ValidationError)
def validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    errors = [
        {"loc": list(error.get("loc", [])), "msg": error.get("msg", "invalid"), "type": error.get("type", "")}
        for error in exc.errors
    ]
    return api.create_response(request, {"detail": errors}, status=422)


@api.exception_handler(RequestDataTooBig)
def body_too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    return _error(request, 413, ["body"], "request body is too large")


@api.exception_handler(AuthenticationError)
def unauthorized(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    response = _error(
        request, 401, ["header", "Authorization"], "authentication required: send `Authorization: Bearer <token>`"
    )
    response["WWW-Authenticate"] = "Bearer"
    return response


@api.exception_handler(ProviderUnavailable)
def provider_unavailable(request: HttpRequest, exc: ProviderUnavailable) -> HttpResponse:
    # Nothing was kept; the same request later may succeed.
    response = api.create_response(
        request, {"detail": "the payment provider cannot answer now; try again shortly"}, status=503
    )
    response["Retry-After"] = "5"
    return response


@api.exception_handler(Http404)
def not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
    return api.create_response(request, {"detail": "not found"}, status=404)
