"""A few lines of HTTP over a unix socket: enough to ping dockerd and to call
the plugin the way dockerd does, with nothing but the standard library."""
from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path

# What dockerd sends to remote plugins (pkg/plugins/client.go).
PLUGIN_CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str | Path, timeout: float = 10.0):
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def request(path: str | Path, method: str, url: str, body: bytes | None = None,
            headers: dict | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    """One request on a fresh connection; returns (status, raw body).

    Raises OSError (ConnectionRefusedError, FileNotFoundError, socket.timeout...)
    when nothing answers on the socket."""
    conn = UnixHTTPConnection(path, timeout=timeout)
    try:
        conn.request(method, url, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def post_json(path: str | Path, url: str, payload, timeout: float = 10.0):
    """POST `payload` as JSON; returns (status, decoded JSON or the raw text when
    the answer is not JSON, or None when it is empty)."""
    data = json.dumps(payload if payload is not None else {}).encode()
    status, raw = request(path, "POST", url, body=data,
                          headers={"Content-Type": PLUGIN_CONTENT_TYPE,
                                   "Accept": PLUGIN_CONTENT_TYPE},
                          timeout=timeout)
    return status, decoded(raw)


def decoded(raw: bytes):
    """A reply's decoded JSON, or its text when it is not JSON, or None when empty."""
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")
