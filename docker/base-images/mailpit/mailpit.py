#!/usr/bin/python3
"""A stand-in for mailpit: catches every email sent over SMTP and shows it over mailpit's API.

`/mailpit` serves SMTP on MP_SMTP_BIND_ADDR (0.0.0.0:1025) and HTTP on MP_UI_BIND_ADDR
(0.0.0.0:8025), keeping messages in memory; `/mailpit readyz` exits 0 when the server answers,
as the real binary's does. HTTP: GET /readyz, /livez, /api/v1/messages (newest first, mailpit's
summary fields), /api/v1/message/<ID> (with Text and HTML), DELETE /api/v1/messages, and / (a list).
"""

import email
import email.policy
import html
import json
import os
import signal
import socketserver
import sys
import threading
import urllib.request
import uuid
from datetime import UTC, datetime
from email.utils import getaddresses
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MESSAGES: list[dict] = []
LOCK = threading.Lock()


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host or "0.0.0.0", int(port)  # noqa: S104 (inside its container)


def _people(header) -> list[dict]:
    return [{"Name": name, "Address": address} for name, address in getaddresses([str(header or "")]) if address]


def store(raw: bytes, sender: str, recipients: list[str]) -> None:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    text = parsed.get_body(preferencelist=("plain",))
    html_part = parsed.get_body(preferencelist=("html",))
    body = text.get_content() if text else ""
    message = {
        "ID": uuid.uuid4().hex,
        "MessageID": str(parsed.get("Message-ID", "")).strip("<>"),
        "Read": False,
        "From": (_people(parsed.get("From")) or [{"Name": "", "Address": sender}])[0],
        "To": _people(parsed.get("To")) or [{"Name": "", "Address": address} for address in recipients],
        "Cc": _people(parsed.get("Cc")),
        "Bcc": [],
        "Subject": str(parsed.get("Subject", "")),
        "Created": datetime.now(UTC).isoformat(),
        "Size": len(raw),
        "Snippet": " ".join(body.split())[:250],
        "Text": body,
        "HTML": html_part.get_content() if html_part else "",
    }
    with LOCK:
        MESSAGES.insert(0, message)
    print(f"message {message['ID']} from {sender} to {', '.join(recipients)}: {message['Subject']}", flush=True)


class SMTPHandler(socketserver.StreamRequestHandler):
    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        self.reply("220 mailpit stand-in ESMTP")
        sender, recipients = "", []
        while line := self.rfile.readline(65536):
            verb, _, argument = line.decode(errors="replace").strip().partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                self.reply("250-mailpit stand-in")
                self.reply("250-8BITMIME")
                self.reply("250 SMTPUTF8")
            elif verb == "HELO":
                self.reply("250 mailpit stand-in")
            elif verb == "MAIL":
                sender, recipients = argument.partition(":")[2].split(" ")[0].strip("<>"), []
                self.reply("250 OK")
            elif verb == "RCPT":
                recipients.append(argument.partition(":")[2].split(" ")[0].strip("<>"))
                self.reply("250 OK")
            elif verb == "DATA":
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                lines = []
                while (data := self.rfile.readline(1 << 20)) not in (b".\r\n", b".\n", b""):
                    lines.append(data[1:] if data.startswith(b"..") else data)
                store(b"".join(lines), sender, recipients)
                self.reply("250 OK: queued")
            elif verb in ("RSET", "NOOP"):
                sender, recipients = ("", []) if verb == "RSET" else (sender, recipients)
                self.reply("250 OK")
            elif verb == "QUIT":
                self.reply("221 Bye")
                return
            else:
                self.reply("502 Command not implemented")


class SMTPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class HTTPHandler(BaseHTTPRequestHandler):
    server_version = "mailpit-standin"

    def do_GET(self) -> None:
        path = self.path.split("?")[0].rstrip("/") or "/"
        with LOCK:
            messages = list(MESSAGES)
        if path in ("/readyz", "/livez"):
            return self.send(200, "text/plain", b"ok")
        if path == "/api/v1/messages":
            summaries = [{key: value for key, value in m.items() if key not in ("Text", "HTML")} for m in messages]
            body = {"total": len(messages), "unread": len(messages), "count": len(messages), "messages": summaries}
            return self.send(200, "application/json", json.dumps(body).encode())
        if path.startswith("/api/v1/message/"):
            wanted = path.removeprefix("/api/v1/message/")
            for message in messages:
                if message["ID"] == wanted:
                    return self.send(200, "application/json", json.dumps(message).encode())
            return self.send(404, "text/plain", b"message not found")
        if path == "/":
            rows = "".join(
                f"<li>{html.escape(m['Created'])} to {html.escape(', '.join(t['Address'] for t in m['To']))}: "
                f"{html.escape(m['Subject'])}</li>"
                for m in messages
            )
            page = f"<!doctype html><title>Mailpit (stand-in)</title><h1>Caught emails</h1><ul>{rows}</ul>"
            return self.send(200, "text/html; charset=utf-8", page.encode())
        return self.send(404, "text/plain", b"not found")

    def do_DELETE(self) -> None:
        if self.path.rstrip("/") == "/api/v1/messages":
            with LOCK:
                MESSAGES.clear()
            return self.send(200, "text/plain", b"ok")
        return self.send(404, "text/plain", b"not found")

    def send(self, status: int, content_type: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (BaseHTTPRequestHandler's name)
        pass


def readyz() -> int:
    host, port = _address(os.environ.get("MP_UI_BIND_ADDR", "0.0.0.0:8025"))
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/readyz"  # noqa: S104
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (a loopback http URL)
            return 0 if response.status == 200 else 1
    except OSError:
        return 1


def serve() -> None:
    # PID 1 in its container: without a handler SIGTERM would be ignored and `docker stop` would wait.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    smtp = SMTPServer(_address(os.environ.get("MP_SMTP_BIND_ADDR", "0.0.0.0:1025")), SMTPHandler)
    threading.Thread(target=smtp.serve_forever, daemon=True).start()
    web = ThreadingHTTPServer(_address(os.environ.get("MP_UI_BIND_ADDR", "0.0.0.0:8025")), HTTPHandler)
    print(f"mailpit stand-in: SMTP on {smtp.server_address}, HTTP on {web.server_address}", flush=True)
    web.serve_forever()


if __name__ == "__main__":
    if sys.argv[1:2] == ["readyz"]:
        sys.exit(readyz())
    serve()
