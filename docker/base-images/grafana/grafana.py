"""A stand-in for Grafana: the endpoints the compose test and a healthcheck use, over the same files.

Reads what the real Grafana reads: GF_SECURITY_ADMIN_USER / GF_SECURITY_ADMIN_PASSWORD, and the
datasources and dashboard providers under GF_PATHS_PROVISIONING (/etc/grafana/provisioning).
Serves on GF_SERVER_HTTP_PORT (3000):

- GET /api/health (no auth)
- GET /api/datasources, GET /api/datasources/uid/<uid>, GET /api/datasources/uid/<uid>/health
  (queries the Prometheus datasource, as Grafana's "Save & test" does)
- GET /api/search (the provisioned dashboards), GET /api/dashboards/uid/<uid>
- GET / and /login: a page saying what this is
"""

import base64
import json
import os
import signal
import sys
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

PROVISIONING = Path(os.environ.get("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning"))
ADMIN = (os.environ.get("GF_SECURITY_ADMIN_USER", "admin"), os.environ.get("GF_SECURITY_ADMIN_PASSWORD", "admin"))
VERSION = "11.1.0-standin"


def _yaml_files(folder: Path) -> list[dict]:
    return [yaml.safe_load(path.read_text()) or {} for path in sorted(folder.glob("*.y*ml"))]


def datasources() -> list[dict]:
    found = []
    for document in _yaml_files(PROVISIONING / "datasources"):
        for number, source in enumerate(document.get("datasources") or [], start=len(found) + 1):
            found.append({"id": number, "orgId": 1, "readOnly": not source.get("editable", False), **source})
    return found


def dashboards() -> list[dict]:
    found = []
    for document in _yaml_files(PROVISIONING / "dashboards"):
        for provider in document.get("providers") or []:
            folder = Path((provider.get("options") or {}).get("path", ""))
            for path in sorted(folder.glob("*.json")):
                board = json.loads(path.read_text())
                found.append({"folderTitle": provider.get("folder", ""), "dashboard": board})
    return found


def datasource_health(source: dict) -> tuple[int, dict]:
    url = source["url"].rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": "1+1"})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (a provisioned http URL)
            body = json.load(response)
    except OSError as exc:
        return 400, {"status": "ERROR", "message": f"Post {url}: {exc}"}
    if body.get("status") != "success":
        return 400, {"status": "ERROR", "message": str(body)}
    return 200, {"status": "OK", "message": "Successfully queried the Prometheus API."}


class Handler(BaseHTTPRequestHandler):
    server_version = "grafana-standin"

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path.rstrip("/") or "/"
        if path == "/api/health":
            return self.send_json(200, {"database": "ok", "version": VERSION, "commit": "standin"})
        if path in ("/", "/login"):
            return self.send_page()
        if not self.authorised():
            return self.send_json(401, {"message": "Unauthorized"})
        sources = datasources()
        if path == "/api/datasources":
            return self.send_json(200, sources)
        if path.startswith("/api/datasources/uid/"):
            uid, _, action = path.removeprefix("/api/datasources/uid/").partition("/")
            source = next((source for source in sources if source.get("uid") == uid), None)
            if source is None:
                return self.send_json(404, {"message": "Data source not found"})
            if action == "health":
                return self.send_json(*datasource_health(source))
            return self.send_json(200, source)
        if path == "/api/search":
            return self.send_json(
                200,
                [
                    {
                        "uid": item["dashboard"].get("uid"),
                        "title": item["dashboard"].get("title"),
                        "type": "dash-db",
                        "folderTitle": item["folderTitle"],
                    }
                    for item in dashboards()
                ],
            )
        if path.startswith("/api/dashboards/uid/"):
            uid = path.removeprefix("/api/dashboards/uid/")
            for item in dashboards():
                if item["dashboard"].get("uid") == uid:
                    return self.send_json(
                        200, {"dashboard": item["dashboard"], "meta": {"folderTitle": item["folderTitle"]}}
                    )
            return self.send_json(404, {"message": "Dashboard not found"})
        return self.send_json(404, {"message": "Not found"})

    def authorised(self) -> bool:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return (user, password) == ADMIN

    def send_json(self, status: int, body) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def send_page(self) -> None:
        titles = "".join(f"<li>{item['dashboard'].get('title')}</li>" for item in dashboards())
        payload = (
            "<!doctype html><title>Grafana (stand-in)</title><h1>Grafana stand-in</h1>"
            "<p>No image registry was reachable where this stack runs, so this small server stands in "
            f"for grafana/grafana. Provisioned dashboards:</p><ul>{titles}</ul>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


if __name__ == "__main__":
    port = int(os.environ.get("GF_SERVER_HTTP_PORT", "3000"))
    # PID 1 in its container: without a handler SIGTERM would be ignored and `docker stop` would wait.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"grafana stand-in on :{port}, provisioning from {PROVISIONING}", flush=True)
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()  # noqa: S104 (inside its container)
