"""HTTP calls the server tests make to `phi1.serve` on 127.0.0.1 (tests/test_serve.py, tests/test_serve_load.py).

Plain `http.client` rather than a client library: the tests need one request per connection, the status code
of error answers as they are, and bodies that are not valid JSON sent as given.
"""

from __future__ import annotations

import http.client
import json


def request_json(port: int, method: str, path: str, body: bytes | str | dict | None = None,
                 timeout: float = 60) -> tuple[int, dict]:
    """Send one request to the server on 127.0.0.1:`port` on a connection of its own and read its JSON answer.

    Args:
        port: the server's port.
        method: "GET" or "POST".
        path: e.g. "/v1/completions" or "/health".
        body: sent as it is when bytes, UTF-8 encoded when str, as JSON when a dict (all with
            Content-Type: application/json); None sends no body and no Content-Type.
        timeout: seconds for the connection and for each read.
    Returns:
        (HTTP status, the decoded JSON body).
    Raises:
        json.JSONDecodeError: the answer is not JSON. OSError / http.client.HTTPException: the connection failed.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if body is None:
            connection.request(method, path)
        else:
            data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
            connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def health(port: int) -> dict:
    """The server's GET /health answer (30 s timeout)."""
    return request_json(port, "GET", "/health", timeout=30)[1]


__all__ = ["health", "request_json"]
