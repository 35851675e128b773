"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Messages are written for the customer: they never name a provider, a worker address or
carry a traceback.
"""

from __future__ import annotations

import orjson
from starlette.responses import Response

from gateway.wire import Reply

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
    500: "server_error", 502: "server_error", 503: "server_error", 504: "server_error",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}
        self.type = type_ or _TYPES.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def reply(self, request_id: str | None = None) -> Reply:
        """For the hot routes (gateway/wire.py)."""
        headers = dict(self.headers)
        if request_id:
            headers["x-request-id"] = request_id
        return Reply(self.status, headers, orjson.dumps(self.body()))

    def response(self, request_id: str | None = None) -> Response:
        headers = dict(self.headers)
        if request_id:
            headers["x-request-id"] = request_id
        return Response(orjson.dumps(self.body()), status_code=self.status, headers=headers,
                        media_type="application/json")


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


def stream_error_event(message: str, code: str) -> bytes:
    """The SSE event that ends a broken stream: the openai SDK raises it as an APIError."""
    err = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return b"data: " + orjson.dumps(err) + b"\n\n"
