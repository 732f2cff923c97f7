"""ops.worker's message check, on kombu messages (the worker itself: tests/e2e/test_dead_letters.py)."""

import json

import pytest
from celery.exceptions import InvalidTaskError
from kombu.exceptions import ContentDisallowed
from kombu.message import Message

from ops.worker import malformed_task_message

ACCEPT = {"application/json"}
HEADERS = {"task": "orders.tasks.process_order", "id": "t-1"}


def message(body: bytes, content_type: str | None = "application/json", headers=HEADERS) -> Message:
    return Message(body=body, content_type=content_type, content_encoding="utf-8", headers=headers, accept=ACCEPT)


@pytest.mark.parametrize(
    "body",
    [
        [[1], {}, {"callbacks": None}],
        [[], {"order_id": 1}, None],
        {"args": [1], "kwargs": {}},  # a protocol 1 body: Celery converts it
    ],
)
def test_a_well_formed_task_message_is_left_to_celery(body):
    assert malformed_task_message(message(json.dumps(body).encode()), ACCEPT) is None


@pytest.mark.parametrize("body", [b"{}", b"[]", b'"text"', b"[[1], {}]", b"[1, {}, {}]", b"[[1], [], {}]"])
def test_json_that_is_not_args_kwargs_embed_is_invalid(body):
    assert isinstance(malformed_task_message(message(body), ACCEPT), InvalidTaskError)


@pytest.mark.parametrize("content_type", ["application/data", "application/text", None])
def test_content_types_kombu_trusts_without_decoding_are_refused(content_type):
    reason = malformed_task_message(message(b"[[], {}, {}]", content_type=content_type), ACCEPT)
    assert isinstance(reason, ContentDisallowed)


@pytest.mark.parametrize(
    ("body", "content_type", "headers"),
    [
        (b"not json", "application/json", HEADERS),  # Celery: on_decode_error
        (b"\x80\x04pickle", "application/x-python-serialize", HEADERS),  # Celery: ContentDisallowed, never unpickled
        (b"{}", "application/json", {}),  # no task header: protocol 1 or unknown format
    ],
)
def test_what_celery_refuses_itself_is_left_to_celery(body, content_type, headers):
    assert malformed_task_message(message(body, content_type=content_type, headers=headers), ACCEPT) is None
