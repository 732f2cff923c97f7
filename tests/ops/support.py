"""A reader of the messages waiting on the test broker."""

import base64
import json

import redis


def queued(client: redis.Redis, queue: str) -> list[dict]:
    """The task messages waiting in a Redis queue, oldest first: headers and the decoded [args, kwargs, embed] body."""
    messages = []
    for raw in reversed(client.lrange(queue, 0, -1)):
        envelope = json.loads(raw)
        body = envelope["body"]
        if envelope["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        messages.append({"headers": envelope["headers"], "body": json.loads(body)})
    return messages
