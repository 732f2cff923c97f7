"""The one error type of the domain: a rule said no, and the same call made again gets the same no.

Services raise subclasses of ApplicationError; each names its rule (`code`), the input it is
about (`field`, in the domain's words: `items`, `idempotency_key`) and how grave a "no" it is as
an HTTP status number (`status`: 422 bad input, 409 not in this state). The API turns them into
responses in one place (config/api.py, which also knows where each field sits in a request), and
no task retries one (core/task_base.py).
"""


class ApplicationError(Exception):
    code: str = "invalid"
    field: str = ""
    status: int = 422
