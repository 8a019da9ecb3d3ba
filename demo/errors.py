"""The one exception every layer of the demo raises to refuse a request."""
from __future__ import annotations

from http import HTTPStatus


class RequestError(Exception):
    """A refused request: the status, the one-line reason the client sees as JSON `error`,
    extra response headers (Allow, Retry-After), and whether the connection must close after
    the answer (its framing cannot be trusted, or a body was left unread)."""

    def __init__(self, status: HTTPStatus, message: str, *, headers: dict[str, str] | None = None,
                 close: bool = False) -> None:
        super().__init__(message)
        self.status = HTTPStatus(status)
        self.message = " ".join(message.split())
        self.headers = dict(headers or {})
        self.close = close


def busy(message: str, retry_after_s: int = 1) -> RequestError:
    """503 with Retry-After: the server is full right now, the request itself is fine."""
    return RequestError(HTTPStatus.SERVICE_UNAVAILABLE, message,
                        headers={"Retry-After": str(retry_after_s)}, close=True)
